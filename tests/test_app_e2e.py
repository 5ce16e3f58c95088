"""End to end: `python app.py --demo` serves quickly, /generate works through gradio_client and
bad input gets a specific message while the app keeps serving."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.generation.infotext import parse_infotext, read_infotext

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def client(app_server):
    from gradio_client import Client

    return Client(app_server.url, analytics_enabled=False, verbose=False)


def test_page_is_served_within_seconds(app_server):
    assert app_server.startup_seconds < 20, app_server.output()


def test_generate_endpoint_returns_png_files_with_infotext(client, app_server):
    result = client.predict("1girl, solo", api_name="/generate")
    assert isinstance(result, list) and len(result) == 1
    path = result[0]["image"]
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (512, 512)
    prompt, negative, params = parse_infotext(read_infotext(path))
    assert prompt.startswith("1girl, solo, ") and "masterpiece" in prompt
    assert "lowres" in negative
    assert params["Model"] == "demo-sdxl" and params["Sampler"] == "Euler a" and params["Size"] == "512x512"
    saved = list((app_server.workspace / "outputs").rglob(f"*-{params['Seed']}.png"))
    assert len(saved) == 1, "the image is saved in the workspace outputs, named by seed"


def test_same_seed_reproduces_and_batch_gets_consecutive_seeds(client):
    first = client.predict("1girl, red hair", api_name="/generate", seed=1234, steps=2, width=256, height=256)
    again = client.predict("1girl, red hair", api_name="/generate", seed=1234, steps=2, width=256, height=256,
                           batch_size=2)
    pixels = [np.asarray(Image.open(r["image"]), dtype=np.int16) for r in (first[0], *again)]
    # batched and single convolutions round differently on CPU: equal up to 8-bit rounding
    assert np.abs(pixels[0] - pixels[1]).max() <= 2
    assert np.abs(pixels[1] - pixels[2]).max() > 20
    seeds = [parse_infotext(read_infotext(r["image"]))[2]["Seed"] for r in again]
    assert seeds == ["1234", "1235"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 500}, "multiple of 8"),
        ({"steps": 0}, "less than minimum value 1"),  # gradio's own range check on the slider
        ({"lora_1": "missing.safetensors"}, "LoRA"),
        ({"model": "/etc/model.safetensors"}, "is not usable: name one of"),
        ({"model": "studio/../../../etc"}, "is not usable: name one of"),
        ({"vae": "/etc"}, "VAE .* is not usable"),
        ({"model": "nobody/no-such-model"}, "offline"),
    ],
)
def test_bad_input_gets_a_specific_message_and_the_app_keeps_serving(client, kwargs, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict("1girl", api_name="/generate", **kwargs)
    assert client.predict("1girl", api_name="/generate", steps=1, width=256, height=256)


def test_lora_from_the_workspace_changes_the_image_and_grid_endpoint(client, app_server):
    from studio.generation.infotext import parse_lora_hashes
    from tests.lora_fixtures import write_demo_kohya_lora

    loras = app_server.workspace / "loras"
    write_demo_kohya_lora(loras / "style-e1.safetensors", seed=1)
    write_demo_kohya_lora(loras / "style-e2.safetensors", seed=2)
    small = {"seed": 5, "steps": 2, "width": 256, "height": 256}
    base = client.predict("1girl", api_name="/generate", **small)[0]["image"]
    styled = client.predict("1girl", api_name="/generate", lora_1="style-e1.safetensors", lora_1_weight=0.8, **small)
    assert np.abs(np.asarray(Image.open(base), dtype=np.int16)
                  - np.asarray(Image.open(styled[0]["image"]), dtype=np.int16)).max() > 10
    params = parse_infotext(read_infotext(styled[0]["image"]))[2]
    assert list(parse_lora_hashes(params["Lora hashes"])) == ["style-e1"]
    grid_path, status = client.predict("LoRA file", "style-e1.safetensors, style-e2.safetensors", "LoRA weight",
                                       "0.5, 1.0", "1girl", api_name="/grid", **small)
    grid = Image.open(grid_path)
    assert grid.width > 512 and grid.height > 512 and "Grid done" in status


def test_caption_endpoint_captions_a_dataset_and_reports_broken_files(client, app_server):
    from gradio_client.exceptions import AppError

    folder = app_server.workspace / "datasets" / "e2e-caption" / "3_chars"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((48, 32 + 16 * i, 3)) * 255).astype("uint8")).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    summary, details = client.predict("e2e-caption", tagger="demo-tagger", trigger="e2echar", api_name="/caption")
    assert summary.startswith("Done: 3 images, 3 tagged") and "skipped broken.png: " in summary
    assert details["tagged"] == [f"3_chars/im{i}.png" for i in range(3)]
    for i in range(3):
        tags = (folder / f"im{i}.txt").read_text().split(", ")
        assert tags[0] == "e2echar" and len(tags) > 2
    again, _ = client.predict("datasets/e2e-caption", api_name="/caption")  # skip: nothing to do
    assert again.startswith("Done: 3 images, 0 tagged, 3 already captioned")
    with pytest.raises(AppError, match="no dataset folder 'nope'"):
        client.predict("nope", api_name="/caption")
    with pytest.raises(AppError, match="outside the workspace"):
        client.predict("/etc", api_name="/caption")


def test_train_endpoint_trains_in_the_background_refuses_generation_and_stops_with_a_checkpoint(client, app_server):
    import time
    from pathlib import Path

    from gradio_client.exceptions import AppError

    from tests.train_fixtures import make_dataset

    def status_until(done, timeout=300):
        deadline = time.monotonic() + timeout
        while True:
            text, details = client.predict(api_name="/train_status")
            if done(details) or time.monotonic() > deadline:
                return text, details
            time.sleep(0.3)

    make_dataset(app_server.workspace / "datasets" / "e2e-train")
    run_dir, started = client.predict("e2e-train", preset="demo-sdxl", max_train_steps=5000, api_name="/train")
    assert started.startswith("Started e2e-train-") and Path(run_dir).parent == (app_server.workspace / "runs").resolve()
    try:
        text, details = status_until(lambda d: d.get("step", 0) >= 2)
        assert details["run_dir"] == run_dir and details["state"] == "running", text
        assert details["total_steps"] == 5000 and text.startswith("Training · step ")
        with pytest.raises(AppError, match="is busy: training e2e-train is running"):
            client.predict("1girl", api_name="/generate", steps=1, width=256, height=256)
    finally:  # leave the shared app free for the other tests
        stopping = client.predict(api_name="/train_stop")
        text, details = status_until(lambda d: d["state"] not in ("running", "stopping"))
    assert stopping.startswith("Stopping") and details["state"] == "stopped", text
    assert text.startswith(f"Stopped at step {details['step']}/5000")
    assert details["checkpoints"][-1].endswith(f"e2e-train-step{details['step']:08d}.safetensors")
    assert Path(details["checkpoints"][-1]).is_file()
    assert client.predict("1girl", api_name="/generate", steps=1, width=256, height=256), "the GPU is free again"


@pytest.mark.parametrize(("x_axis", "value", "message"), [
    ("Steps", "1000000000", r"x axis \(steps\) value 1000000000: .*allowed: 1 to 200"),
    ("Steps", "0", r"x axis \(steps\) value 0: .*allowed: 1 to 200"),
    ("CFG scale", "nan", r"x axis \(cfg\) value nan: Input should be a finite number"),
])
def test_grid_axis_values_meet_the_forms_limits(client, app_server, x_axis, value, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(x_axis, value, "", "", "1girl", api_name="/grid", steps=1, width=256, height=256)
    assert client.predict("1girl", api_name="/generate", steps=1, width=256, height=256), "the server still answers"


def test_a_grid_past_the_cost_ceiling_is_refused(client):
    from gradio_client.exceptions import AppError

    seeds = ", ".join(str(i) for i in range(16))
    with pytest.raises(AppError, match="this grid is too large: 256 cells"):
        client.predict("Seed", seeds, "Steps", ", ".join(["200"] * 16), "1girl", api_name="/grid",
                       width=1024, height=1024)


def test_a_huge_prompt_is_refused_at_once(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="prompt: is 1000000 characters long; the limit is 6000"):
        client.predict("a" * 1_000_000, api_name="/generate", steps=1, width=256, height=256)


@pytest.mark.parametrize(("endpoint", "kwargs", "message"), [
    ("/caption", {"tagger": "/etc"}, "tagger '/etc' is not usable"),
    ("/caption", {"tagger": "../../../../etc"}, "tagger .* is not usable"),
    ("/caption", {"nl_backend": "/etc"}, "NL captioner '/etc' is not usable"),
    ("/train", {"settings": {"pretrained_model": "/etc"}}, "base model '/etc' is not usable"),
    ("/train", {"settings": {"vae": "/no/such/vae"}}, "VAE '/no/such/vae' is not usable"),
])
def test_model_paths_outside_the_workspace_are_refused(client, app_server, endpoint, kwargs, message):
    from gradio_client.exceptions import AppError

    from tests.train_fixtures import make_dataset

    make_dataset(app_server.workspace / "datasets" / "paths-e2e")
    extra = {"preset": "demo-sdxl", "max_train_steps": 1} if endpoint == "/train" else {}
    with pytest.raises(AppError, match=message):
        client.predict("paths-e2e", api_name=endpoint, **extra, **kwargs)


@pytest.mark.parametrize(("settings", "message"), [
    ({"sample_size": [16384, 16384]}, r"sample_size \[16384, 16384\]: each side must be a multiple of 8 from 64 to 2048"),
    ({"resolution": 100000}, "resolution 100000: each must be a multiple of 8 from 64 to 4096"),
    ({"max_bucket_reso": 99999}, "max_bucket_reso: Input should be less than or equal to 4096"),
])
def test_training_sizes_have_upper_limits(client, app_server, settings, message):
    from gradio_client.exceptions import AppError

    from tests.train_fixtures import make_dataset

    make_dataset(app_server.workspace / "datasets" / "limits-e2e")
    with pytest.raises(AppError, match=message):
        client.predict("limits-e2e", preset="demo-sdxl", max_train_steps=1, settings=settings, api_name="/train")
    assert client.predict(api_name="/train_status")[1].get("state") != "running", "nothing started"


def test_the_file_route_serves_only_what_the_page_shows(client, app_server):
    import urllib.error
    import urllib.parse
    import urllib.request

    def status(path):
        try:
            with urllib.request.urlopen(app_server.url + "gradio_api/file=" + urllib.parse.quote(str(path)),
                                        timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    image = client.predict("1girl", api_name="/generate", steps=1, width=256, height=256)[0]["image"]
    output = next((app_server.workspace / "outputs").rglob("*.png"))
    private = app_server.workspace / "presets" / "secret.toml"
    private.parent.mkdir(parents=True, exist_ok=True)
    private.write_text("x = 1")
    hidden = app_server.workspace / "datasets" / ".undo-log.json"
    hidden.write_text("{}")
    assert status(output) == 200 and Path(image).is_file()
    assert status(private) == 404 and status(hidden) == 404
    assert status(app_server.workspace / "presets" / "missing.toml") == 404


def test_a_huge_caption_is_skipped_not_tokenized(client, app_server):
    import time

    from tests.train_fixtures import make_dataset

    folder = make_dataset(app_server.workspace / "datasets" / "huge-caption")
    with open(folder / "img0.txt", "w") as fh:  # 8 MB where a caption should be
        fh.write("1girl, " * 1_200_000)
    summary, details = client.predict("huge-caption", tagger="demo-tagger", api_name="/caption")
    assert any(name == "img0.png" and "over the 64 KB limit" in why for name, why in details["skipped"]), summary
    run_dir, started = client.predict("huge-caption", preset="demo-sdxl", max_train_steps=1, api_name="/train")
    deadline = time.monotonic() + 240
    while (details := client.predict(api_name="/train_status")[1])["state"] in ("running", "stopping"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert details["state"] == "done", details
    assert (folder / "img0.txt").stat().st_size > 8_000_000, "the file itself is left alone"
