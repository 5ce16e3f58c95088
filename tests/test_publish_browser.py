"""The Train tab's Publish section in a real browser: a finished run, published as a dry run,
writes the folder that would be uploaded (model card, LoRA, samples) inside the run."""

import shutil

import pytest

from tests.test_publish import trained  # noqa: F401 - the module's trained-run fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_dry_run_from_the_train_tab_writes_the_upload_folder(app_server, browser, trained, tmp_path):  # noqa: F811
    run_dir = app_server.workspace / "runs" / "browser-publish"
    shutil.copytree(trained / "runs" / "mychar-run", run_dir)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(app_server.url)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_selector("#train-start", timeout=30_000)
        page.locator("#train-run input").click()
        page.get_by_role("option", name="browser-publish").click()
        page.locator("#train-checkpoints").get_by_text("mychar.safetensors").wait_for(timeout=30_000)
        page.locator("#publish-box").get_by_text("Publish").first.click()  # open the section
        page.locator("#publish-repo input, #publish-repo textarea").first.fill("alice/mychar")
        page.locator("#publish-dry-run input").check()
        page.locator("#publish-button").click()
        page.wait_for_function("document.querySelector('#publish-status').innerText.includes('Dry run')",
                               timeout=60_000)
        folder = run_dir / "publish" / "mychar-huggingface"
        assert (folder / "README.md").is_file() and (folder / "mychar.safetensors").is_file()
        assert str(folder) in page.locator("#publish-status").inner_text()
        page.screenshot(path=str(tmp_path / "publish.png"), full_page=True)
    finally:
        page.close()
