"""The Generate tab in a real browser: Playwright driving Debian's chromium against
`python app.py --demo`. Screenshots land in the test's tmp dir for a person to look at."""

import pytest

pytestmark = pytest.mark.browser

@pytest.fixture(scope="module")
def page(app_server, browser):
    """The Generate tab (the Caption tab comes first and opens by default)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_server.url)
    page.get_by_role("tab", name="Generate").click()
    page.wait_for_selector("#gen-button", timeout=30_000)
    yield page
    page.close()


def test_type_prompt_click_generate_and_see_the_image(page, tmp_path):
    page.locator("#gen-prompt textarea").fill("1girl, solo, smile")
    page.locator("#gen-button").click()
    image = page.locator("#gen-gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    status = page.locator("#gen-status").inner_text()
    assert "Done: 1 image" in status
    assert "memory: needs ~" in status, "each generation shows its memory plan"
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)


def test_demo_mode_is_labelled_as_random_weights(page):
    assert "random-weight" in page.locator("body").inner_text()


@pytest.fixture
def caption_page(app_server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_server.url)
    page.wait_for_selector("#cap-start", timeout=30_000)
    yield page
    page.close()


def test_caption_a_dataset_then_edit_and_save_one_caption(caption_page, app_server, tmp_path):
    import numpy as np
    from PIL import Image

    page = caption_page
    folder = app_server.workspace / "datasets" / "browser-caption"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray((rng.random((64, 40 + 16 * i, 3)) * 255).astype("uint8")).save(folder / f"pic{i}.png")

    # the folder was made after the page was built: Refresh lists it
    page.locator("#cap-refresh").click()
    page.locator("#cap-dataset input").click()
    page.get_by_role("option", name="browser-caption").click()
    page.wait_for_function("document.querySelector('#cap-scan').innerText.includes('3 images')", timeout=30_000)
    assert page.locator("#cap-gallery").get_by_text("(no tags)").count() == 3

    page.locator("#cap-trigger input, #cap-trigger textarea").first.fill("browserchar")
    page.locator("#cap-start").click()
    page.wait_for_function("document.querySelector('#cap-status').innerText.includes('Done')", timeout=60_000)
    assert "3 tagged" in page.locator("#cap-status").inner_text()
    page.wait_for_function(
        "document.querySelector('#cap-gallery').innerText.split('browserchar').length - 1 === 3", timeout=10_000)

    page.locator("#cap-gallery button img").nth(1).click()
    tags = page.locator("#cap-edit-tags textarea")
    page.wait_for_function("document.querySelector('#cap-edit-tags textarea').value.startsWith('browserchar, ')",
                           timeout=10_000)
    assert tags.input_value() == (folder / "pic1.txt").read_text()
    tags.fill("browserchar, 1girl, edited by hand")
    page.locator("#cap-edit-nl textarea").fill("A girl, edited in the browser.")
    page.locator("#cap-save").click()
    page.wait_for_function("document.querySelector('#cap-edit-msg').innerText.includes('Saved')", timeout=10_000)
    assert (folder / "pic1.txt").read_text() == "browserchar, 1girl, edited by hand"
    assert (folder / "pic1_nl.txt").read_text() == "A girl, edited in the browser."
    page.locator("#cap-gallery").get_by_text("[NL] browserchar, 1girl, edited by hand").wait_for(timeout=10_000)
    page.screenshot(path=str(tmp_path / "caption.png"), full_page=True)


@pytest.fixture
def train_page(app_server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_server.url)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-start", timeout=30_000)
    yield page
    page.close()


LOSS_POINTS = """() => Array.from(document.querySelectorAll('#train-loss svg path[aria-roledescription="line mark"]'))
                     .map(path => (path.getAttribute('d') || '').split(/[ML]/).length - 1)"""


def test_train_from_the_tab_watch_the_loss_curve_grow_then_stop(train_page, app_server, tmp_path):
    from tests.train_fixtures import make_dataset

    page = train_page
    make_dataset(app_server.workspace / "datasets" / "browser-train")
    for preset, dim in (("small-dataset", "8"), ("demo-sdxl", "4")):  # a preset fills the form
        page.locator("#train-preset input").click()
        page.get_by_role("option", name=preset).click()
        page.wait_for_function(f"document.querySelector('#train-network-dim input[type=number]').value === '{dim}'",
                               timeout=10_000)
    page.locator("#train-datasets-refresh").click()  # the folder was made after the page was built
    page.locator("#train-datasets input").click()
    page.get_by_role("option", name="browser-train").click()
    page.keyboard.press("Escape")
    page.locator("#train-max-steps input").fill("5000")  # long enough to be stopped by hand
    page.wait_for_function("document.querySelector('#train-summary').innerText.includes('5000 steps in all')",
                           timeout=30_000)
    assert "4 images" in page.locator("#train-summary").inner_text()
    assert page.locator("#train-output-name textarea").input_value() == "browser-train"

    page.locator("#train-start").click()
    try:
        page.wait_for_function("document.querySelector('#train-status').innerText.includes('Training')",
                               timeout=300_000)
        page.wait_for_function(f"({LOSS_POINTS})()[0] >= 2", timeout=300_000)  # raw loss: two points and more
        first = page.evaluate(LOSS_POINTS)[0]
        page.wait_for_function(f"({LOSS_POINTS})()[0] > {first}", timeout=300_000)  # it grows while training
    finally:
        page.locator("#train-stop").click()  # leave the shared app free for the other tests
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('Stopped at step')",
                           timeout=300_000)
    status = page.locator("#train-status").inner_text()
    assert "a checkpoint was saved" in status and "/5000" in status
    assert page.locator("#train-run input").input_value().startswith("browser-train-")
    page.locator("#train-checkpoints").get_by_text("browser-train-step").last.wait_for(timeout=10_000)
    page.screenshot(path=str(tmp_path / "train.png"), full_page=True)


def test_an_anima_run_used_in_generate_brings_its_model_and_its_prompt_builder(train_page, app_server):
    """Use in Generate on an Anima run: Generate's model becomes the run's base, the prompt
    builder becomes Anima's, and the final prompt shown is Anima's (what is sent)."""
    from studio.training.runs import write_run_config
    from tests.train_fixtures import fast_config

    page = train_page
    run = app_server.workspace / "runs" / "browser-anima-1"
    write_run_config(run, fast_config(app_server.workspace, pretrained_model="demo-anima"))
    (run / "loras").mkdir()
    (run / "loras" / "browser-anima.safetensors").write_bytes(b"checkpoint")
    page.reload()
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-run input").click()
    page.get_by_role("option", name="browser-anima-1").click()
    page.locator("#train-checkpoints").get_by_text("browser-anima.safetensors").wait_for(timeout=30_000)
    page.locator("#train-use").click()
    page.wait_for_function("document.querySelector('#gen-model input')?.value === 'demo-anima'", timeout=30_000)
    builder = page.locator("#gen-builder")
    builder.get_by_text("Prompt builder: Anima special tags").wait_for(timeout=10_000)
    builder.get_by_text("Prompt builder: Anima special tags").click()  # open it
    page.locator("#gen-score").wait_for(state="visible", timeout=10_000)
    page.locator("#gen-artist textarea, #gen-artist input").first.fill("wlop")
    page.locator("#gen-prompt textarea").fill("1girl, smile")
    page.wait_for_function(
        "document.querySelector('#gen-final-prompt textarea')?.value === "
        "'masterpiece, best quality, score_7, safe, 1girl, smile, @wlop'", timeout=10_000)
    assert "score_7" in page.locator("#gen-quality").inner_text()


def test_lists_are_current_whenever_a_tab_is_shown(caption_page, app_server):
    """A dataset folder and a LoRA file that appear while the page is open are listed as soon as
    their tab is shown, with no Refresh."""
    from tests.train_fixtures import make_dataset

    page = caption_page
    make_dataset(app_server.workspace / "datasets" / "appeared-later", count=1)
    (app_server.workspace / "loras" / "appeared-later.safetensors").write_bytes(b"x")
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-datasets", timeout=30_000)
    page.locator("#train-datasets input").click()
    page.get_by_role("option", name="appeared-later").wait_for(timeout=10_000)
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Generate").click()
    page.get_by_text("LoRA stack").click()
    page.locator("#gen-lora-1 input").click()
    page.get_by_role("option", name="appeared-later.safetensors").wait_for(timeout=10_000)
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Caption").click()
    page.locator("#cap-dataset input").click()
    page.get_by_role("option", name="appeared-later").wait_for(timeout=10_000)


def test_an_error_stays_in_the_status_line_and_stop_with_nothing_running_says_so(page):
    page.locator("#gen-prompt textarea").fill("1girl, " * 1000)  # past the prompt limit
    page.locator("#gen-button").click()
    page.wait_for_function("document.querySelector('#gen-status').innerText.includes('Error')", timeout=30_000)
    status = page.locator("#gen-status").inner_text()
    assert "prompt" in status and "elapsed" not in status, status
    page.locator("#gen-stop").click()
    page.wait_for_function("document.querySelector('#gen-status').innerText.includes('Nothing is being generated')",
                           timeout=10_000)
    page.locator("#gen-prompt textarea").fill("1girl, solo")


def test_a_width_typed_outside_the_range_is_refused_with_a_message_not_clamped(page):
    width = page.locator("#gen-width input")
    try:
        width.fill("5000")
        width.press("Tab")
        page.locator("#gen-prompt textarea").fill("1girl, solo")
        page.locator("#gen-button").click()
        page.wait_for_function("document.querySelector('#gen-status').innerText.includes('Error')", timeout=30_000)
        status = page.locator("#gen-status").inner_text()
        assert "width" in status and "4096" in status, status
    finally:
        width.fill("256")
        width.press("Tab")


def test_a_reload_shows_the_work_that_runs(browser, app_server):
    """Reloading during training shows the run's real settings; reloading during a generation
    follows its progress and then shows its image."""
    from gradio_client import Client

    from tests.train_fixtures import make_dataset

    client = Client(app_server.url, verbose=False, analytics_enabled=False)
    make_dataset(app_server.workspace / "datasets" / "reload-train", count=2)
    client.predict("reload-train", api_name="/train", max_train_steps=4000, output_name="reloaded-run",
                   settings={"sample_every_n_steps": 0, "validation_images": 0, "network_dim": 5})
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(app_server.url)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function("document.querySelector('#train-output-name textarea')?.value === 'reloaded-run'",
                               timeout=30_000)
        assert page.locator("#train-max-steps input").input_value() == "4000"
        assert page.locator("#train-network-dim input[type=number]").input_value() == "5"
        assert "reload-train" in page.locator("#train-datasets").inner_text()
    finally:
        client.predict(api_name="/train_stop")
    deadline = __import__("time").monotonic() + 300
    while "Stopped" not in client.predict(api_name="/train_status")[0]:
        assert __import__("time").monotonic() < deadline, "training did not stop"
        __import__("time").sleep(0.5)

    job = client.submit("1girl, solo", api_name="/generate", steps=60, width=256, height=256, seed=3)
    try:
        page.reload()
        page.get_by_role("tab", name="Generate").click()
        page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('%')", timeout=60_000)
        page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('Done: 1 image')",
                               timeout=300_000)
        page.locator("#gen-gallery img").first.wait_for(state="visible", timeout=30_000)
    finally:
        job.result(timeout=300)
        page.close()


def test_compare_epochs_makes_a_grid_whose_labels_stay_in_their_columns(train_page, app_server):
    """Compare epochs on a run with two checkpoints, Make grid: the grid shows, and its column
    labels (step N / final, not the long run-prefixed file names) never run into the next column."""
    import io
    import urllib.request

    import numpy as np
    from PIL import Image

    from studio.training.runs import write_run_config
    from tests.lora_fixtures import write_demo_kohya_lora
    from tests.train_fixtures import fast_config

    page = train_page
    run = app_server.workspace / "runs" / "a-rather-long-character-name-20261204-101500"
    write_run_config(run, fast_config(app_server.workspace, pretrained_model="demo-sdxl"))
    write_demo_kohya_lora(run / "loras" / "a-rather-long-character-name-step00000010.safetensors", seed=1)
    write_demo_kohya_lora(run / "loras" / "a-rather-long-character-name.safetensors", seed=2)
    page.reload()
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-run input").click()
    page.get_by_role("option", name=run.name).click()
    page.locator("#train-checkpoints").get_by_text("final").wait_for(timeout=30_000)
    page.locator("#train-compare").click()
    page.locator("#gen-prompt textarea").fill("1girl, solo")
    page.locator("#gen-width input").fill("64")
    page.locator("#gen-height input").fill("64")
    page.get_by_label("Y values").fill("0.8, 1.0")
    page.locator("#gen-grid-button").click()
    image = page.locator("#gen-grid-image img")
    image.wait_for(state="visible", timeout=300_000)
    source = image.get_attribute("src")
    with urllib.request.urlopen(source if source.startswith("http") else app_server.url.rstrip("/") + source) as r:
        grid = np.asarray(Image.open(io.BytesIO(r.read())).convert("L"))
    cell = 64
    left = grid.shape[1] - 2 * cell  # row labels, when the grid has a Y axis
    top = grid.shape[0] - 2 * cell  # two rows (weights 0.8, 1.0) under the column labels
    assert left >= 0 and top > 0, grid.shape
    boundary = left + cell
    assert not (grid[:top, boundary - 2:boundary + 2] < 128).any(), "a column label runs into the next column"


CUT_LABELS = """(root) => Array.from(document.querySelectorAll(root + ' [data-testid="block-info"]'))
    .filter(label => label.offsetParent !== null && label.scrollWidth > label.clientWidth + 1)
    .map(label => label.textContent.trim())"""
# parts of a block (its label, number box, slider ends) that stick out past the block's edges
OUTSIDE_BLOCK = """(id) => { const block = document.getElementById(id); const box = block.getBoundingClientRect();
    return Array.from(block.querySelectorAll('span, input, button, label'))
        .filter(el => el.offsetParent !== null)
        .filter(el => { const r = el.getBoundingClientRect(); return r.left < box.left - 1 || r.right > box.right + 1; })
        .map(el => el.textContent.trim() || el.getAttribute('aria-label') || el.tagName); }"""


@pytest.mark.parametrize("width", [1400, 1024])
def test_train_labels_are_not_cut(browser, app_server, width):
    """Every label on the Train tab reads whole (Tag dropout was cut to 'Tag dro...'), on a wide and
    a laptop-sized window."""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    try:
        page.goto(app_server.url)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_selector("#train-tag-dropout", timeout=30_000)
        assert page.locator("#train-tag-dropout").get_by_text("Tag dropout").is_visible()
        assert page.evaluate(CUT_LABELS, "#train-tag-dropout") == []
        assert page.evaluate(OUTSIDE_BLOCK, "train-tag-dropout") == []
        assert page.evaluate(CUT_LABELS, "") == []
    finally:
        page.close()


def test_png_info_sends_the_images_loras_to_the_stack_and_names_the_missing_one(page, app_server, tmp_path):
    """Drop an A1111 PNG whose prompt has <lora:...> tags, Send to the form: the prompt comes
    without the tags, the LoRA that is in workspace/loras fills slot 1 at the image's weight, and
    the one that is not is named in a message."""
    from PIL import Image

    from studio.generation.infotext import save_png
    from tests.lora_fixtures import write_demo_kohya_lora

    write_demo_kohya_lora(app_server.workspace / "loras" / "png-style.safetensors", seed=3)
    png = tmp_path / "from-a1111.png"
    save_png(Image.new("RGB", (64, 64), "white"), png,
             "1girl, solo, <lora:png-style:0.7>, <lora:somebody-elses:1>\nNegative prompt: lowres\n"
             "Steps: 5, Sampler: Euler a, CFG scale: 6, Seed: 99, Size: 64x64")
    page.get_by_text("PNG Info: read the parameters of any image").click()
    page.locator("#gen-png-file input[type=file]").set_input_files(str(png))
    page.wait_for_function("() => document.querySelector('#gen-png-text textarea').value.includes('png-style')",
                           timeout=30_000)
    page.locator("#gen-png-send").click()
    warning = page.get_by_test_id("toast-text").filter(has_text="somebody-elses")
    warning.wait_for(timeout=30_000)  # the warning names the LoRA that is not there
    assert "png-style" not in warning.inner_text()
    if not page.locator("#gen-lora-1").is_visible():
        page.get_by_role("button", name="LoRA stack").click()
    assert page.locator("#gen-lora-1 input").input_value() == "png-style.safetensors"
    assert page.locator("#gen-lora-1-weight input[type=number]").input_value() == "0.7"
    assert page.locator("#gen-lora-2 input").input_value() == ""
    assert page.locator("#gen-prompt textarea").input_value() == "1girl, solo"


def test_plan_memory_shows_what_the_run_needs_and_what_the_machine_has(train_page, app_server):
    """Pick the demo preset and a dataset, press Plan memory: the page says how many GB the run
    needs and how much this machine has free (a CPU here: RAM), without starting anything."""
    from tests.train_fixtures import make_dataset

    page = train_page
    make_dataset(app_server.workspace / "datasets" / "browser-plan")
    page.locator("#train-preset input").click()
    page.get_by_role("option", name="demo-sdxl").click()
    page.locator("#train-datasets-refresh").click()
    page.locator("#train-datasets input").click()
    page.get_by_role("option", name="browser-plan").click()
    page.keyboard.press("Escape")
    page.locator("#train-plan-button").click()
    page.wait_for_function("document.querySelector('#train-plan').innerText.includes('GB free')", timeout=60_000)
    text = page.locator("#train-plan").inner_text()
    assert "fits" in text and "needs ~" in text and "of RAM" in text
    assert "weights" in text and "activations" in text
    assert not list((app_server.workspace / "runs").glob("browser-plan*")), "nothing was started"
