"""End to end: `python app.py --demo` serves quickly, /generate works through gradio_client and
bad input gets a specific message while the app keeps serving."""

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
        ({"model": "/etc/model.safetensors"}, "outside the workspace"),
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
