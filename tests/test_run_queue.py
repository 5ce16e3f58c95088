"""The run queue: a file in the workspace, runs one after another, reorder and cancel, a failed
run does not stop it, Stop pauses it, and a restart resumes the run that was cut off."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from studio.errors import ConfigError, StudioError
from studio.training.queue import QueueRunner, RunQueue
from tests.train_fixtures import fast_config


def config(tmp_path, name, **changes):
    return fast_config(tmp_path, output_name=name, **changes)


class FakeJob:
    def __init__(self, status="done", state="done", error=None):
        self.state, self.error = state, error
        self.result = SimpleNamespace(status=status, message=status)

    def wait(self, timeout=None):
        return True


def test_the_queue_is_a_file_that_keeps_order_moves_and_cancels(tmp_path):
    queue = RunQueue(tmp_path)
    a, b, c = (queue.add(config(tmp_path, name)) for name in ("a", "b", "c"))
    assert [e.name for e in RunQueue(tmp_path).read().entries] == ["a", "b", "c"], "another reader sees it"
    queue.move(c.id, -1)
    queue.move(a.id, +5)
    assert [e.name for e in queue.read().entries] == ["c", "b", "a"]
    queue.cancel(b.id)
    with pytest.raises(ConfigError, match="cancelled, not waiting"):
        queue.cancel(b.id)
    with pytest.raises(ConfigError, match="no queued run 'nope'"):
        queue.move("nope", 1)
    assert [(e.name, e.state) for e in queue.read().entries] == [("c", "waiting"), ("b", "cancelled"), ("a", "waiting")]
    assert queue.read().entries[0].config["output_name"] == "c"


def test_runs_go_one_after_another_and_a_failure_does_not_stop_the_queue(tmp_path):
    queue = RunQueue(tmp_path)
    for name in ("first", "broken", "last"):
        queue.add(config(tmp_path, name))
    started = []

    def start(entry, cfg, run_dir, resume):
        started.append((cfg.output_name, resume))
        if cfg.output_name == "broken":
            return FakeJob(status="failed", state="failed", error="no images in the dataset")
        return FakeJob()

    runner = QueueRunner(queue, tmp_path / "runs", start, busy=lambda: False)
    while runner.run_next():
        pass
    assert started == [("first", False), ("broken", False), ("last", False)]
    states = [(e.name, e.state) for e in queue.read().entries]
    assert states == [("first", "done"), ("broken", "failed"), ("last", "done")]
    assert queue.read().entries[1].message == "no images in the dataset"


def test_stop_pauses_the_queue_and_a_busy_gpu_keeps_the_runs_place(tmp_path):
    queue = RunQueue(tmp_path)
    queue.add(config(tmp_path, "stopped"))
    queue.add(config(tmp_path, "next"))
    runner = QueueRunner(queue, tmp_path / "runs", lambda *a: FakeJob(status="stopped"), busy=lambda: False)
    runner.run_next()
    assert queue.read().paused and runner.run_next() is None, "Stop pauses the queue"
    queue.set_paused(False)

    def busy_start(*args):
        raise StudioError("the GPU is busy: generation is running.")

    QueueRunner(queue, tmp_path / "runs", busy_start, busy=lambda: False).run_next()
    assert [(e.name, e.state) for e in queue.read().entries] == [("stopped", "stopped"), ("next", "waiting")]


def test_a_run_cut_off_by_a_restart_resumes_first(tmp_path):
    queue = RunQueue(tmp_path)
    queue.add(config(tmp_path, "waiting"))
    queue.add(config(tmp_path, "was-training"))
    with queue.editing() as state:
        state.entries[1].state = "running"
        state.entries[1].run_dir = str(tmp_path / "runs" / "was-training-1")
    (tmp_path / "runs" / "was-training-1" / "state" / "step-0000002").mkdir(parents=True)
    (tmp_path / "runs" / "was-training-1" / "state" / "step-0000002" / "trainer.json").write_text("{}")
    started = []
    runner = QueueRunner(queue, tmp_path / "runs", lambda e, c, d, r: started.append((c.output_name, d.name, r))
                         or FakeJob(), busy=lambda: False)
    runner.queue.recover()
    runner.run_next()
    assert started == [("was-training", "was-training-1", True)]


def test_writers_in_threads_never_lose_an_entry(tmp_path):
    queue = RunQueue(tmp_path)
    cfg = config(tmp_path, "x")
    threads = [threading.Thread(target=lambda: [queue.add(cfg) for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(queue.read().entries) == 40


def test_the_app_context_trains_the_queue_in_the_background(tmp_path, demo_models_dir):
    from studio.context import AppContext
    from studio.jobs import JobRunner
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.settings import Settings
    from tests.train_fixtures import make_dataset

    settings = Settings(workspace=tmp_path / "ws", demo=True)
    settings.ensure_workspace()
    ctx = AppContext(settings, ModelManager(demo_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU")),
                     JobRunner())
    data = make_dataset(settings.datasets_dir / "chars", count=2)
    for name in ("q1", "q2"):
        ctx.run_queue.add(fast_config(data, output_name=name, max_train_steps=2, train_batch_size=1))
    runner = ctx.start_queue()
    runner.poll = 0.1
    deadline = time.monotonic() + 300
    while [e.state for e in ctx.run_queue.read().entries] != ["done", "done"]:
        assert time.monotonic() < deadline, ctx.run_queue.read()
        time.sleep(0.2)
    runner.close()
    for entry in ctx.run_queue.read().entries:
        assert (tmp_path / "ws" / "runs").joinpath(entry.run_dir).joinpath("loras").is_dir()


def test_the_cli_queues_lists_moves_cancels_and_runs(tmp_path, demo_models_dir, capsys, monkeypatch):
    from studio.__main__ import main
    from tests.train_fixtures import make_dataset

    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "data", count=2)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "models").symlink_to(demo_models_dir, target_is_directory=True)
    common = ["--preset", "demo-sdxl", "--dataset", str(data), "--max-steps", "2", "--workspace", "ws"]
    for name in ("one", "two", "three"):
        assert main(["queue", "add", *common, "--output-name", name]) == 0
    out = capsys.readouterr().out
    assert "queued three as" in out and "(place 3)" in out
    ids = [e.id for e in RunQueue(tmp_path / "ws").read().entries]
    assert main(["queue", "move", ids[2], "-2", "--workspace", "ws"]) == 0
    assert main(["queue", "cancel", ids[1], "--workspace", "ws"]) == 0
    assert main(["queue", "cancel", "nope", "--workspace", "ws"]) == 2
    capsys.readouterr()
    assert main(["queue", "list", "--workspace", "ws"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[2:4] for line in listed] == [["waiting", "three"], ["waiting", "one"], ["cancelled", "two"]]
    assert main(["queue", "run", "--workspace", "ws"]) == 0
    assert [(e.name, e.state) for e in RunQueue(tmp_path / "ws").read().entries] == [
        ("three", "done"), ("one", "done"), ("two", "cancelled")]
    assert "the queue is empty" in capsys.readouterr().out


def test_a_generation_asked_to_wait_waits_for_training_and_goes_before_the_queue(tmp_path, demo_models_dir):
    from studio.context import AppContext
    from studio.jobs import JobRunner
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.settings import Settings
    from studio.ui.forms import GENERATE_FIELDS
    from studio.ui.generate_tab import _start_generation
    from tests.test_forms import form_values

    settings = Settings(workspace=tmp_path / "ws", demo=True)
    settings.ensure_workspace()
    manager = ModelManager(demo_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    ctx = AppContext(settings, manager, JobRunner())
    release = threading.Event()

    def training(job):
        with manager.gpu_lane("training x", exclusive=True):
            release.wait(60)

    assert ctx.jobs.start("train", training).running
    values = form_values(width=64.0, height=64.0, steps=2.0, batch_count=1, seed=1.0)
    refused = _start_generation(ctx, tuple({**values, "wait_for_training": False}[n] for n in GENERATE_FIELDS))
    refused.wait(60)
    assert refused.state == "failed" and "is busy" in refused.error, "not asked to wait: refused at once"
    waiting = _start_generation(ctx, tuple({**values, "wait_for_training": True}[n] for n in GENERATE_FIELDS))
    deadline = time.monotonic() + 30
    while "waiting for the training run" not in waiting.message:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ctx.waiting_generations == 1, "the queue's next run holds back"
    release.set()
    waiting.wait(120)
    assert waiting.state == "done" and len(waiting.result.images) == 1 and ctx.waiting_generations == 0
