"""The app-level context: the one model manager, the job runner and the settings, shared by every
tab. Heavy shared objects live here, not in gr.State (which must be deep-copyable)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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

    @classmethod
    def create(cls, settings: Settings) -> AppContext:
        manager = ModelManager(settings.models_dir, requested_policy=settings.vram)
        return cls(settings, manager, JobRunner())

    def gpu_function(self, fn: Callable[..., Any], duration: int = 120) -> Callable[..., Any]:
        """`fn` wrapped for ZeroGPU when running there (each call gets a GPU for up to `duration`
        seconds); unchanged everywhere else, where the `spaces` package is not needed."""
        if not on_zerogpu():
            return fn
        import spaces

        return spaces.GPU(duration=duration)(fn)
