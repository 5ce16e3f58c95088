"""The tagger on a GPU Space: swap the CPU build of onnxruntime for onnxruntime-gpu of the same
version before anything imports it.

requirements.txt names `onnxruntime` (the CPU build) because the two packages conflict (they
install the same `onnxruntime` module) and no requirement marker can tell a GPU machine from a
CPU one; a Space builds its image the same way for every hardware. So the app makes the swap
itself when it starts in a Space that has an NVIDIA GPU (dedicated or ZeroGPU), once per
container, and keeps the CPU build if the swap fails. Elsewhere nothing changes: local GPU users
install onnxruntime-gpu themselves (README).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

NVIDIA_DRIVER = Path("/proc/driver/nvidia/gpus")
Run = Callable[[list[str]], int]


def _pip(args: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False).returncode


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def has_nvidia_gpu(driver: Path = NVIDIA_DRIVER) -> bool:
    """An NVIDIA driver with a GPU (ZeroGPU shows its driver to the app's process too, as the
    `spaces` package relies on)."""
    return driver.is_dir() and any(driver.iterdir())


def ensure_gpu_onnxruntime(pip: Run = _pip, version_of: Callable[[str], str | None] = installed) -> str:
    """Make onnxruntime the GPU build of the installed version; says what happened."""
    if version_of("onnxruntime-gpu"):
        return "onnxruntime-gpu is installed"
    version = version_of("onnxruntime")
    if version is None:
        return "onnxruntime is not installed: the tagger cannot run"
    print(f"GPU Space: replacing onnxruntime {version} (CPU) with onnxruntime-gpu {version} for the tagger",
          flush=True)
    if pip(["uninstall", "-y", "-q", "onnxruntime"]) != 0:
        return "could not uninstall onnxruntime: the tagger runs on the CPU"
    if pip(["install", "-q", "--no-deps", f"onnxruntime-gpu=={version}"]) == 0:
        return f"onnxruntime-gpu {version} installed: the tagger runs on the GPU"
    pip(["install", "-q", "--no-deps", f"onnxruntime=={version}"])  # put the CPU build back
    return f"onnxruntime-gpu {version} could not be installed: the tagger runs on the CPU"
