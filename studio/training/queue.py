"""The run queue: training runs that wait their turn and then train one after another.

The queue is one file, `workspace/queue.json`, so it survives a restart of the app: waiting runs
start when the app is back, and a run that was training when the app went down is resumed from
its last checkpoint (or started again, if it had none). Each entry holds the run's whole,
validated config. A failed run is marked and the next one starts; Stop pauses the queue (the
stopped run keeps its checkpoint and can be resumed from the Train tab).

`RunQueue` is the file (atomic writes under a lock, so the app's thread, the UI and a
`python -m studio queue` command in another process never lose an entry to each other), and
`QueueRunner` starts the next run whenever the GPU lane is free. No gradio here."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from studio.errors import BusyError, ConfigError, StudioError
from studio.fileio import atomic_write_text

QUEUE_FILE = "queue.json"
MAX_ENTRIES = 200  # a request cannot grow the file without bound
WAITING, RUNNING, DONE, FAILED, STOPPED, CANCELLED = "waiting", "running", "done", "failed", "stopped", "cancelled"
ENDED = (DONE, FAILED, STOPPED, CANCELLED)


@dataclass
class QueueEntry:
    id: str
    name: str
    config: dict  # TrainConfig as JSON
    state: str = WAITING
    added: str = ""
    run_dir: str = ""
    message: str = ""
    resume: bool = False  # set when the app went down while it trained

    @property
    def waiting(self) -> bool:
        return self.state == WAITING


@dataclass
class QueueState:
    entries: list[QueueEntry] = field(default_factory=list)
    paused: bool = False


class RunQueue:
    """The queue file of one workspace."""

    _locks: ClassVar[dict[Path, threading.Lock]] = {}
    _locks_guard = threading.Lock()

    def __init__(self, workspace: Path):
        self.path = Path(workspace) / QUEUE_FILE
        with self._locks_guard:
            self._lock = self._locks.setdefault(self.path.resolve(), threading.Lock())

    # -- reading and writing --------------------------------------------------------------------
    def read(self) -> QueueState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return QueueState()
        except (OSError, ValueError) as exc:
            raise StudioError(f"the run queue {self.path} is unreadable ({exc}); fix or delete it") from None
        entries = [QueueEntry(**{k: v for k, v in e.items() if k in QueueEntry.__dataclass_fields__})
                   for e in data.get("entries", [])]
        return QueueState(entries, bool(data.get("paused", False)))

    @contextmanager
    def editing(self):
        """The queue, to change in place; written back atomically when the block ends. Other
        processes are kept out by an exclusive lock file, this process's threads by a lock."""
        with self._lock, _file_lock(self.path.with_suffix(".lock")):
            state = self.read()
            before = _dump(state)
            yield state
            if _dump(state) != before:  # an idle queue is only read
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, _dump(state))

    # -- what people do ---------------------------------------------------------------------------
    def add(self, config, name: str | None = None) -> QueueEntry:
        """Queue a validated TrainConfig; returns its entry (its position is its place in `entries`)."""
        entry = QueueEntry(uuid.uuid4().hex[:8], name or config.output_name, config.model_dump(mode="json"),
                           added=datetime.now(UTC).isoformat(timespec="seconds"))
        with self.editing() as state:
            if sum(1 for e in state.entries if e.state not in ENDED) >= MAX_ENTRIES:
                raise ConfigError(f"the queue holds {MAX_ENTRIES} runs already: let some finish or cancel them")
            state.entries.append(entry)
        return entry

    def cancel(self, entry_id: str) -> QueueEntry:
        with self.editing() as state:
            entry = _find(state, entry_id)
            if entry.state == RUNNING:
                raise ConfigError(f"{entry.name} is training now: press Stop to end it")
            if entry.state != WAITING:
                raise ConfigError(f"{entry.name} is {entry.state}, not waiting")
            entry.state, entry.message = CANCELLED, "cancelled"
        return entry

    def move(self, entry_id: str, offset: int) -> None:
        """Move a waiting run `offset` places among the waiting runs (-1: one earlier)."""
        with self.editing() as state:
            entry = _find(state, entry_id)
            if entry.state != WAITING:
                raise ConfigError(f"only waiting runs can be moved; {entry.name} is {entry.state}")
            waiting = [e for e in state.entries if e.state == WAITING]
            index = max(0, min(len(waiting) - 1, waiting.index(entry) + offset))
            waiting.remove(entry)
            waiting.insert(index, entry)
            order = iter(waiting)
            state.entries = [next(order) if e.state == WAITING else e for e in state.entries]

    def set_paused(self, paused: bool) -> None:
        with self.editing() as state:
            state.paused = paused

    def clear_ended(self) -> None:
        with self.editing() as state:
            state.entries = [e for e in state.entries if e.state not in ENDED]

    # -- what the runner does ---------------------------------------------------------------------
    def recover(self) -> list[QueueEntry]:
        """At start-up: a run marked running was cut off by the app going down; it waits again, to
        be resumed from its last checkpoint, at the head of the queue."""
        with self.editing() as state:
            cut = [e for e in state.entries if e.state == RUNNING]
            for entry in cut:
                entry.state, entry.resume, entry.message = WAITING, True, "the app stopped while it trained"
            state.entries = cut + [e for e in state.entries if e not in cut]
        return cut

    def take_next(self) -> QueueEntry | None:
        """The first waiting run, marked running; None when paused or nothing waits."""
        with self.editing() as state:
            if state.paused:
                return None
            entry = next((e for e in state.entries if e.state == WAITING), None)
            if entry is not None:
                entry.state, entry.message = RUNNING, "training"
            return entry

    def finish(self, entry_id: str, state_name: str, message: str = "", run_dir: str = "",
               pause: bool = False) -> None:
        with self.editing() as state:
            entry = _find(state, entry_id)
            entry.state, entry.message = state_name, message
            entry.run_dir = run_dir or entry.run_dir
            state.paused = state.paused or pause

    def started(self, entry_id: str, run_dir: str) -> None:
        with self.editing() as state:
            _find(state, entry_id).run_dir = run_dir


def _dump(state: QueueState) -> str:
    return json.dumps({"entries": [asdict(e) for e in state.entries], "paused": state.paused}, indent=1)


def _find(state: QueueState, entry_id: str) -> QueueEntry:
    entry = next((e for e in state.entries if e.id == entry_id), None)
    if entry is None:
        raise ConfigError(f"no queued run {entry_id!r}")
    return entry


@contextmanager
def _file_lock(path: Path, timeout: float = 10.0):
    """An exclusive lock between processes: the lock file is created exclusively and removed
    after; one older than a minute is a crashed holder's and is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            break
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime > 60:
                    path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise StudioError(f"the run queue is locked by another process ({path}); try again") from None
            time.sleep(0.02)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


class QueueRunner:
    """Starts the queue's next run whenever no training runs and no generation waits for the GPU.
    `start(entry, config, run_dir, resume)` starts a training job and returns it (the app's
    `_start`); the runner polls it and records how it ended."""

    def __init__(self, queue: RunQueue, runs_dir: Path, start: Callable, busy: Callable[[], bool],
                 poll: float = 1.0):
        self.queue, self.runs_dir, self._start, self._busy, self.poll = queue, Path(runs_dir), start, busy, poll
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    def start(self) -> QueueRunner:
        self.queue.recover()
        self._thread = threading.Thread(target=self._loop, name="run-queue", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._halt.set()

    def _loop(self) -> None:
        said = ""
        while not self._halt.is_set():
            try:
                if not self._busy():
                    self.run_next()
                said = ""
            except Exception as exc:  # noqa: BLE001 - the queue thread must outlive one bad entry or file
                if str(exc) != said:  # once, not every poll
                    said = str(exc)
                    print(f"run queue: {exc}", flush=True)
            self._halt.wait(self.poll)

    def run_next(self, wait: bool = True) -> QueueEntry | None:
        """Start the next waiting run and (with `wait`) see it to its end. Returns its entry."""
        from studio.training.config import TrainConfig
        from studio.training.runs import new_run_dir

        entry = self.queue.take_next()
        if entry is None:
            return None
        try:
            config = TrainConfig.model_validate(entry.config)
            resume = entry.resume and entry.run_dir and Path(entry.run_dir).is_dir()
            if resume:
                from studio.training.checkpoint import list_states

                resume = bool(list_states(Path(entry.run_dir)))
            run_dir = Path(entry.run_dir) if resume else new_run_dir(self.runs_dir, config.output_name)
            self.queue.started(entry.id, str(run_dir))
            job = self._start(entry, config, run_dir, bool(resume))
        except (StudioError, ValueError) as exc:
            if isinstance(exc, BusyError) or "is busy" in str(exc):  # another job took the GPU first
                self.queue.finish(entry.id, WAITING, "waiting: the GPU was busy")
                return None
            self.queue.finish(entry.id, FAILED, f"could not start: {exc}")
            return entry
        if not wait:
            return entry
        job.wait()
        result = job.result
        if job.state == "failed" and "is busy" in (job.error or ""):  # another job took the GPU first
            self.queue.finish(entry.id, WAITING, "waiting: the GPU was busy")
        elif job.state == "failed" or (result is not None and result.status == "failed"):
            self.queue.finish(entry.id, FAILED, job.error or getattr(result, "message", "failed"), str(run_dir))
        elif result is not None and result.status == "stopped":
            self.queue.finish(entry.id, STOPPED, f"{result.message}; the queue is paused", str(run_dir), pause=True)
        else:
            self.queue.finish(entry.id, DONE, getattr(result, "message", "done"), str(run_dir))
        return entry
