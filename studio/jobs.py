"""Background jobs: long work (a batch of generations, captioning a folder, a training run) runs
in a thread with a progress figure, an event log and a stop flag checked every step. The UI polls
a job; the CLI draws a bar from the same reports. No gradio here."""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studio.errors import JobStopped, StudioError, write_error

_ids = itertools.count(1)


@dataclass(frozen=True)
class JobEvent:
    time: float
    fraction: float | None
    message: str
    data: dict = field(default_factory=dict)


class Job:
    """One piece of long work. `fn(job)` calls `job.report(...)` and `job.check_stop()` as it goes."""

    def __init__(self, name: str, fn: Callable[[Job], Any], max_events: int = 2000):
        self.id = next(_ids)
        self.name = name
        self.state = "queued"  # queued -> running -> done | failed | stopped
        self.fraction: float | None = 0.0
        self.message = ""
        self.result: Any = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self.events: deque[JobEvent] = deque(maxlen=max_events)
        self._fn = fn
        self._stop = threading.Event()
        # The job runs in the starter's context (contextvars): e.g. the Gradio request, which a
        # ZeroGPU call reads to charge the visitor's own GPU quota.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=f"job-{self.id}-{name}",
                                        daemon=True)

    # -- control ------------------------------------------------------------------------------
    def start(self) -> Job:
        self.state = "running"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the job to stop at its next step."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- what the work calls ------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_event(self) -> threading.Event:
        return self._stop

    def check_stop(self) -> None:
        if self._stop.is_set():
            raise JobStopped(f"{self.name} stopped")

    def report(self, fraction: float | None, message: str, **data) -> None:
        self.fraction, self.message = fraction, message
        self.events.append(JobEvent(time.monotonic(), fraction, message, data))

    # -- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def _run(self) -> None:
        try:
            self.result = self._fn(self)
            self.state = "done"
        except JobStopped as exc:
            self.state, self.message = "stopped", str(exc)
        except StudioError as exc:
            self.state, self.error = "failed", str(exc)
        except OSError as exc:  # a full disk or a folder it may not write: one clear line
            self.state, self.error = "failed", str(write_error(exc.filename or "a file", exc))
        except Exception as exc:  # a bug: keep the app alive, show what happened
            self.state = "failed"
            self.error = f"{exc.__class__.__name__}: {exc}"
            traceback.print_exc()
        finally:
            self.finished = time.monotonic()


class JobRunner:
    """Keeps the jobs of this process so the UI can find them again after a page reload."""

    def __init__(self, keep: int = 50):
        self._jobs: dict[int, Job] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def start(self, name: str, fn: Callable[[Job], Any]) -> Job:
        job = Job(name, fn)
        with self._lock:
            self._jobs[job.id] = job
            for old in sorted(self._jobs)[: max(0, len(self._jobs) - self._keep)]:
                if not self._jobs[old].running:
                    del self._jobs[old]
        return job.start()

    def get(self, job_id: int | None) -> Job | None:
        return self._jobs.get(job_id) if job_id is not None else None

    def latest(self, name: str) -> Job | None:
        with self._lock:
            matching = [j for j in self._jobs.values() if j.name == name]
        return matching[-1] if matching else None
