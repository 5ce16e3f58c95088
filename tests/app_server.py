"""Start `python app.py` in a subprocess for end-to-end tests, and wait until it serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`python app.py --demo --port P --workspace W *extra`; or, with `argv` given, `python app.py
    *argv` and the port in GRADIO_SERVER_PORT (as a Space starts it). `env` adds variables."""

    def __init__(self, workspace: Path, *extra: str, argv: list[str] | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workspace = workspace
        env = dict(os.environ, GRADIO_TEMP_DIR=str(workspace / "gradio-tmp"), PYTHONUNBUFFERED="1", **(env or {}))
        if argv is None:
            argv = ["--demo", "--port", str(self.port), "--workspace", str(workspace), *extra]
        else:
            env["GRADIO_SERVER_PORT"] = str(self.port)
        self.log = open(workspace / "app.log", "w")
        self.started = time.monotonic()
        # its own process group: stop() also ends what it started (ZeroGPU's forked workers)
        self.process = subprocess.Popen([sys.executable, "app.py", *argv], cwd=ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_serving(self, timeout: float = 60) -> float:
        """Seconds from start until the page answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"app did not serve within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.workspace / "app.log").read_text()

    def stop(self) -> None:
        import signal

        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of its group still running
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()


@contextmanager
def serving(workspace: Path, *extra: str, **kwargs) -> Iterator[AppServer]:
    """An AppServer that answers, stopped at the end (for a module's server fixture)."""
    server = AppServer(workspace, *extra, **kwargs)
    try:
        server.startup_seconds = server.wait_until_serving()
        yield server
    finally:
        server.stop()
