"""The Caption tab's Concepts & audit panel: in a real browser (audit, click a finding, the image
opens in the editor; edit and save the concept list) and through its handlers."""

import pandas as pd
import pytest

from tests.test_concepts import kohya_dataset


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
