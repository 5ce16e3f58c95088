"""The app-level context: the one model manager, the job runner and the settings, shared by every
tab. Heavy shared objects live here, not in gr.State (which must be deep-copyable)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.jobs import JobRunner
from studio.models.manager import ModelManager
from studio.settings import Settings

USERS_DIR = "users"  # a multi-user Space: workspace/users/<Hugging Face username>/
VISITORS_DIR = "visitors"  # signed-out visitors' generations (they may do nothing else)
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass
class AppContext:
    """What every tab works with. On a multi-user Space there is one per signed-in user (their own
    workspace folder, jobs and datasets; the model manager is the app's one) and one for all
    signed-out visitors; `for_user` finds it."""

    settings: Settings
    manager: ModelManager
    jobs: JobRunner
    user: str | None = None  # the signed-in Hugging Face user, on a multi-user Space
    _datasets: dict[Path, Any] = field(default_factory=dict)
    _datasets_lock: threading.Lock = field(default_factory=threading.Lock)
    _users: dict[str | None, AppContext] = field(default_factory=dict)
    _queue_runner: Any = None
    waiting_generations: int = 0  # generations that wait for training to end (the queue lets them go first)

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

    # -- users of a multi-user Space ------------------------------------------------------------------
    @property
    def is_visitor(self) -> bool:
        """Signed out on a multi-user Space: may generate with catalog models, nothing else."""
        return self.settings.multi_user and self.user is None

    def for_user(self, user: str | None) -> AppContext:
        """The context of a signed-in user (None: a signed-out visitor). Off multi-user Spaces
        everyone shares this one."""
        if not self.settings.multi_user:
            return self
        if user is not None and not USERNAME.fullmatch(user):
            raise StudioError(f"unusable user name {user!r}")
        with self._datasets_lock:
            if user not in self._users:
                folder = self.settings.workspace / (USERS_DIR + "/" + user if user else VISITORS_DIR)
                settings = self.settings.for_user(folder)
                if user is not None:
                    settings.ensure_workspace()
                self._users[user] = AppContext(settings, self.manager, JobRunner(), user=user)
            return self._users[user]

    # -- the run queue ------------------------------------------------------------------------------
    @property
    def run_queue(self):
        from studio.training.queue import RunQueue

        return RunQueue(self.settings.workspace)

    @contextmanager
    def generation_waiting(self):
        """While a generation waits for the training run to end, the queue starts no next run."""
        with self._datasets_lock:
            self.waiting_generations += 1
        try:
            yield
        finally:
            with self._datasets_lock:
                self.waiting_generations -= 1

    def training_running(self) -> bool:
        job = self.jobs.latest("train")
        return job is not None and job.running

    def start_queue(self):
        """The thread that trains the queue's runs one after another (started once per context)."""
        from studio.training.queue import QueueRunner

        with self._datasets_lock:
            if self._queue_runner is None:
                def busy() -> bool:
                    return self.training_running() or self.waiting_generations > 0 \
                        or self.manager.status().lane_owner is not None

                def start(entry, config, run_dir, resume):
                    from studio.ui.train_tab import start_run

                    return start_run(self, config, run_dir, resume)

                self._queue_runner = QueueRunner(self.run_queue, self.settings.runs_dir, start, busy).start()
        return self._queue_runner

    def resume_queues(self) -> list[AppContext]:
        """At start-up: the queue thread of every workspace whose queue has runs waiting (or cut off
        mid-run, which resume): this one, or on a multi-user Space each signed-in user's, so their
        queued runs go on after a restart without waiting for them to come back."""
        from studio.training.queue import RUNNING, WAITING

        contexts = [self]
        if self.settings.multi_user:
            users = self.settings.workspace / USERS_DIR
            folders = sorted(users.iterdir()) if users.is_dir() else []
            contexts = [self.for_user(folder.name) for folder in folders
                        if folder.is_dir() and not folder.is_symlink() and USERNAME.fullmatch(folder.name)]
        pending = [c for c in contexts if any(e.state in (WAITING, RUNNING) for e in c.run_queue.read().entries)]
        for context in pending:
            context.start_queue()
        return pending

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
