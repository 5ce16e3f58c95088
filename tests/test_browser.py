"""The Generate tab in a real browser: Playwright driving Debian's chromium against
`python app.py --demo`. Screenshots land in the test's tmp dir for a person to look at."""

import pytest

pytestmark = pytest.mark.browser

LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def page(app_server, chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() starts from a fresh temporary profile of its own each time
        browser = playwright.chromium.launch(executable_path=chromium_path, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_server.url)
        page.wait_for_selector("#gen-button", timeout=30_000)
        yield page
        browser.close()


def test_type_prompt_click_generate_and_see_the_image(page, tmp_path):
    page.locator("#gen-prompt textarea").fill("1girl, solo, smile")
    page.locator("#gen-button").click()
    image = page.locator("#gen-gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    status = page.locator("#gen-status").inner_text()
    assert "Done: 1 image" in status
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)


def test_demo_mode_is_labelled_as_random_weights(page):
    assert "random-weight" in page.locator("body").inner_text()
