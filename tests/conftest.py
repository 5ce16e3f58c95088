"""Test-wide settings: everything offline, no telemetry, temp files under pytest's tmp dir."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """`python app.py --demo` on a free port with its own workspace, shared by the end-to-end
    tests (gradio_client and browser)."""
    from tests.app_server import serving

    with serving(tmp_path_factory.mktemp("app-workspace")) as server:
        yield server


@pytest.fixture(scope="session")
def chromium_path():
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory):
    """A models cache holding demo-sdxl (folder and single file), built once per test session."""
    from studio.models.demo import ensure_demo_sdxl

    models = tmp_path_factory.mktemp("models")
    ensure_demo_sdxl(models)
    return models


@pytest.fixture(scope="session")
def demo_manager(demo_models_dir):
    """One CPU model manager over the demo cache; loaded pipelines are reused across tests."""
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    return ModelManager(demo_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))


@pytest.fixture(scope="module")
def browser(chromium_path):
    """Debian's chromium through Playwright (its own browser download fails offline)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() starts from a fresh temporary profile of its own each time
        browser = playwright.chromium.launch(executable_path=chromium_path, args=LAUNCH_ARGS)
        yield browser
        browser.close()
