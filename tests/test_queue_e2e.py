"""The run queue through a running app: runs queued before a restart train when the app is back,
/train with queue=true queues through the API (a failing run is passed over), a run is cancelled,
and the Train tab's "Add to queue" shows the run in the queue table until it is done."""

from __future__ import annotations

import time

import pytest

from studio.training.queue import RunQueue
from tests.app_server import serving
from tests.train_fixtures import fast_config, make_dataset

SMALL = {"max_train_steps": 2, "train_batch_size": 1, "sample_every_n_steps": 0, "validation_images": 0,
         "save_every_n_epochs": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_models_dir):
    ws = tmp_path_factory.mktemp("queue-ws")
    (ws / "models").symlink_to(demo_models_dir, target_is_directory=True)
    data = make_dataset(ws / "datasets" / "chars", count=2)
    (ws / "datasets" / "empty").mkdir()
    RunQueue(ws).add(fast_config(data, output_name="before-restart", **{k: v for k, v in SMALL.items()
                                                                         if k != "save_every_n_epochs"}))
    with serving(ws) as server:
        yield server


def queue_states(client) -> dict:
    return {run["name"]: run["state"] for run in client.predict(api_name="/train_queue")["runs"]}


def wait_for(client, done, timeout=300):
    deadline = time.monotonic() + timeout
    while not done(states := queue_states(client)):
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    return states


@pytest.mark.slow  # ~15-20 s: run by .ci/run's second command (-m "slow or full_size")
def test_the_queue_survives_a_restart_and_passes_over_a_failed_run(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False, analytics_enabled=False)
    wait_for(client, lambda s: s.get("before-restart") == "done")
    broken = client.predict("empty", api_name="/train", output_name="broken", settings=SMALL, queue=True)
    ok = client.predict("chars", api_name="/train", output_name="after-broken", settings=SMALL, queue=True)
    assert broken[0].startswith("queue:") and "in the run queue" in ok[1]
    states = wait_for(client, lambda s: s.get("after-broken") in ("done", "failed"))
    assert states["broken"] == "failed" and states["after-broken"] == "done"
    runs = {run["name"]: run for run in client.predict(api_name="/train_queue")["runs"]}
    assert (server.workspace / "runs").joinpath(runs["after-broken"]["run_dir"]).joinpath(
        "loras", "after-broken.safetensors").is_file()


def test_add_to_queue_from_the_train_tab(server, browser):
    """Before the cancel test below: its Stop pauses the queue."""
    from gradio_client import Client

    # A page opened while a run trains shows that run's settings (its datasets already picked, so a
    # click on "chars" would unpick it): open it once the run queued before the restart is done.
    wait_for(Client(server.url, verbose=False, analytics_enabled=False), lambda s: s.get("before-restart") == "done")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server.url)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_selector("#train-queue-add", timeout=30_000)
        page.locator("#train-datasets input").click()
        page.get_by_role("option", name="chars").click()
        page.keyboard.press("Escape")
        page.locator("#train-max-steps input").fill("2")
        page.locator("#train-output-name textarea").fill("from-the-tab")
        page.locator("#train-queue-add").click()
        page.get_by_text("Run queue", exact=True).click()  # not the toast "... is in the run queue."
        page.locator("#train-queue").get_by_text("from-the-tab").wait_for(timeout=30_000)
        page.wait_for_function("/from-the-tab\\s+done/.test(document.querySelector('#train-queue')?.innerText)",
                               timeout=300_000)
        client = Client(server.url, verbose=False, analytics_enabled=False)
        for paused in (True, False):  # Pause / continue toggles the queue, and its note says so
            page.locator("#train-queue-pause").click()
            page.wait_for_function(f"document.querySelector('#train-queue-msg').innerText.includes('Paused') === "
                                   f"{str(paused).lower()}", timeout=30_000)
            assert client.predict(api_name="/train_queue")["paused"] is paused
    except Exception as exc:  # what the queue holds says more than a timeout; the cause stays chained
        page.screenshot(path=str(server.workspace / "queue-failure.png"), full_page=True)
        raise AssertionError(Client(server.url, verbose=False).predict(api_name="/train_queue")) from exc
    finally:
        page.close()


def test_a_waiting_run_is_cancelled_and_never_trains(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False, analytics_enabled=False)
    client.predict("chars", api_name="/train", max_train_steps=3000, output_name="long-one",
                   settings={**SMALL, "max_train_steps": 3000}, queue=True)
    queued = client.predict("chars", api_name="/train", output_name="cancel-me", settings=SMALL, queue=True)[0]
    out = client.predict(queued, api_name="/train_queue_cancel")
    assert out["cancelled"] == queued.removeprefix("queue:")
    wait_for(client, lambda s: s.get("long-one") == "running")
    deadline = time.monotonic() + 120
    while "Stopping" not in client.predict(api_name="/train_stop"):  # once its job holds the GPU
        assert time.monotonic() < deadline
        time.sleep(0.3)
    states = wait_for(client, lambda s: s.get("long-one") in ("stopped", "done", "failed"))
    assert states["cancel-me"] == "cancelled" and states["long-one"] == "stopped"
    assert client.predict(api_name="/train_queue")["paused"], "Stop pauses the queue"
