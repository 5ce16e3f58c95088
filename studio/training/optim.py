"""Optimizers by kohya's names, built from one call.

| name        | class                                   | package (pip)  | notes                             |
|-------------|-----------------------------------------|----------------|-----------------------------------|
| AdamW       | torch.optim.AdamW                       | torch          | fused kernel when all params are  |
|             |                                         |                | on CUDA, else torch's default     |
| AdamW8bit   | bitsandbytes.optim.AdamW8bit            | bitsandbytes   | 8-bit states; runs on CPU too     |
| Adafactor   | transformers.optimization.Adafactor     | transformers   | fixed LR, see below               |
| Prodigy     | prodigyopt.Prodigy                      | prodigyopt     | lr is a multiplier: use 1.0       |
| Lion        | lion_pytorch.Lion                       | lion-pytorch   | lr 3-10x below AdamW's            |

Weight decay is decoupled (AdamW-style, `p *= 1 - lr * weight_decay` per step) for AdamW,
AdamW8bit, Lion and Adafactor, and Prodigy's default (decouple=True) scaled by its step size.

Adafactor is built the way kohya recommends for LoRA: `relative_step=False,
scale_parameter=False, warmup_init=False`, so the studio's LR and schedule apply (pair it with
`constant_with_warmup`). It clips its own updates (`clip_threshold`), so kohya also turns off
gradient-norm clipping (max_grad_norm 0) for it. Its relative-step mode, which sets its own LR,
is refused: the studio's scheduler owns the LR.

Prodigy estimates the step size itself; `lr` multiplies that estimate, so it is normally 1.0, and
every parameter group must share it (a group may use 0 to freeze). Common LoRA extras:
`{"d_coef": 1.0, "use_bias_correction": True, "safeguard_warmup": True}`.

`betas` and `eps` default to each optimizer's own defaults; they may also come in `extra_args`
(kohya's `optimizer_args`, e.g. `{"betas": [0.9, 0.99]}`), which holds the optimizer-specific
settings too; a setting the optimizer does not take is a ConfigError.
Optional packages are imported when their optimizer is built; importing this module imports
nothing heavy.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from studio.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion")
# The pip package to install for each optional optimizer.
OPTIONAL_PACKAGES = {"AdamW8bit": "bitsandbytes", "Prodigy": "prodigyopt", "Lion": "lion-pytorch"}
# Optimizers with no `betas` / `eps` argument of that shape (Adafactor takes beta1 and a pair of
# eps in extra_args).
_NO_BETAS = ("Adafactor",)
_NO_EPS = ("Adafactor", "Lion")
ADAFACTOR_LORA_DEFAULTS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


def canonical_optimizer_name(name: str) -> str:
    """kohya's spelling of an optimizer name given in any case, e.g. 'adamw8bit' -> 'AdamW8bit'."""
    by_lower = {known.lower(): known for known in OPTIMIZER_NAMES}
    try:
        return by_lower[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown optimizer {name!r}; "
                          f"choose one of: {', '.join(OPTIMIZER_NAMES)}") from None


def make_optimizer(name: str, param_groups: Iterable[Any], lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] | None = None, eps: float | None = None,
                   extra_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (tensors, or dicts with "params" and optionally
    their own "lr", e.g. unet_lr and text_encoder_lr); `lr` is the default for groups without one.
    Raises ConfigError for an unknown name, a missing package or a setting it cannot use."""
    # 1. Resolve the name and check the shared settings (kohya's optimizer_args may carry
    #    betas and eps; Adafactor's eps is its own pair and stays in its extras)
    name = canonical_optimizer_name(name)
    groups = _copy_groups(param_groups)
    extra = dict(extra_args or {})
    clashes = sorted(set(extra) & {"params", "lr", "weight_decay"})
    if clashes:
        raise ConfigError(f"set {', '.join(clashes)} with the optimizer's own fields, not in extra_args")
    if name != "Adafactor":
        twice = [key for key, value in (("betas", betas), ("eps", eps)) if key in extra and value is not None]
        if twice:
            raise ConfigError(f"{', '.join(twice)} given twice: as a setting and in extra_args; keep one")
        betas, eps = extra.pop("betas", betas), extra.pop("eps", eps)
    _check_common(name, groups, lr, weight_decay, betas, eps)

    # 2. Arguments: the shared ones this optimizer takes, then its extras over its defaults
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if betas is not None:
        kwargs["betas"] = tuple(betas)
    if eps is not None:
        kwargs["eps"] = eps
    kwargs.update(_DEFAULTS[name](groups, extra))
    kwargs.update(extra)
    _check_specific(name, groups, kwargs)

    # 3. Build it; a setting it does not take is the user's to fix
    optimizer_class = _OPTIMIZER_CLASSES[name]()
    try:
        return optimizer_class(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} cannot use these settings ({_describe(kwargs)}): {exc}") from exc


def _copy_groups(param_groups: Iterable[Any]) -> list[dict[str, Any]]:
    groups = list(param_groups)
    if not groups:
        raise ConfigError("there is nothing to train: no parameters were given to the optimizer")
    if all(isinstance(group, dict) for group in groups):
        groups = [{**group, "params": list(group["params"])} for group in groups]
    elif any(isinstance(group, dict) for group in groups):
        raise ValueError("param_groups mixes tensors and group dicts; give one or the other")
    else:
        groups = [{"params": groups}]
    if not any(group["params"] for group in groups):
        raise ConfigError("there is nothing to train: every parameter group is empty")
    return groups


def _check_common(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float,
                  betas: tuple[float, float] | None, eps: float | None) -> None:
    group_lrs = [group.get("lr", lr) for group in groups]
    if lr <= 0 or any(group_lr < 0 for group_lr in group_lrs):
        raise ConfigError(f"the learning rate must be positive, got {lr} (groups: {group_lrs})")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if betas is not None:
        if name in _NO_BETAS:
            raise ConfigError(f"{name} takes no betas; set beta1 in extra_args instead")
        pair = isinstance(betas, (list, tuple)) and len(betas) == 2
        if not pair or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {betas}")
    if eps is not None:
        if name in _NO_EPS:
            hint = " (its eps is a pair, set in extra_args)" if name == "Adafactor" else ""
            raise ConfigError(f"{name} takes no eps{hint}; leave eps unset")
        if eps <= 0:
            raise ConfigError(f"eps must be positive, got {eps}")


def _check_specific(name: str, groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
    if name == "Adafactor" and kwargs.get("relative_step"):
        raise ConfigError("Adafactor's relative_step=True sets its own LR, which the studio's LR "
                          "scheduler cannot follow; use relative_step=False with a learning rate")
    if name == "Prodigy":
        group_lrs = {group.get("lr", kwargs["lr"]) for group in groups} - {0.0}
        if len(group_lrs) > 1:
            raise ConfigError(f"Prodigy needs one LR for every parameter group (or 0 to freeze one), "
                              f"got {sorted(group_lrs)}: set unet_lr and text_encoder_lr equal, usually 1.0")
        if group_lrs and max(group_lrs) < 0.1:
            log.warning("Prodigy's lr multiplies its own step-size estimate and is normally 1.0; "
                        "%s will train very slowly", max(group_lrs))


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


def _import_optional(optimizer: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = OPTIONAL_PACKAGES[optimizer]
        raise ConfigError(f"the {optimizer} optimizer needs the {package!r} package: pip install {package} "
                          f"(or pip install -r requirements.txt)") from exc


def _adamw_defaults(groups: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    if "fused" in extra or "foreach" in extra:
        return {}
    params = [p for group in groups for p in group["params"]]
    on_cuda = all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if on_cuda else {}  # elsewhere torch picks foreach or a plain loop


def _no_defaults(groups: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    return {}


def _adafactor_defaults(groups: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    return dict(ADAFACTOR_LORA_DEFAULTS)


def _adamw_class() -> type:
    import torch

    return torch.optim.AdamW


def _adamw8bit_class() -> type:
    return _import_optional("AdamW8bit", "bitsandbytes.optim").AdamW8bit


def _adafactor_class() -> type:
    from transformers.optimization import Adafactor

    return Adafactor


def _prodigy_class() -> type:
    return _import_optional("Prodigy", "prodigyopt").Prodigy


def _lion_class() -> type:
    return _import_optional("Lion", "lion_pytorch").Lion


_DEFAULTS: dict[str, Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]]] = {
    "AdamW": _adamw_defaults,
    "AdamW8bit": _no_defaults,
    "Adafactor": _adafactor_defaults,
    "Prodigy": _no_defaults,
    "Lion": _no_defaults,
}
_OPTIMIZER_CLASSES: dict[str, Callable[[], type]] = {
    "AdamW": _adamw_class,
    "AdamW8bit": _adamw8bit_class,
    "Adafactor": _adafactor_class,
    "Prodigy": _prodigy_class,
    "Lion": _lion_class,
}
