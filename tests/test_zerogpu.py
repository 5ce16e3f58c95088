"""ZeroGPU, end to end on the CPU: `python app.py` with no arguments and a Space's variables, the
real `spaces` package (its forked GPU worker, pickling, scheduling) against a stand-in of the
ZeroGPU device API on 127.0.0.1. Only what a CPU build of torch lacks is emulated
(tests/zerogpu/sitecustomize.py says what and why)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tests.app_server import ROOT, AppServer
from tests.zerogpu.device_api import DeviceAPI

pytestmark = pytest.mark.filterwarnings("ignore")


def space_env(workspace: Path, **extra) -> dict:
    """The variables Hugging Face Spaces sets, plus the studio's own Space settings."""
    return {
        "SPACE_ID": "someone/anime-lora-studio", "SYSTEM": "spaces", "GRADIO_SERVER_NAME": "0.0.0.0",
        "STUDIO_WORKSPACE": str(workspace), "STUDIO_DEMO": "1", **extra,
    }


@pytest.fixture(scope="module")
def zerogpu(tmp_path_factory):
    root = tmp_path_factory.mktemp("zerogpu")
    with DeviceAPI() as api:
        env = space_env(root / "persistent-ws", SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=api.url,
                        ZEROGPU_OFFLOAD_DIR=str(root / "offload"),
                        PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "zerogpu"), str(ROOT)]))
        server = AppServer(root, argv=[], env=env)
        try:
            server.wait_until_serving(timeout=120)
            yield server, api
        finally:
            server.stop()


def client_for(server):
    from gradio_client import Client

    return Client(server.url, verbose=False, analytics_enabled=False)


def test_listens_on_every_interface_with_gpu_functions_reported_at_startup(zerogpu):
    server, api = zerogpu
    addresses = {c.laddr.ip for c in psutil.Process(server.process.pid).net_connections() if c.status == "LISTEN"}
    assert "0.0.0.0" in addresses, server.output()
    assert "/startup-report" in api.paths(), "no GPU function existed when the app launched"


@pytest.mark.slow  # ~20 s: run by .ci/run's second command (-m "slow or full_size")
def test_generate_runs_in_a_gpu_call_and_larger_requests_ask_for_longer(zerogpu):
    server, api = zerogpu
    client = client_for(server)
    before = len(api.durations())
    small = client.predict("1girl, solo", steps=2, width=256, height=256, seed=1, api_name="/generate")
    large = client.predict("1girl, solo", steps=20, width=512, height=512, batch_size=4, seed=2,
                           api_name="/generate")
    assert len(small) == 1 and len(large) == 4
    assert Path(small[0]["image"]).is_file()
    durations = api.durations()[before:]
    assert len(durations) == 2, server.output()
    assert durations[0] < durations[1] <= 300
    # the images were written into the workspace the Space was given
    assert list((server.workspace / "persistent-ws" / "outputs").rglob("*.png")), server.output()


def test_stop_reaches_the_gpu_worker_within_seconds(zerogpu):
    import time

    from gradio_client.exceptions import AppError

    server, api = zerogpu
    client = client_for(server)
    job = client.submit("1girl, solo", steps=100, width=512, height=512, batch_size=4, seed=3, api_name="/generate")
    time.sleep(4)  # the call is under way in the worker
    client.predict(api_name="/stop")
    stopped = time.monotonic()
    with pytest.raises(AppError, match="stopped"):
        job.result(timeout=60)
    assert time.monotonic() - stopped < 15
    small = client.predict("1girl", steps=1, width=256, height=256, api_name="/generate")
    assert len(small) == 1, "the worker takes the next call"


def test_training_is_refused_with_the_zerogpu_message(zerogpu, tmp_path):
    from gradio_client.exceptions import AppError

    server, _ = zerogpu
    dataset = server.workspace / "persistent-ws" / "datasets" / "chars"
    dataset.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(dataset / "a.png")
    (dataset / "a.txt").write_text("1girl, red")
    with pytest.raises(AppError, match="dedicated GPU Space"):
        client_for(server).predict("chars", preset="demo-sdxl", max_train_steps=2, api_name="/train")


def test_captioning_runs_as_gpu_calls_per_batch(zerogpu):
    server, api = zerogpu
    dataset = server.workspace / "persistent-ws" / "datasets" / "tagme"
    dataset.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, color in enumerate(("red", "blue", "green")):
        Image.new("RGB", (64, 48), color).save(dataset / f"{i}.png")
    before = len(api.durations())
    summary, details = client_for(server).predict("tagme", tagger="demo-tagger", trigger="mychar",
                                                  api_name="/caption")
    assert len(api.durations()) == before + 1, "3 images are one batch, one GPU call"
    for i in range(3):
        assert (dataset / f"{i}.txt").read_text().startswith("mychar, "), summary


@pytest.mark.slow  # ~15-20 s: run by .ci/run's second command (-m "slow or full_size")
def test_a_dedicated_gpu_space_starts_the_same_way_and_trains(tmp_path):
    import time

    from tests.train_fixtures import make_dataset

    server = AppServer(tmp_path, argv=[], env=space_env(tmp_path / "ws"))
    try:
        server.wait_until_serving(timeout=90)
        make_dataset(tmp_path / "ws" / "datasets" / "space-train")
        client = client_for(server)
        run_dir, started = client.predict("space-train", preset="demo-sdxl", max_train_steps=2, api_name="/train")
        assert Path(run_dir).parent == (tmp_path / "ws" / "runs").resolve(), started
        deadline = time.monotonic() + 240
        while True:
            text, details = client.predict(api_name="/train_status")
            if details["state"] not in ("running", "stopping") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert details["state"] == "done" and details["step"] == 2, text
        assert Path(details["checkpoints"][-1]).is_file()
    finally:
        server.stop()
