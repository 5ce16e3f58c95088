"""The app-level context: the one model manager, the job runner and the settings, shared by every
tab. Heavy shared objects live here, not in gr.State (which must be deep-copyable)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.jobs import JobRunner
from studio.models.manager import ModelManager
from studio.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    manager: ModelManager
    jobs: JobRunner
    _datasets: dict[Path, Any] = field(default_factory=dict)
    _datasets_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings) -> AppContext:
        device = None
        if settings.zero_gpu:  # the app's own process never has the GPU: models wait in RAM, in bf16
            from studio.models.devices import DeviceInfo

            device = DeviceInfo("cpu", "ZeroGPU (a GPU is attached for each call)", bf16=True)
        manager = ModelManager(settings.models_dir, requested_policy=settings.vram, device=device)
        if settings.zero_gpu:
            from studio import spaces_gpu

            spaces_gpu.bind(manager)
        return cls(settings, manager, JobRunner())

    def preload_default_model(self) -> None:
        """Load the default model into RAM now (ZeroGPU: its worker inherits it when forked)."""
        source = self.manager.resolve(self.settings.default_model)
        print(f"Loading {source.name} into RAM for ZeroGPU ...", flush=True)
        self.manager.get(source)

    # -- GPU work: in this process, or as ZeroGPU calls -----------------------------------------------
    def generate_function(self) -> Callable[..., Any]:
        """generate(), or on ZeroGPU its one-GPU-call twin of the same signature."""
        if self.settings.zero_gpu:
            from studio.spaces_gpu import generate_in_call

            return generate_in_call
        from studio.generation.generate import generate

        return generate

    def caption_gpu_calls(self):
        """None (caption in this process), or on ZeroGPU one GPU call per batch of images."""
        if not self.settings.zero_gpu:
            return None
        from studio.spaces_gpu import caption_calls

        return caption_calls()

    def dataset(self, folder: str | Path):
        """The one Dataset object of a folder (its lock and undo history are shared by every tab
        and job). The folder must lie inside the workspace."""
        from studio.dataset.dataset import Dataset
        from studio.errors import ConfigError
        from studio.fileio import inside

        path = Path(folder).expanduser()
        path = (path if path.is_absolute() else self.settings.datasets_dir / path).resolve()
        if not inside(path, self.settings.workspace):
            raise ConfigError(f"dataset {folder} is outside the workspace; put it under {self.settings.datasets_dir}")
        with self._datasets_lock:
            if path not in self._datasets:
                self._datasets[path] = Dataset(path)
            return self._datasets[path]
