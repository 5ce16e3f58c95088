"""What hardware there is. Probed when asked (never at import), so tests can pass their own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """The execution device (where models run) and how much memory it has free."""

    execution_device: str  # "cuda:0", "mps" or "cpu"
    name: str
    total_bytes: int | None = None  # accelerator memory; None on CPU
    free_bytes: int | None = None
    bf16: bool = False

    @property
    def accelerator(self) -> bool:
        return self.execution_device != "cpu"


def enable_tf32() -> bool:
    """TF32 for float32 matmuls and convolutions on Ampere and newer cards (what kohya and
    diffusers' training scripts turn on): up to 8x faster fp32 math at bf16-like mantissa, which
    only the float32 parts of a run use (the VAE, the fp32 network). True when turned on."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def probe_devices() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        enable_tf32()
        free, total = torch.cuda.mem_get_info(0)
        return DeviceInfo("cuda:0", torch.cuda.get_device_name(0), total, free, torch.cuda.is_bf16_supported())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceInfo("mps", "Apple MPS", None, None, False)
    return DeviceInfo("cpu", "CPU")


def free_accelerator_memory(device: DeviceInfo | None = None) -> None:
    """Return cached blocks to the driver after models were dropped. With `device`, only when it
    is a CUDA device (ZeroGPU's app process reports CUDA available but must never touch it)."""
    import gc

    import torch

    gc.collect()
    if (device is None or device.execution_device.startswith("cuda")) and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
