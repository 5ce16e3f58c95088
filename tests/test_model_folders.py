"""Model folders people already have (ComfyUI's and A1111/Forge's `models/`), given with
--model-dir: their checkpoints and LoRAs are listed beside the workspace's, used by absolute path,
and only read."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from studio.models.folders import model_files
from tests.app_server import serving
from tests.lora_fixtures import write_demo_kohya_lora


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_comfyui_and_a1111_layouts_are_listed_by_kind(tmp_path):
    comfy, a1111, direct = tmp_path / "ComfyUI" / "models", tmp_path / "webui" / "models", tmp_path / "my" / "loras"
    touch(comfy / "checkpoints" / "animagine-xl-3.1.safetensors")
    touch(comfy / "loras" / "chars" / "mychar.safetensors")
    touch(comfy / "loras" / ".hidden.safetensors")
    touch(comfy / "loras" / "old.ckpt")
    touch(comfy / "vae" / "sdxl_vae.safetensors")
    touch(a1111 / "Stable-diffusion" / "illustrious.safetensors")
    touch(a1111 / "Lora" / "style.safetensors")
    touch(direct / "direct.safetensors")
    outside = touch(tmp_path / "elsewhere" / "escape.safetensors")
    (comfy / "loras" / "escape.safetensors").symlink_to(outside)
    dirs = (comfy, a1111, direct)
    assert [label for label, _ in model_files(dirs, "checkpoint")] == [
        "animagine-xl-3.1.safetensors · ComfyUI", "illustrious.safetensors · A1111/Forge"]
    loras = model_files(dirs, "lora")
    assert [label for label, _ in loras] == [
        "chars/mychar.safetensors · ComfyUI", "direct.safetensors · ComfyUI", "style.safetensors · A1111/Forge"]
    assert loras[0][1] == str((comfy / "loras" / "chars" / "mychar.safetensors").resolve())
    assert [label for label, _ in model_files(dirs, "vae")] == ["sdxl_vae.safetensors · ComfyUI"]
    assert model_files((tmp_path / "nothing",), "lora") == []


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    lora = write_demo_kohya_lora(root / "ComfyUI" / "models" / "loras" / "comfy-style.safetensors", seed=4)
    from studio.models.demo_anima import build_demo_anima_pipeline
    from tests.anima_comfy_fixture import write_comfy_anima

    write_comfy_anima(build_demo_anima_pipeline(), root / "ComfyUI" / "models", dit_name="anima-comfy.safetensors")
    (root / "ws").mkdir()
    with serving(root / "ws", "--model-dir", str(root / "ComfyUI" / "models")) as server:
        yield server, lora


def test_a_comfyui_lora_is_listed_used_and_left_untouched(comfy_server, browser):
    from gradio_client import Client
    from PIL import Image

    server, lora = comfy_server
    before = hashlib.sha256(lora.read_bytes()).hexdigest()
    client = Client(server.url, verbose=False, analytics_enabled=False)
    small = {"seed": 5, "steps": 2, "width": 64, "height": 64}
    base = client.predict("1girl", api_name="/generate", **small)[0]["image"]
    styled = client.predict("1girl", api_name="/generate", lora_1=str(lora), **small)[0]["image"]
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (base, styled))
    assert np.abs(a - b).max() > 10, "the LoRA from ComfyUI's folder changes the image"
    assert hashlib.sha256(lora.read_bytes()).hexdigest() == before and not (server.workspace / "loras" /
                                                                            lora.name).exists()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server.url)
        page.get_by_role("tab", name="Generate").click()
        page.get_by_text("LoRA stack").click()
        page.locator("#gen-lora-1 input").click()
        page.get_by_role("option", name="comfy-style.safetensors · ComfyUI").wait_for(timeout=30_000)
    finally:
        page.close()


def test_comfyuis_split_anima_files_are_listed_and_generate(comfy_server, browser):
    """ComfyUI's diffusion_models/ Anima file shows in the model list and makes images through
    the API, its text encoder and VAE found in text_encoders/ and vae/; nothing is written there."""
    from gradio_client import Client
    from PIL import Image

    server, lora = comfy_server
    models = lora.parent.parent
    dit = models / "diffusion_models" / "anima-comfy.safetensors"
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}
    client = Client(server.url, verbose=False, analytics_enabled=False)
    result = client.predict("1girl", api_name="/generate", model=str(dit.resolve()), sampler="Euler", seed=5, steps=2, width=64,
                            height=64)
    image = np.asarray(Image.open(result[0]["image"]), dtype=np.int16)
    assert image.shape == (64, 64, 3) and image.std() > 2
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()} == before
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server.url)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-model input").click()
        page.get_by_role("option", name="anima-comfy.safetensors · ComfyUI").wait_for(timeout=30_000)
    finally:
        page.close()
