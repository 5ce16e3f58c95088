"""The Caption tab's Concepts & audit panel: in a real browser (audit, click a finding, the image
opens in the editor; edit and save the concept list) and through its handlers."""

import pandas as pd
import pytest

from tests.test_concepts import image, kohya_dataset


def test_the_panel_lists_concepts_and_findings_and_saves_an_edited_list(tmp_path):
    from studio.context import AppContext
    from studio.dataset.concepts import saved_specs
    from studio.jobs import JobRunner
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.settings import Settings
    from studio.ui import caption_tab as tab

    settings = Settings(workspace=tmp_path / "ws", demo=True)
    settings.ensure_workspace()
    ctx = AppContext(settings, ModelManager(tmp_path / "models", device=DeviceInfo("cpu", "CPU")), JobRunner())
    root = kohya_dataset(settings.datasets_dir / "chars")
    view = tab.on_audit(ctx, "chars", "", True)
    assert view["audit_summary"].startswith("**2 concept(s); 5 finding(s)")
    assert view["concepts"].values.tolist()[0][:5] == ["amiya", "amiya \\(arknights\\)", 12, "91%", 6]
    assert ["mislabel", "amiya", "10_amiya/a01.png"] in view["findings"].values[:, :3].tolist()
    opened = tab.on_select_finding(ctx, "chars", "10_amiya/a01.png")
    assert opened["selected"] == "10_amiya/a01.png" and opened["edit_tags"].startswith("amiya \\(arknights\\), 1girl")

    rows = view["concept_list"].copy()
    rows.iloc[0, 3] = 0.7  # amiya: 70% of an epoch
    saved = tab.on_concepts_save(ctx, "chars", "", rows)
    assert saved["concepts_msg"].startswith("Saved 2 concept(s)")
    assert [s.target_share for s in saved_specs(root)] == [0.7, None]
    assert "from your saved list" in saved["audit_summary"]
    bad = tab.on_concepts_save(ctx, "chars", "", pd.DataFrame([["x", "", "", "lots"]]))
    assert bad == {"concepts_msg": "⚠ concept 'x': target share 'lots' is not a number"}
    assert tab.on_concepts_forget(ctx, "chars", "")["concepts_msg"].startswith("Forgot the saved list")
    with pytest.raises(Exception, match="outside|workspace|not"):
        tab.on_audit(ctx, "../../etc", "", False)


@pytest.mark.browser
def test_audit_in_the_browser_and_open_a_finding_in_the_editor(app_server, browser, tmp_path):
    kohya_dataset(app_server.workspace / "datasets" / "browser-concepts")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(app_server.url)
        page.wait_for_selector("#cap-start", timeout=30_000)
        page.locator("#cap-refresh").click()
        page.locator("#cap-dataset input").click()
        page.get_by_role("option", name="browser-concepts").click()
        page.wait_for_function("document.querySelector('#cap-scan').innerText.includes('16 images')", timeout=30_000)
        page.get_by_role("tab", name="Concepts & audit").click()
        page.locator("#cap-audit").click()
        page.wait_for_function("document.querySelector('#cap-audit-summary').innerText.includes('5 finding(s)')",
                               timeout=30_000)
        assert "black jacket" in page.locator("#cap-concepts").inner_text()
        page.locator("#cap-findings span").filter(has_text="10_amiya/a01.png").first.click()
        page.wait_for_function("document.querySelector('#cap-edit-tags textarea').value.includes('red dress')",
                               timeout=10_000)
        assert "10_amiya/a01.png" in page.locator("#cap-selected").inner_text()
        page.screenshot(path=str(tmp_path / "concepts.png"), full_page=True)
    finally:
        page.close()


def test_the_audit_endpoint_returns_the_clis_json_and_refuses_bad_values(app_server):
    """/audit through gradio_client: what `python -m studio audit --json` prints, from a running app."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    kohya_dataset(app_server.workspace / "datasets" / "api-concepts")
    client = Client(app_server.url, verbose=False, analytics_enabled=False)
    audit = client.predict("api-concepts", api_name="/audit", duplicates=False)
    assert audit["summary"] == "2 concept(s); 4 finding(s): 1 few images, 1 foreign tag, 1 mislabel, 1 missing trigger"
    assert {c["name"]: c["images"] for c in audit["concepts"]["concepts"]} == {"amiya": 12, "ember": 4}
    assert {"kind": "mislabel", "concept": "amiya", "rel": "10_amiya/a01.png"}.items() <= next(
        f for f in audit["findings"] if f["kind"] == "mislabel").items()
    with_duplicates = client.predict("api-concepts", api_name="/audit")
    assert "5 finding(s): 1 duplicate, 1 few images" in with_duplicates["summary"], "hashes by default"
    flat = app_server.workspace / "datasets" / "api-flat"  # a flat folder: the trigger word makes the concept
    flat.mkdir()
    for number, caption in enumerate(("ohwx, 1girl, red hair", "ohwx, 1girl, smile", "1boy, hat")):
        image(flat / f"{number}.png", number)
        (flat / f"{number}.txt").write_text(caption)
    concept = client.predict("api-flat", "ohwx", api_name="/audit", duplicates=False)["concepts"]["concepts"][0]
    assert (concept["name"], concept["triggers"], concept["images"]) == ("ohwx", ["ohwx"], 2)
    assert client.predict("api-flat", api_name="/audit", duplicates=False)["concepts"]["concepts"][0]["name"] != "ohwx"
    for kwargs, message in (({"dataset": "../../etc"}, "is not usable"),
                            ({"dataset": "no-such"}, "there is no dataset folder 'no-such'"),
                            ({"dataset": "api-concepts", "trigger": ",".join(["t"] * 17)}, "at most 16 trigger"),
                            ({"dataset": "api-concepts", "trigger": "t" * 300}, "of up to 200 characters"),
                            ({"dataset": "api-concepts", "duplicates": "yes"}, "duplicates")):
        with pytest.raises(AppError, match=message):
            client.predict(api_name="/audit", **kwargs)


def test_the_train_summary_shows_each_concepts_share_and_balancing_evens_them(tmp_path):
    from studio.training.config import TrainConfig
    from studio.ui import train_view

    root = kohya_dataset(tmp_path / "data")
    config = TrainConfig(datasets=[{"path": str(root)}], resolution=64, min_bucket_reso=64, max_train_steps=10)
    plain = train_view.summarize(config)
    assert [(n, i, round(s, 3)) for n, i, s in plain.concepts] == [("amiya", 12, 0.909), ("ember", 4, 0.091)]
    balanced_config = config.model_copy(update={"balance_concepts": True})
    balanced = train_view.summarize(balanced_config)
    assert [round(s, 2) for _, _, s in balanced.concepts] == [0.5, 0.5]
    text = train_view.summary_markdown(balanced, balanced_config)
    assert "Concepts (share of an epoch): amiya 12 img **50%** · ember 4 img **50%**" in text
    assert "concepts balanced" not in text, "the balancing note is not a warning"
