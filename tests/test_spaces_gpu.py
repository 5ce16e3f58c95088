"""The ZeroGPU entry points in this process (off ZeroGPU `spaces.GPU` returns them unchanged): the
durations they ask for, the stream that carries progress, errors and Stop across the process
boundary, captioning in one call per batch, grids in one call per cell, what crosses the boundary
pickles, and the manager's set-up in a forked worker. tests/test_zerogpu.py runs them through the
real `spaces` worker."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
from PIL import Image

from studio import spaces_gpu
from studio.captioning.run import CaptionConfig, GpuCalls, caption_dataset
from studio.errors import JobStopped, StudioError
from studio.generation.generate import generate
from studio.generation.grid import run_grid
from studio.models.devices import DeviceInfo
from studio.models.manager import ModelManager
from studio.schemas import GenerateConfig, GridConfig


def gen_config(**fields) -> GenerateConfig:
    return GenerateConfig(prompt="1girl, solo", **fields)


# -- durations -------------------------------------------------------------------------------------
def test_a_typical_image_asks_for_well_under_a_minute():
    seconds = spaces_gpu.generate_duration(gen_config(width=832, height=1216, steps=28), "out", "m")
    assert 5 <= seconds < 30


def test_more_work_asks_for_more_time_and_never_past_the_cap():
    size = {"width": 832, "height": 1216, "steps": 28}
    base = gen_config(**size)
    durations = [
        spaces_gpu.generate_duration(base, "out", "m"),
        spaces_gpu.generate_duration(gen_config(**size, batch_size=4), "out", "m"),
        spaces_gpu.generate_duration(gen_config(**size, batch_size=4, hires={"scale": 1.5}), "out", "m"),
    ]
    assert durations == sorted(durations) and len(set(durations)) == 3
    assert spaces_gpu.generate_duration(base, "out", "m", family="anima") > durations[0]
    huge = gen_config(width=2048, height=2048, steps=100, batch_size=8, batch_count=32, hires={"scale": 2.0})
    assert spaces_gpu.generate_duration(huge, "out", "m") == spaces_gpu.MAX_DURATION == 300


def test_caption_batches_fit_in_a_call():
    assert spaces_gpu.tag_duration("t", ["x"] * spaces_gpu.TAG_BATCH, None, 8) < 60
    assert spaces_gpu.describe_duration("v", ["x"] * spaces_gpu.DESCRIBE_BATCH, "", "skip") < 120


# -- the stream across the process boundary ------------------------------------------------------
def test_stream_passes_progress_then_the_result():
    def work(report, stop):
        for i in range(3):
            report((i + 1) / 3, f"step {i + 1}")
        return "done"

    seen = []
    assert spaces_gpu.consume(spaces_gpu.stream(work), lambda f, m: seen.append((f, m)), None) == "done"
    assert seen == [(1 / 3, "step 1"), (2 / 3, "step 2"), (1.0, "step 3")]


def test_errors_cross_as_their_message():
    def work(report, stop):
        raise StudioError("that LoRA is for another model family")

    def bug(report, stop):
        raise KeyError("oops")

    with pytest.raises(StudioError, match="another model family"):
        spaces_gpu.consume(spaces_gpu.stream(work), lambda f, m: None, None)
    with pytest.raises(StudioError, match="KeyError: 'oops'"):
        spaces_gpu.consume(spaces_gpu.stream(bug), lambda f, m: None, None)


def test_stop_closes_the_stream_and_the_work_stops_at_its_next_step():
    ended = threading.Event()
    steps = []

    def work(report, stop):
        try:
            for i in range(1000):
                if stop.is_set():
                    raise JobStopped("generation stopped")
                steps.append(i)
                report(i / 1000, f"step {i}")
                time.sleep(0.01)
        finally:
            ended.set()

    stop = threading.Event()

    def report(fraction, message):
        if len(steps) >= 3:
            stop.set()

    with pytest.raises(JobStopped):
        spaces_gpu.consume(spaces_gpu.stream(work), report, stop)
    assert ended.is_set(), "closing the stream waits for the work to end"
    assert len(steps) < 10


def test_generate_in_call_equals_generate(demo_manager, tmp_path):
    config = gen_config(model="demo-sdxl", width=64, height=64, steps=2, seed=5)
    spaces_gpu.bind(demo_manager)
    progress = []
    via_call = spaces_gpu.generate_in_call(demo_manager, config, outputs_dir=tmp_path / "a", default_model="demo-sdxl",
                                           report=lambda f, m: progress.append(f))
    direct = generate(demo_manager, config, outputs_dir=tmp_path / "b", default_model="demo-sdxl")
    assert np.array_equal(np.asarray(Image.open(via_call.images[0].path)), np.asarray(Image.open(direct.images[0].path)))
    assert progress and progress[-1] == 1.0


def test_a_grid_is_one_call_per_cell(demo_manager, tmp_path):
    spaces_gpu.bind(demo_manager)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return spaces_gpu.generate_in_call(*args, **kwargs)

    base = gen_config(model="demo-sdxl", width=64, height=64, steps=1, seed=3)
    grid = GridConfig(base=base, x={"kind": "seed", "values": [1, 2]}, y={"kind": "cfg", "values": [4, 6]})
    result = run_grid(demo_manager, grid, outputs_dir=tmp_path, default_model="demo-sdxl", generate_cell=counted)
    assert len(calls) == 4 and result.path.is_file()
    assert {(c.seed, c.cfg_scale) for c in calls} == {(1, 4), (2, 4), (1, 6), (2, 6)}


def test_what_crosses_the_boundary_pickles(demo_manager, tmp_path):
    from studio.captioning.nl_caption import Grounding, NLItem
    from studio.captioning.tagger import TagError, TagResult, TagThresholds

    config = gen_config(model="demo-sdxl", width=64, height=64, steps=1, seed=1, loras=[], hires={"scale": 1.5})
    arguments = [(config, str(tmp_path), "demo-sdxl", "sdxl"), ("demo-tagger", ["a.png"], TagThresholds(), 8),
                 ("some/vlm", [NLItem(tmp_path / "a.png", Grounding())], "{tags}", "skip")]
    spaces_gpu.bind(demo_manager)
    result = generate(demo_manager, config.model_copy(update={"hires": None}), outputs_dir=tmp_path,
                      default_model="demo-sdxl")
    results = [("result", result), [(0, TagResult(("safe", 0.9), [], [("smile", 0.5)])), (1, TagError("b", "x"))]]
    for value in [*arguments, *results]:
        assert pickle.loads(pickle.dumps(value)) == value


# -- captioning in calls ---------------------------------------------------------------------------
@pytest.fixture
def two_datasets(tmp_path):
    for name in ("local", "calls"):  # the same images in both
        rng = np.random.default_rng(1)
        folder = tmp_path / name
        folder.mkdir()
        for i in range(5):
            Image.fromarray((rng.random((72, 64, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / "broken.png").write_bytes(b"not an image")
    return tmp_path


def test_captioning_in_batched_calls_writes_what_a_local_run_writes(two_datasets, tmp_path_factory):
    manager = ModelManager(tmp_path_factory.mktemp("models"), requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    spaces_gpu.bind(manager)
    batches = []

    def tag(tagger, images, thresholds, batch_size):
        batches.append(list(images))
        return spaces_gpu.tag_batch(tagger, images, thresholds, batch_size)

    calls = GpuCalls(tag=tag, tag_batch=2, describe=spaces_gpu.describe_batch, describe_batch=2)
    rules = {"trigger": "mychar"}
    local = caption_dataset(manager, CaptionConfig(dataset=str(two_datasets / "local"), tagger="demo-tagger", rules=rules))
    in_calls = caption_dataset(manager, CaptionConfig(dataset=str(two_datasets / "calls"), tagger="demo-tagger",
                                                      rules=rules), gpu_calls=calls)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(isinstance(image, str) for batch in batches for image in batch)
    assert len(local.tagged) == len(in_calls.tagged) == 5
    for i in range(5):
        assert (two_datasets / "calls" / f"img{i}.txt").read_text() == (two_datasets / "local" / f"img{i}.txt").read_text()


def test_stop_between_caption_batches(two_datasets, tmp_path_factory):
    manager = ModelManager(tmp_path_factory.mktemp("models"), requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    spaces_gpu.bind(manager)
    stop = threading.Event()

    def tag(tagger, images, thresholds, batch_size):
        stop.set()  # Stop pressed while the first batch ran
        return spaces_gpu.tag_batch(tagger, images, thresholds, batch_size)

    calls = GpuCalls(tag=tag, tag_batch=2, describe=spaces_gpu.describe_batch, describe_batch=2)
    run = caption_dataset(manager, CaptionConfig(dataset=str(two_datasets / "calls"), tagger="demo-tagger"), stop=stop,
                          gpu_calls=calls)
    assert run.stopped and len(run.tagged) == 2


# -- the manager in a forked worker ----------------------------------------------------------------
def test_after_fork_replans_loaded_models_for_the_worker_device(demo_models_dir):
    manager = ModelManager(demo_models_dir, requested_policy="auto",
                           device=DeviceInfo("cpu", "ZeroGPU parent", bf16=True))
    record = manager.get("demo-sdxl")
    with manager.use(record):
        old_lane = manager._lane
        manager._lane.acquire()  # a lock some thread held when the process forked
        manager.after_fork()
    assert manager._lane is not old_lane and manager._lane.acquire(blocking=False)
    manager._lane.release()
    assert manager.device.name != "ZeroGPU parent", "the worker probes its own device"
    assert record.locks == 0 and not record.placed and record.execution_device == manager.device.execution_device
    with manager.gpu_lane("generation"), manager.use(record):
        assert record.resident


def test_stop_ends_a_grid_within_its_current_cell(demo_manager, tmp_path):
    stop = threading.Event()
    base = gen_config(model="demo-sdxl", width=64, height=64, steps=20, seed=3)
    grid = GridConfig(base=base, x={"kind": "seed", "values": [1, 2, 3]}, y={"kind": "cfg", "values": [4, 6]})
    reports = []

    def report(fraction, message):
        reports.append(message)
        if len(reports) == 5:  # Stop pressed during the first cell
            stop.set()

    with pytest.raises(JobStopped):
        run_grid(demo_manager, grid, outputs_dir=tmp_path, default_model="demo-sdxl", report=report, stop=stop)
    assert all(message.startswith("cell 1/6") for message in reports), reports
    assert not list(tmp_path.rglob("grid-*.png"))
    with demo_manager.gpu_lane("check", exclusive=True):  # the lane is free again (else BusyError at once)
        pass
