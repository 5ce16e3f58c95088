"""Optimizers by kohya's names: each trains a tiny model, resumes exactly from its state_dict,
applies weight decay as its closed form says, and fails loudly when misconfigured."""

import copy
import importlib.util
import io
import os
import subprocess
import sys

import pytest

from studio.errors import ConfigError
from studio.training.optim import OPTIMIZER_NAMES, make_optimizer

torch = pytest.importorskip("torch")

# A learning rate each optimizer trains the tiny model well with (Prodigy's is a multiplier).
LR = {"AdamW": 1e-2, "AdamW8bit": 1e-2, "Adafactor": 1e-2, "Prodigy": 1.0, "Lion": 1e-3}
MODULES = {"AdamW8bit": "bitsandbytes", "Prodigy": "prodigyopt", "Lion": "lion_pytorch"}


def require_package(name):
    """Optional optimizers are in requirements.txt: missing is a skip here, a failure on CI."""
    module = MODULES.get(name)
    if module and importlib.util.find_spec(module) is None:
        message = f"{name} needs {module}: pip install -r requirements.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def tiny_model(seed=0):
    # 8192 weights: above bitsandbytes' 4096-element threshold, so AdamW8bit keeps 8-bit states
    torch.manual_seed(seed)
    return torch.nn.Linear(128, 64)


def regression_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(32, 128, generator=generator)
    targets = inputs @ torch.randn(128, 64, generator=generator) * 0.1
    return inputs, targets


def train(model, optimizer, steps, batch):
    inputs, targets = batch
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_importing_optim_does_not_import_torch():
    code = "import sys, studio.training.optim; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_each_optimizer_reduces_a_quadratic_loss(name):
    require_package(name)
    model = tiny_model()
    optimizer = make_optimizer(name, model.parameters(), lr=LR[name])
    losses = train(model, optimizer, 30, regression_batch())
    assert losses[1] < losses[0], losses[:3]  # the very first steps already help
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_round_trip_gives_identical_next_steps(name):
    require_package(name)
    batch = regression_batch()
    model = tiny_model()
    optimizer = make_optimizer(name, model.parameters(), lr=LR[name], weight_decay=0.01)
    train(model, optimizer, 4, batch)

    # what a checkpoint holds: the weights and the optimizer state, through torch.save
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # safe loading must suffice

    resumed_model = tiny_model(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = make_optimizer(name, resumed_model.parameters(), lr=LR[name], weight_decay=0.01)
    resumed.load_state_dict(saved["optimizer"])
    fresh_model = copy.deepcopy(resumed_model)  # same weights, optimizer state lost
    fresh = make_optimizer(name, fresh_model.parameters(), lr=LR[name], weight_decay=0.01)

    assert train(resumed_model, resumed, 3, batch) == train(model, optimizer, 3, batch)
    for original, restored in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(original, restored)
    train(fresh_model, fresh, 3, batch)
    assert not torch.equal(fresh_model.weight, model.weight), "the optimizer state made no difference"


def test_adamw8bit_keeps_8bit_states_for_large_params():
    require_package("AdamW8bit")
    model = tiny_model()
    optimizer = make_optimizer("AdamW8bit", model.parameters(), lr=1e-2)
    train(model, optimizer, 1, regression_batch())
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8
    assert optimizer.state[model.weight]["state2"].dtype == torch.uint8


# Prodigy is left out: with zero gradients it estimates no step size and skips the step entirely.
@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "Adafactor"])
def test_weight_decay_shrinks_a_zero_grad_param_as_the_closed_form_says(name):
    require_package(name)
    lr, weight_decay, steps = 0.01, 0.1, 5
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 128))
    start = param.detach().clone()
    optimizer = make_optimizer(name, [param], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        param.grad = torch.zeros_like(param)  # the loss is flat: only weight decay moves it
        optimizer.step()
    expected = start * (1 - lr * weight_decay) ** steps
    torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(param.detach(), start, rtol=1e-5, atol=0)


def test_adamw_without_weight_decay_leaves_a_zero_grad_param_alone():
    param = torch.nn.Parameter(torch.randn(5))
    start = param.detach().clone()
    optimizer = make_optimizer("AdamW", [param], lr=0.01)  # weight_decay defaults to 0
    param.grad = torch.zeros_like(param)
    optimizer.step()
    assert torch.equal(param.detach(), start)


def test_group_learning_rates_are_kept_and_lr_is_the_default():
    unet, text = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [unet], "lr": 1e-4}, {"params": [text]}]
    optimizer = make_optimizer("AdamW", groups, lr=5e-5, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-6)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 5e-5]
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["weight_decay"] == 0.1
    assert "lr" not in groups[1], "the caller's group dicts must not be changed"


def test_betas_and_eps_may_come_in_extra_args_as_kohyas_optimizer_args_do():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = make_optimizer("AdamW", [param], lr=1e-3, extra_args={"betas": [0.9, 0.99], "eps": 1e-6})
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["eps"] == 1e-6
    adafactor = make_optimizer("Adafactor", [param], lr=1e-3, extra_args={"eps": (1e-30, 2e-3), "beta1": 0.9})
    assert adafactor.defaults["eps"] == (1e-30, 2e-3) and adafactor.defaults["beta1"] == 0.9


def test_names_are_kohyas_in_any_case():
    param = torch.nn.Parameter(torch.ones(2))
    assert type(make_optimizer("adamw", [param], lr=1e-3)).__name__ == "AdamW"


def test_adafactor_uses_a_fixed_learning_rate_as_kohya_recommends_for_lora():
    optimizer = make_optimizer("Adafactor", [torch.nn.Parameter(torch.ones(2))], lr=1e-4)
    defaults = optimizer.defaults
    settings = ("lr", "relative_step", "scale_parameter", "warmup_init")
    assert [defaults[key] for key in settings] == [1e-4, False, False, False]


def test_adamw_on_cpu_leaves_the_kernel_choice_to_torch():
    optimizer = make_optimizer("AdamW", [torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    assert not optimizer.defaults["fused"]
    pinned = make_optimizer("AdamW", [torch.nn.Parameter(torch.ones(2))], lr=1e-3,
                            extra_args={"foreach": True})
    assert pinned.defaults["foreach"] is True


@pytest.mark.gpu
def test_adamw_on_cuda_uses_the_fused_kernel():
    param = torch.nn.Parameter(torch.ones(2, device="cuda"))
    optimizer = make_optimizer("AdamW", [param], lr=1e-3)
    assert optimizer.defaults["fused"] is True
    (param**2).sum().backward()
    optimizer.step()
    assert (param < 1).all()


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ConfigError) as raised:
        make_optimizer("SGDNesterov8bit", [torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    assert all(name in str(raised.value) for name in OPTIMIZER_NAMES)


@pytest.mark.parametrize("name, module, package", [
    ("AdamW8bit", "bitsandbytes.optim", "bitsandbytes"),
    ("Prodigy", "prodigyopt", "prodigyopt"),
    ("Lion", "lion_pytorch", "lion-pytorch"),
])
def test_missing_package_names_what_to_install(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ConfigError) as raised:
        make_optimizer(name, [torch.nn.Parameter(torch.ones(2))], lr=1.0)
    assert f"pip install {package}" in str(raised.value)


@pytest.mark.parametrize("name, kwargs, fix", [
    ("AdamW", {"extra_args": {"amsgrad": True, "nonsense": 1}}, "nonsense"),
    ("AdamW", {"extra_args": {"lr": 1.0}}, "not in extra_args"),
    ("AdamW", {"lr": 0.0}, "must be positive"),
    ("AdamW", {"weight_decay": -0.1}, "weight_decay"),
    ("AdamW", {"betas": (0.9, 1.5)}, "betas"),
    ("AdamW", {"extra_args": {"betas": 0.9}}, "betas must be two numbers"),
    ("AdamW", {"betas": (0.9, 0.99), "extra_args": {"betas": (0.9, 0.999)}}, "given twice"),
    ("Lion", {"extra_args": {"eps": 1e-8}}, "Lion takes no eps"),
    ("Lion", {"eps": 1e-8}, "Lion takes no eps"),
    ("Adafactor", {"betas": (0.9, 0.999)}, "beta1"),
    ("Adafactor", {"extra_args": {"relative_step": True}}, "relative_step"),
    ("Prodigy", {"groups": [{"lr": 1.0}, {"lr": 0.5}]}, "one LR for every parameter group"),
])
def test_settings_an_optimizer_cannot_use_are_refused(name, kwargs, fix):
    require_package(name)
    lrs = kwargs.pop("groups", None)
    params = [{"params": [torch.nn.Parameter(torch.ones(2))], **extra} for extra in lrs] if lrs else \
        [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ConfigError) as raised:
        make_optimizer(name, params, **{"lr": LR[name], **kwargs})
    assert fix in str(raised.value)


def test_prodigy_may_freeze_a_group_with_lr_zero():
    require_package("Prodigy")
    trained, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [trained]}, {"params": [frozen], "lr": 0.0}]
    optimizer = make_optimizer("Prodigy", groups, lr=1.0)
    assert [group["lr"] for group in optimizer.param_groups] == [1.0, 0.0]


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        make_optimizer("AdamW", [], lr=1e-3)
    with pytest.raises(ConfigError, match="nothing to train"):
        make_optimizer("AdamW", [{"params": []}], lr=1e-3)
