"""The app-level context: the one model manager, the job runner and the settings, shared by every
tab. Heavy shared objects live here, not in gr.State (which must be deep-copyable)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.jobs import JobRunner
from studio.models.manager import ModelManager
from studio.settings import Settings


def on_zerogpu() -> bool:
    """Hugging Face ZeroGPU Spaces set this; there GPU work must run inside `spaces.GPU`."""
    return os.environ.get("SPACES_ZERO_GPU") == "true"


@dataclass
class AppContext:
    settings: Settings
    manager: ModelManager
    jobs: JobRunner
    _datasets: dict[Path, Any] = field(default_factory=dict)
    _datasets_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings) -> AppContext:
        manager = ModelManager(settings.models_dir, requested_policy=settings.vram)
        return cls(settings, manager, JobRunner())

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

    def gpu_function(self, fn: Callable[..., Any], duration: int = 120) -> Callable[..., Any]:
        """`fn` wrapped for ZeroGPU when running there (each call gets a GPU for up to `duration`
        seconds); unchanged everywhere else, where the `spaces` package is not needed."""
        if not on_zerogpu():
            return fn
        import spaces

        return spaces.GPU(duration=duration)(fn)
