"""The checkpoint evaluation in the app: /evaluate and /evaluate_stop through gradio_client, and the
Train tab's Evaluate panel in the browser (run picker, Evaluate, progress, table, plot, verdict,
Stop). The quick test uses the shared demo app; the end-to-end ones an app of their own over a
workspace holding a trained demo run."""

from __future__ import annotations

import json
import time

import pytest

from tests.app_server import serving
from tests.evaluation_fixtures import TINY, copy_run, train_run, workspace_with_models

pytestmark = pytest.mark.filterwarnings("ignore")
TINY_SETTINGS = {k: v for k, v in TINY.items() if k != "seeds"}


def client_for(url: str):
    from gradio_client import Client

    return Client(url, analytics_enabled=False, verbose=False)


def test_evaluate_endpoint_refuses_bad_values_and_runs_outside_the_workspace(app_server):
    from gradio_client.exceptions import AppError

    client = client_for(app_server.url)
    for kwargs, message in (
        ({"run": "../../../etc"}, "run '../../../etc' is not usable"),
        ({"run": "/etc"}, "run '/etc' is not usable"),
        ({"run": "no-such-run"}, "there is no training run 'no-such-run'"),
        ({"run": "x" * 20_000}, "there is no training run 'xxx"),
        ({"seeds": 99}, "seeds: Input should be less than or equal to 8"),
        ({"seeds": "two"}, "seeds: expected a number"),
        ({"settings": {"width": 5000}}, "width: Input should be less than or equal to 2048"),
        ({"settings": {"steps": 10_000}}, "steps: Input should be less than or equal to 100"),
        ({"settings": ["steps"]}, "settings: expected an object"),
        ({"checkpoints": ["../../x.safetensors"]}, "is not a checkpoint's file name"),
    ):
        with pytest.raises(AppError, match=message):
            client.predict(api_name="/evaluate", **kwargs)
    assert client.predict(api_name="/evaluate_stop") == "No evaluation is going."


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_models_dir):
    """An app of its own over a workspace holding a trained demo run (two concepts, two checkpoints)."""
    ws = workspace_with_models(tmp_path_factory.mktemp("eval-app"), demo_models_dir)
    train_run(ws, "pair")
    with serving(ws) as server:
        yield server


@pytest.mark.slow
def test_evaluate_endpoint_scores_a_run_and_stop_keeps_the_finished_checkpoints(server):
    run = server.workspace / "runs" / "pair"
    client = client_for(server.url)
    text, data = client.predict(api_name="/evaluate", run="pair", seeds=1, settings=TINY_SETTINGS)
    assert text.startswith("Done") and "2 checkpoint(s) evaluated" in text and "Recommended checkpoint" in text
    assert [(c["file"], c["step"]) for c in data["checkpoints"]] == [("pair-step00000003.safetensors", 3),
                                                                    ("pair.safetensors", 6)]
    assert set(data["checkpoints"][1]["scores"]) == {"alice", "bob"}
    assert {"fidelity", "bleed", "flexibility"} <= set(data["checkpoints"][1]["scores"]["alice"])
    assert "images" not in data["checkpoints"][0], "the per-image records stay in the file"
    assert data["evaluation_file"] == str(run.resolve() / "evaluation" / "evaluation.json")
    saved = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert saved["recommended"] == data["recommended"] and saved["not_learned"] == data["not_learned"]
    # the same again: nothing to draw
    text, _ = client.predict(api_name="/evaluate", run="pair", seeds=1, settings=TINY_SETTINGS)
    assert "0 checkpoint(s) evaluated, 2 already done" in text

    stopped = copy_run(run, "pair-stop")
    job = client.submit(api_name="/evaluate", run="pair-stop", seeds=1, settings=TINY_SETTINGS)
    deadline = time.monotonic() + 300
    while not (stopped / "evaluation" / "evaluation.json").is_file():  # the base model's set is done
        assert time.monotonic() < deadline and not job.done(), job.result() if job.done() else "too slow"
        time.sleep(0.1)
    assert client.predict(api_name="/evaluate_stop") == "Stopping the evaluation at the next step."
    text, data = job.result(timeout=300)
    assert text.startswith("Stopped after") and len(data["checkpoints"]) < 2
    assert json.loads((stopped / "evaluation" / "evaluation.json").read_text())["base"]["scores"]


@pytest.mark.slow
@pytest.mark.browser
def test_the_evaluate_panel_evaluates_shows_table_plot_and_verdict_and_stops(server, browser, tmp_path):
    copy_run(server.workspace / "runs" / "pair", "pair-browser")
    copy_run(server.workspace / "runs" / "pair", "pair-browser-stop")
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    try:
        page.goto(server.url)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_selector("#train-start", timeout=30_000)
        page.locator("#eval-box").click()  # the accordion under the loss plot
        page.locator("#eval-run input").click()
        page.get_by_role("option", name="pair-browser", exact=True).click()
        page.wait_for_function("document.querySelector('#eval-verdict').innerText.includes('Not evaluated yet')",
                               timeout=30_000)
        page.locator("#eval-seeds input[type=number]").fill("1")
        page.locator("#eval-seeds input[type=number]").press("Enter")
        page.locator("#eval-start").click()
        page.wait_for_function("document.querySelector('#eval-status').innerText.includes('Evaluating')",
                               timeout=30_000)
        page.wait_for_function("document.querySelector('#eval-status').innerText.includes('Done')", timeout=600_000)
        assert "2 checkpoint(s) evaluated" in page.locator("#eval-status").inner_text()
        page.wait_for_function("document.querySelector('#eval-table').innerText.includes('final (step 6)')",
                               timeout=30_000)
        table = page.locator("#eval-table").inner_text()
        assert "step 3" in table and "alice" in table and "bob" in table and "flexibility" in table
        assert "Recommended checkpoint" in page.locator("#eval-verdict").inner_text()
        assert "Did not learn" in page.locator("#eval-verdict").inner_text()
        # a line per concept and score, each with its color (the panel showed an empty plot before)
        page.wait_for_function("Array.from(document.querySelectorAll('#eval-plot svg path[aria-roledescription="
                               "\"line mark\"]')).filter(p => p.getAttribute('stroke')).length === 4", timeout=30_000)
        page.locator("#eval-box").screenshot(path=str(tmp_path / "evaluate.png"))

        page.locator("#eval-run input").click()  # another run: Stop while it evaluates
        page.get_by_role("option", name="pair-browser-stop", exact=True).click()
        page.wait_for_function("document.querySelector('#eval-verdict').innerText.includes('Not evaluated yet')",
                               timeout=30_000)
        page.locator("#eval-start").click()
        page.wait_for_function("document.querySelector('#eval-status').innerText.includes('Evaluating')",
                               timeout=30_000)
        page.locator("#eval-stop").click()
        page.wait_for_function("document.querySelector('#eval-status').innerText.includes('Stopped after')",
                               timeout=120_000)
        assert not (server.workspace / "runs" / "pair-browser-stop" / "evaluation" / "evaluation.json").is_file() or \
            len(json.loads((server.workspace / "runs" / "pair-browser-stop" / "evaluation" /
                            "evaluation.json").read_text())["checkpoints"]) < 2
    finally:
        page.close()
