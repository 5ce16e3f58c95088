"""Running Anima on diffusers 0.42 as the studio installs it: without torchvision, and quietly.

diffusers' `CosmosTransformer3DModel.forward` (Anima's DiT) resizes its padding mask to the latent
size with `torchvision.transforms.functional.resize(..., interpolation=InterpolationMode.NEAREST)`,
and imports `transforms` only when torchvision is installed. The studio never installs
torchvision (its only wheel is a CUDA build, and once installed `import diffusers` breaks), so
without this shim every Anima forward pass fails with `name 'transforms' is not defined`.

`ensure_cosmos_resize()` gives the diffusers module a minimal `transforms` object that provides
exactly the call it makes. For tensors, torchvision's NEAREST resize *is*
`torch.nn.functional.interpolate(mode="nearest")` (PyTorch's legacy nearest rule: output index i
reads input index floor(i * in / out)), so the shim computes the same values. Anything else
(another interpolation mode, a single-int size, a PIL image) raises instead of guessing.

The shim is applied only when torchvision is absent, is idempotent, and is applied by the Anima
loader (studio.models.loaders.load_anima).

`quiet_logger(name)` silences one diffusers logger for a block, for messages that are expected
and say nothing to a user (see GUIDER_LOGGER, BLOCK_ERROR_LOGGER). Importing this module does no
work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

COSMOS_MODULE = "diffusers.models.transformers.transformer_cosmos"
# Every guider made (the modular pipeline makes one per CFG setting) warns that guiders are an
# experimental feature.
GUIDER_LOGGER = "diffusers.guiders.guider_utils"
# Each enclosing block of a modular pipeline logs an exception, with its traceback, as it passes
# through: one Stop or out-of-memory would print five tracebacks. The exception still propagates.
BLOCK_ERROR_LOGGER = "diffusers.modular_pipelines.modular_pipeline"


class InterpolationMode(Enum):
    """The one torchvision interpolation mode the shim implements (values as torchvision's)."""

    NEAREST = "nearest"


def nearest_resize(image: torch.Tensor, size: list[int], interpolation=InterpolationMode.NEAREST, **_ignored) -> torch.Tensor:
    """torchvision's `transforms.functional.resize` for tensors with NEAREST interpolation.

    `image` is [..., H, W] (any number of leading dimensions); `size` is [new_h, new_w]. Other
    keyword arguments torchvision accepts (max_size, antialias) do not change a nearest resize of
    an exact [h, w] size and are ignored.
    """
    import torch

    if getattr(interpolation, "value", interpolation) != "nearest":
        raise ValueError(f"the torchvision shim only implements NEAREST resizing, not {interpolation}")
    if not isinstance(image, torch.Tensor) or image.ndim < 2:
        raise TypeError("the torchvision shim resizes tensors of shape [..., H, W] only")
    if len(size) != 2:
        raise ValueError(f"the torchvision shim needs an exact [height, width] size, got {size!r}")
    height, width = (int(side) for side in size)
    leading = image.shape[:-2]
    # interpolate wants [N, C, H, W] in a floating dtype; masks may come as bool or integers.
    flat = image.reshape(1, -1, *image.shape[-2:])
    work = flat if flat.is_floating_point() else flat.float()
    resized = torch.nn.functional.interpolate(work, size=(height, width), mode="nearest")
    return resized.to(image.dtype).reshape(*leading, height, width)


def torchvision_available() -> bool:
    """What diffusers itself checked when it decided whether to import torchvision."""
    from diffusers.utils import is_torchvision_available

    return is_torchvision_available()


def ensure_cosmos_resize() -> bool:
    """Give diffusers' Cosmos transformer module a `transforms` when torchvision is absent.

    Returns True when the shim is in place (now or from an earlier call), False when torchvision
    is installed and the module uses the real thing.
    """
    import importlib

    module = importlib.import_module(COSMOS_MODULE)
    if getattr(module, "transforms", None) is not None:
        return bool(getattr(module.transforms, "is_studio_shim", False))
    if torchvision_available():  # pragma: no cover - torchvision is never installed here
        return False
    module.transforms = SimpleNamespace(
        functional=SimpleNamespace(resize=nearest_resize),
        InterpolationMode=InterpolationMode,
        is_studio_shim=True,
    )
    return True


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence the logger `name` for the duration of the block, then restore its level."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
