"""generate() on demo-sdxl: images, infotext, seeds, samplers, hires, stop, out-of-memory recovery,
and equality with a plain diffusers call."""

import threading

import numpy as np
import pytest
from PIL import Image

from studio.errors import JobStopped, StudioError
from studio.generation.generate import generate, image_seeds
from studio.generation.infotext import model_hash, parse_infotext, read_infotext
from studio.generation.samplers import SAMPLERS
from studio.schemas import GenerateConfig, HiresConfig, PromptStyle

SMALL = {"width": 64, "height": 64, "steps": 2}


def run(manager, tmp_path, **fields):
    config = GenerateConfig(**{"prompt": "1girl, solo", **SMALL, **fields})
    return generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl")


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generates_pngs_with_full_infotext(demo_manager, demo_models_dir, tmp_path):
    result = run(demo_manager, tmp_path, seed=42, batch_size=2, batch_count=2, cfg_scale=7.0,
                 style=PromptStyle(year="newest", rating="safe"))
    assert [image.seed for image in result.images] == [42, 43, 44, 45]
    for image in result.images:
        assert image.path.parent.parent == tmp_path and image.path.name.endswith(f"-{image.seed}.png")
        prompt, negative, params = parse_infotext(read_infotext(image.path))
        assert prompt == "1girl, solo, safe, newest, masterpiece, best quality, very aesthetic, absurdres"
        assert negative.startswith("nsfw, lowres")
        assert params["Seed"] == str(image.seed) and params["Steps"] == "2" and params["CFG scale"] == "7"
        assert params["Size"] == "64x64" and params["Sampler"] == "Euler a" and params["Model"] == "demo-sdxl"
        assert params["Model hash"] == model_hash(demo_models_dir / "demo-sdxl" / "unet" / "diffusion_pytorch_model.safetensors")
    assert len({pixels(image.path).tobytes() for image in result.images}) == 4


def test_each_image_reproduces_alone_from_its_seed(demo_manager, tmp_path):
    batch = run(demo_manager, tmp_path, seed=100, batch_size=3)
    alone = run(demo_manager, tmp_path, seed=101)
    # batched and single convolutions may round differently on CPU: equal up to 8-bit rounding
    assert np.abs(pixels(batch.images[1].path) - pixels(alone.images[0].path)).max() <= 2


def test_random_seed_is_recorded(demo_manager, tmp_path):
    result = run(demo_manager, tmp_path, seed=-1)
    seed = result.images[0].seed
    assert 0 <= seed < 2**32
    assert np.array_equal(pixels(run(demo_manager, tmp_path, seed=seed).images[0].path), pixels(result.images[0].path))


def test_matches_a_plain_diffusers_call(demo_manager, tmp_path):
    import torch

    result = run(demo_manager, tmp_path, seed=5, style=PromptStyle(quality_tags=False, default_negative=False),
                 negative_prompt="lowres")
    pipe = demo_manager.get("demo-sdxl").model
    plain = pipe(prompt="1girl, solo", negative_prompt="lowres", width=64, height=64, num_inference_steps=2,
                 guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    difference = np.abs(pixels(result.images[0].path) - np.asarray(plain, dtype=np.int16))
    assert difference.max() <= 1  # equal up to 8-bit rounding of float noise


def test_folder_and_single_file_give_the_same_image(demo_manager, tmp_path):
    folder = run(demo_manager, tmp_path, seed=9, model="demo-sdxl")
    single = run(demo_manager, tmp_path, seed=9, model="demo-sdxl-single-file")
    assert np.array_equal(pixels(folder.images[0].path), pixels(single.images[0].path))
    assert parse_infotext(single.images[0].infotext)[2]["Model"] == "demo-sdxl-single-file"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_and_is_recorded(demo_manager, tmp_path, sampler):
    result = run(demo_manager, tmp_path, seed=3, sampler=sampler)
    params = parse_infotext(result.images[0].infotext)[2]
    assert f"{params['Sampler']} {params.get('Schedule type', '')}".strip() == sampler
    if sampler != "Euler a":
        reference = run(demo_manager, tmp_path, seed=3, sampler="Euler a").images[0].path
        assert not np.array_equal(pixels(result.images[0].path), pixels(reference))


def test_hires_pass_upscales_and_is_recorded(demo_manager, tmp_path):
    result = run(demo_manager, tmp_path, seed=1, hires=HiresConfig(scale=1.5, denoise=0.5, steps=2))
    assert Image.open(result.images[0].path).size == (96, 96)
    params = parse_infotext(result.images[0].infotext)[2]
    assert params["Hires upscale"] == "1.5" and params["Hires steps"] == "2" and params["Denoising strength"] == "0.5"


def test_progress_is_reported_per_step(demo_manager, tmp_path):
    seen = []
    config = GenerateConfig(prompt="1girl", **{**SMALL, "steps": 3}, batch_count=2)
    generate(demo_manager, config, outputs_dir=tmp_path, default_model="demo-sdxl",
             report=lambda fraction, message: seen.append(fraction))
    steps = [f for f in seen if f is not None]
    assert steps[-1] == 1.0 and steps == sorted(steps)
    assert len([f for f in steps if f < 1.0]) >= 5  # 6 denoising steps over two batches


def test_stop_interrupts_within_a_step_and_saves_nothing(demo_manager, tmp_path):
    stop = threading.Event()
    calls = []

    def report(fraction, message):
        calls.append(message)
        if "step 1/" in message:
            stop.set()

    config = GenerateConfig(prompt="1girl", **{**SMALL, "steps": 20})
    with pytest.raises(JobStopped):
        generate(demo_manager, config, outputs_dir=tmp_path, default_model="demo-sdxl", report=report, stop=stop)
    assert not any("step 2/" in message for message in calls)
    assert list(tmp_path.rglob("*.png")) == []


def test_out_of_memory_retries_once_with_tiled_vae(demo_manager, tmp_path, monkeypatch):
    import torch

    record = demo_manager.get("demo-sdxl")
    pipe = record.model
    original = type(pipe).__call__
    failures = {"left": 1}

    def flaky(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", flaky)
    try:
        result = run(demo_manager, tmp_path, seed=2)
        assert result.images and any("tiled VAE" in w for w in result.warnings)
        assert pipe.vae.use_tiling
        failures["left"] = 2  # tiling is on already and the CPU has no lower policy: report clearly
        with pytest.raises(StudioError, match="out of GPU memory"):
            run(demo_manager, tmp_path, seed=2)
    finally:
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()


def test_image_seeds_follow_a1111():
    assert image_seeds(10, 2, 3) == [[10, 11, 12], [13, 14, 15]]
    assert image_seeds(2**32 - 1, 1, 2) == [[2**32 - 1, 0]]
