"""LR schedules against their closed forms, the LambdaLR wrapper and its exact resume."""

import itertools
import math
import subprocess
import sys

import pytest

from studio.errors import ConfigError
from studio.training.schedules import SCHEDULER_NAMES, LRSchedule, make_lr_scheduler


def cosine(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


def values(schedule, upto=None):
    return [schedule.multiplier(s) for s in range((upto or schedule.total_steps) + 1)]


def test_importing_schedules_does_not_import_torch():
    code = "import sys, studio.training.schedules; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constant_is_one_everywhere():
    assert values(LRSchedule("constant", 50), 80) == [1.0] * 81


def test_constant_with_warmup_closed_form():
    schedule = LRSchedule("constant_with_warmup", 100, warmup_steps=10)
    assert [schedule.multiplier(s) for s in range(11)] == pytest.approx([s / 10 for s in range(11)])
    assert values(schedule, 150)[10:] == [1.0] * 141


def test_linear_closed_form():
    schedule = LRSchedule("linear", 100, warmup_steps=20)
    for step in range(121):
        expected = step / 20 if step < 20 else max(0.0, (100 - step) / 80)
        assert schedule.multiplier(step) == pytest.approx(expected, abs=1e-12), step
    assert schedule.multiplier(20) == 1.0 and schedule.multiplier(60) == pytest.approx(0.5)
    assert schedule.multiplier(100) == 0.0


def test_cosine_closed_form_and_floor():
    schedule = LRSchedule("cosine", 1000, warmup_steps=100)
    for step in range(0, 1101, 7):
        expected = step / 100 if step < 100 else cosine(min(1.0, (step - 100) / 900))
        assert schedule.multiplier(step) == pytest.approx(expected, abs=1e-12), step
    assert schedule.multiplier(550) == pytest.approx(0.5)  # halfway through the decay
    assert schedule.multiplier(1000) == pytest.approx(0.0, abs=1e-15)

    floored = LRSchedule("cosine", 1000, warmup_steps=100, min_lr_ratio=0.1)
    assert floored.multiplier(0) == pytest.approx(0.1)  # warmup starts at the floor
    assert floored.multiplier(50) == pytest.approx(0.55)
    assert floored.multiplier(100) == 1.0
    assert floored.multiplier(550) == pytest.approx(0.55)
    assert floored.multiplier(1000) == pytest.approx(0.1) == floored.multiplier(5000)
    for step in range(100, 1001, 9):
        assert floored.multiplier(step) == pytest.approx(0.1 + 0.9 * schedule.multiplier(step))


def test_warmup_ratio_is_a_fraction_of_the_run():
    schedule = LRSchedule("cosine", 1000, warmup_ratio=0.05)
    assert schedule.warmup == 50
    assert schedule.multiplier(25) == pytest.approx(0.5) and schedule.multiplier(50) == 1.0


def test_polynomial_closed_form():
    schedule = LRSchedule("polynomial", 200, warmup_steps=40, power=2.0, min_lr_ratio=0.05)
    for step in range(221):
        if step < 40:
            expected = 0.05 + 0.95 * step / 40
        else:
            expected = 0.05 + 0.95 * (1 - min(1.0, (step - 40) / 160)) ** 2
        assert schedule.multiplier(step) == pytest.approx(expected, abs=1e-12), step
    assert schedule.multiplier(120) == pytest.approx(0.05 + 0.95 * 0.25)
    # power 1 is the linear schedule
    assert values(LRSchedule("polynomial", 90, warmup_steps=9)) == pytest.approx(
        values(LRSchedule("linear", 90, warmup_steps=9)))


ANIMAGINE = {"total_steps": 1000, "warmup_steps": 20, "num_cycles": 4, "cycle_decay": 0.9,
             "min_lr_ratio": 0.1}


def test_cosine_with_restarts_closed_form():
    schedule = LRSchedule("cosine_with_restarts", **ANIMAGINE)
    for step in range(1001):
        k, pos = divmod(step, 250)
        if step == 1000:
            expected = 0.1
        elif pos < 20:
            expected = 0.1 + (0.9**k - 0.1) * pos / 20
        else:
            expected = 0.1 + (0.9**k - 0.1) * cosine((pos - 20) / 230)
        assert schedule.multiplier(step) == pytest.approx(expected, abs=1e-12), step


def test_cosine_with_restarts_hand_values():
    schedule = LRSchedule("cosine_with_restarts", **ANIMAGINE)
    # warmup ends: the peaks, each cycle's the previous one's times 0.9
    assert [schedule.multiplier(250 * k + 20) for k in range(4)] == pytest.approx([1.0, 0.9, 0.81, 0.729])
    # cycle boundaries: back at the floor, the new warmup starts there
    assert [schedule.multiplier(250 * k) for k in range(5)] == pytest.approx([0.1] * 5)
    assert schedule.multiplier(249) == pytest.approx(0.1 + 0.9 * cosine(229 / 230))
    # the middle of cycle 2's cosine: halfway between its peak 0.81 and the floor
    assert schedule.multiplier(500 + 20 + 115) == pytest.approx((0.81 + 0.1) / 2)
    # warmup halfway in cycle 1
    assert schedule.multiplier(260) == pytest.approx((0.1 + 0.9) / 2)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_each_cycle_peak_decays_by_gamma(gamma):
    schedule = LRSchedule("cosine_with_restarts", 600, warmup_steps=10, num_cycles=6, cycle_decay=gamma)
    peaks = []
    for k in range(6):
        start, end = schedule.cycle_start(k), schedule.cycle_start(k + 1)
        cycle = [schedule.multiplier(s) for s in range(start, end)]
        peaks.append(max(cycle))
        assert cycle.index(max(cycle)) == 10  # the peak is where the warmup ends
    assert peaks == pytest.approx([gamma**k for k in range(6)])
    assert [peaks[k + 1] / peaks[k] for k in range(5)] == pytest.approx([gamma] * 5)


def test_uneven_cycles_cover_the_run():
    schedule = LRSchedule("cosine_with_restarts", 10, num_cycles=3)
    assert [schedule.cycle_start(k) for k in range(4)] == [0, 3, 6, 10]
    assert [schedule.cycle_of(s) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert [schedule.multiplier(s) for s in (0, 3, 6)] == [1.0, 1.0, 1.0]
    assert schedule.multiplier(7) == pytest.approx(cosine(1 / 4))


def test_restarts_with_one_cycle_is_cosine():
    restarts = LRSchedule("cosine_with_restarts", 300, warmup_steps=30, min_lr_ratio=0.2)
    plain = LRSchedule("cosine", 300, warmup_steps=30, min_lr_ratio=0.2)
    assert values(restarts, 320) == pytest.approx(values(plain, 320), abs=1e-15)


def test_restart_warmup_ratio_is_a_fraction_of_a_cycle():
    schedule = LRSchedule("cosine_with_restarts", 1000, warmup_ratio=0.1, num_cycles=4)
    assert schedule.warmup == 25
    assert schedule.multiplier(250 + 25) == 1.0 and schedule.multiplier(250 + 24) < 1.0


def _non_increasing(xs):
    return all(b <= a + 1e-15 for a, b in itertools.pairwise(xs))


def _non_decreasing(xs):
    return all(b >= a - 1e-15 for a, b in itertools.pairwise(xs))


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial"])
def test_warmup_rises_then_decay_falls(name):
    schedule = LRSchedule(name, 500, warmup_steps=50, min_lr_ratio=0.05)
    xs = values(schedule, 600)
    assert _non_decreasing(xs[:51]) and _non_increasing(xs[50:])
    assert xs[0] < xs[1] < xs[50] and xs[50] > xs[51] > xs[500]


def test_restarts_are_monotonic_within_each_cycle():
    schedule = LRSchedule("cosine_with_restarts", **ANIMAGINE)
    for k in range(4):
        start, end = schedule.cycle_start(k), schedule.cycle_start(k + 1)
        cycle = [schedule.multiplier(s) for s in range(start, end + 1)]
        assert _non_decreasing(cycle[:21]) and _non_increasing(cycle[20:])
        assert cycle[0] < cycle[1] and cycle[20] > cycle[21]


def test_lr_at_is_base_times_multiplier():
    schedule = LRSchedule("cosine", 100, warmup_steps=10)
    assert schedule.lr_at(55, 1e-4) == pytest.approx(1e-4 * 0.5)


@pytest.mark.parametrize("kwargs, fix", [
    ({"name": "cosine_annealing", "total_steps": 10}, "choose one of"),
    ({"name": "cosine", "total_steps": 0}, "at least 1"),
    ({"name": "constant", "total_steps": 10, "warmup_steps": 2}, "constant_with_warmup"),
    ({"name": "cosine", "total_steps": 10, "warmup_steps": 10}, "never ends"),
    ({"name": "cosine_with_restarts", "total_steps": 100, "num_cycles": 4, "warmup_steps": 25}, "never ends"),
    ({"name": "cosine", "total_steps": 10, "warmup_steps": 2, "warmup_ratio": 0.1}, "not both"),
    ({"name": "cosine", "total_steps": 10, "num_cycles": 3}, "only applies to the 'cosine_with_restarts'"),
    ({"name": "linear", "total_steps": 10, "cycle_decay": 0.9}, "only applies to the 'cosine_with_restarts'"),
    ({"name": "cosine", "total_steps": 10, "power": 2.0}, "only applies to the 'polynomial'"),
    ({"name": "constant_with_warmup", "total_steps": 10, "min_lr_ratio": 0.1}, "decaying schedules"),
    ({"name": "cosine", "total_steps": 10, "min_lr_ratio": 1.0}, "[0, 1)"),
    ({"name": "cosine_with_restarts", "total_steps": 10, "num_cycles": 11}, "between 1 and total_steps"),
    ({"name": "cosine_with_restarts", "total_steps": 10, "num_cycles": 2, "cycle_decay": 1.5}, "(0, 1]"),
    ({"name": "cosine_with_restarts", "total_steps": 100, "num_cycles": 5, "cycle_decay": 0.5,
      "min_lr_ratio": 0.1},
     "not above min_lr_ratio"),
])
def test_settings_a_schedule_would_misuse_are_refused(kwargs, fix):
    with pytest.raises(ConfigError) as raised:
        LRSchedule(**kwargs)
    assert fix in str(raised.value)


def test_negative_step_is_a_bug():
    with pytest.raises(ValueError):
        LRSchedule("cosine", 10).multiplier(-1)


def _adamw_with_groups(unet_lr=1e-4, text_encoder_lr=5e-5):
    import torch

    unet, text = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return torch.optim.AdamW([{"params": [unet], "lr": unet_lr}, {"params": [text], "lr": text_encoder_lr}])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_lambdalr_scales_every_group_by_the_same_multiplier(name):
    kwargs = {"warmup_steps": 5} if name != "constant" else {}
    if name == "cosine_with_restarts":
        kwargs.update(num_cycles=3, cycle_decay=0.9)
    schedule = LRSchedule(name, 60, **kwargs)
    optimizer = _adamw_with_groups()
    scheduler = make_lr_scheduler(optimizer, schedule)
    for step in range(65):
        unet_lr, text_lr = (group["lr"] for group in optimizer.param_groups)
        assert unet_lr == pytest.approx(1e-4 * schedule.multiplier(step), abs=1e-18), step
        assert text_lr == pytest.approx(5e-5 * schedule.multiplier(step), abs=1e-18), step
        optimizer.step()
        scheduler.step()


def test_lambdalr_state_dict_round_trip_resumes_exactly():
    schedule = LRSchedule("cosine_with_restarts", **ANIMAGINE)
    optimizer = _adamw_with_groups()
    scheduler = make_lr_scheduler(optimizer, schedule)
    for _ in range(263):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    assert saved_scheduler["last_epoch"] == 263

    resumed_optimizer = _adamw_with_groups()
    resumed = make_lr_scheduler(resumed_optimizer, schedule)  # the documented resume order
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_scheduler)
    for step in range(263, 400):
        expected = [group["lr"] for group in optimizer.param_groups]
        assert [group["lr"] for group in resumed_optimizer.param_groups] == expected, step
        assert expected[0] == pytest.approx(1e-4 * schedule.multiplier(step), abs=1e-18)
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
    assert resumed.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 400
