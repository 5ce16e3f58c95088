"""generate() on demo-anima: PNGs with infotext, seeds, samplers, Anima's prompt conventions,
progress and stop, out-of-memory recovery, what Anima refuses, and equality with a plain
diffusers call."""

import threading

import numpy as np
import pytest
from PIL import Image

from studio.errors import ConfigError, JobStopped, LoraError, StudioError
from studio.generation.anima import ANIMA_SAMPLERS, AnimaRunner, make_anima_scheduler
from studio.generation.generate import generate
from studio.generation.infotext import model_hash, parse_infotext, read_infotext
from studio.generation.prompt import ANIMA_NEGATIVE, build_anima_prompt
from studio.schemas import GenerateConfig, HiresConfig, LoraSpec, PromptStyle

SMALL = {"width": 64, "height": 64, "steps": 2}  # GenerateConfig's smallest size


@pytest.fixture(scope="module")
def anima_models_dir(tmp_path_factory):
    from studio.models.demo_anima import ensure_demo_anima

    models = tmp_path_factory.mktemp("models")
    ensure_demo_anima(models)
    return models


@pytest.fixture(scope="module")
def manager(anima_models_dir):
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    return ModelManager(anima_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))


def run(manager, tmp_path, **fields):
    config = GenerateConfig(**{"prompt": "1girl, solo", "model": "demo-anima", **SMALL, **fields})
    return generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl")


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# --- images and infotext ----------------------------------------------------------------------
def test_generates_pngs_with_full_infotext(manager, anima_models_dir, tmp_path):
    result = run(manager, tmp_path, seed=42, batch_size=2, batch_count=2, cfg_scale=4.5, width=80, height=64)
    assert [image.seed for image in result.images] == [42, 43, 44, 45]
    for image in result.images:
        assert image.path.parent.parent == tmp_path and image.path.name.endswith(f"-{image.seed}.png")
        assert Image.open(image.path).size == (80, 64)
        prompt, negative, params = parse_infotext(read_infotext(image.path))
        assert prompt == "masterpiece, best quality, score_7, safe, 1girl, solo"
        assert negative == ANIMA_NEGATIVE
        assert params["Seed"] == str(image.seed) and params["Steps"] == "2" and params["CFG scale"] == "4.5"
        assert params["Size"] == "80x64" and params["Sampler"] == "Euler" and params["Model"] == "demo-anima"
        transformer = anima_models_dir / "demo-anima" / "transformer" / "diffusion_pytorch_model.safetensors"
        assert params["Model hash"] == model_hash(transformer)
    assert len({pixels(image.path).tobytes() for image in result.images}) == 4
    assert all(pixels(image.path).std() > 2 for image in result.images)  # not a flat colour


def test_same_seed_same_image_other_seed_other_image(manager, tmp_path):
    first = run(manager, tmp_path, seed=7).images[0].path
    again = run(manager, tmp_path, seed=7).images[0].path
    other = run(manager, tmp_path, seed=8).images[0].path
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_each_image_reproduces_alone_from_its_seed(manager, tmp_path):
    batch = run(manager, tmp_path, seed=100, batch_size=3)
    alone = run(manager, tmp_path, seed=101)
    assert np.abs(pixels(batch.images[1].path) - pixels(alone.images[0].path)).max() <= 2


def test_matches_a_plain_diffusers_call(manager, tmp_path):
    import torch

    result = run(manager, tmp_path, seed=5, cfg_scale=4.0, negative_prompt="lowres",
                 style=PromptStyle(quality_tags=False, default_negative=False))
    pipe = manager.get("demo-anima").model  # the loaded AnimaModularPipeline, default guider (CFG 4)
    plain = pipe(prompt="1girl, solo", negative_prompt="lowres", width=64, height=64, num_inference_steps=2,
                 generator=torch.Generator("cpu").manual_seed(5), output="images")[0]
    assert np.abs(pixels(result.images[0].path) - np.asarray(plain, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("sampler", list(ANIMA_SAMPLERS))
def test_every_anima_sampler_runs_and_is_recorded(manager, tmp_path, sampler):
    result = run(manager, tmp_path, seed=3, sampler=sampler, steps=3)
    assert parse_infotext(result.images[0].infotext)[2]["Sampler"] == sampler
    assert pixels(result.images[0].path).std() > 2


def test_unipc_converges_to_the_euler_image():
    """The two samplers solve the same flow ODE: with many steps their images agree closely."""
    from studio.models.demo_anima import build_demo_anima_pipeline

    pipe = build_demo_anima_pipeline()
    base = dict(pipe.scheduler.config)

    def sample(name):
        import torch

        pipe.update_components(scheduler=make_anima_scheduler(name, base))
        return pipe(prompt="1girl", num_inference_steps=16, height=32, width=32, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(0), output="images")

    euler, unipc = sample("Euler"), sample("UniPC")
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert np.abs(euler - unipc).mean() < 0.01


def test_the_schema_default_sampler_becomes_anima_default(manager, tmp_path):
    config = GenerateConfig(model="demo-anima", prompt="1girl", **SMALL)  # sampler left at "Euler a"
    result = generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl")
    assert parse_infotext(result.images[0].infotext)[2]["Sampler"] == "Euler"


def test_cfg_one_turns_guidance_off(manager, tmp_path):
    with_cfg = run(manager, tmp_path, seed=9, cfg_scale=4.5)
    without = run(manager, tmp_path, seed=9, cfg_scale=1.0)
    runner = AnimaRunner.for_record(manager.get("demo-anima"), manager)
    assert runner.sampling.guider.num_conditions == 1  # the negative prompt is not even encoded
    assert not np.array_equal(pixels(with_cfg.images[0].path), pixels(without.images[0].path))


# --- progress, stop, out of memory ------------------------------------------------------------
def test_progress_is_reported_per_step(manager, tmp_path):
    seen = []
    config = GenerateConfig(prompt="1girl", model="demo-anima", **{**SMALL, "steps": 3}, batch_count=2)
    generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl",
             report=lambda fraction, message: seen.append((fraction, message)))
    steps = [(f, m) for f, m in seen if f is not None and "step" in m]
    assert [f for f, _ in steps] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]
    assert steps[3][1] == "batch 2/2: step 4/6"


def test_stop_interrupts_between_steps_and_saves_nothing(manager, tmp_path):
    stop = threading.Event()
    calls = []

    def report(fraction, message):
        calls.append(message)
        if "step 1/" in message:
            stop.set()

    config = GenerateConfig(prompt="1girl", model="demo-anima", **{**SMALL, "steps": 20})
    with pytest.raises(JobStopped):
        generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl", report=report, stop=stop)
    assert not any("step 2/" in message for message in calls)
    assert list(tmp_path.rglob("*.png")) == []


def test_out_of_memory_retries_once_with_tiled_vae(manager, tmp_path, monkeypatch):
    import torch

    runner = AnimaRunner.for_record(manager.get("demo-anima"), manager)
    original = type(runner.sampling).__call__
    failures = {"left": 1}

    def flaky(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(runner.sampling), "__call__", flaky)
    vae = runner.pipe.vae
    try:
        result = run(manager, tmp_path, seed=2)
        assert result.images and any("tiled VAE" in w for w in result.warnings)
        assert vae.use_tiling
        failures["left"] = 2  # tiling is on already and the CPU has no lower policy: report clearly
        with pytest.raises(StudioError, match="out of GPU memory"):
            run(manager, tmp_path, seed=2)
    finally:
        vae.disable_tiling()
        vae.disable_slicing()


# --- what Anima refuses, before loading anything ----------------------------------------------
class NeverLoads:
    """A manager loader that fails the test if anything is loaded."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")


@pytest.fixture()
def unloading_manager(tmp_path):
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    return ModelManager(tmp_path, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"), loader=NeverLoads())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"width": 72, "height": 64}, r"width divisible by 16; 72 is not \(try 64 or 80\)"),
        ({"width": 64, "height": 1000}, r"height divisible by 16; 1000 is not \(try 992 or 1008\)"),
        ({"sampler": "Euler a"}, "does not work with Anima.*choose one of: Euler, UniPC"),
        ({"sampler": "DPM++ 2M Karras"}, "does not work with Anima"),
        ({"hires": HiresConfig()}, "hires fix is not available for Anima"),
    ],
)
def test_what_anima_cannot_do_is_refused_clearly(unloading_manager, tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        run(unloading_manager, tmp_path, **fields)


def test_a_broken_lora_file_is_refused_clearly(manager, tmp_path):
    # LoRAs themselves work on Anima (tests/test_anima_lora.py); a file that is no LoRA is refused.
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"placeholder")
    with pytest.raises(LoraError, match="style.safetensors"):
        run(manager, tmp_path, loras=[LoraSpec(path=str(lora))])


# --- Anima's prompt conventions ---------------------------------------------------------------
def test_anima_prompt_leads_with_its_special_tags_and_merges_its_negative():
    positive, negative = build_anima_prompt("1girl, hatsune miku, vocaloid, @wlop, smile", "lowres", PromptStyle())
    assert positive == "masterpiece, best quality, score_7, safe, 1girl, hatsune miku, vocaloid, @wlop, smile"
    assert negative == "lowres, worst quality, low quality, score_1, score_2, score_3, artist name"


def test_anima_prompt_is_idempotent():
    style = PromptStyle(rating="sensitive", year="oldest")
    once = build_anima_prompt("1girl, solo", "", style)
    assert once[0] == "old, masterpiece, best quality, score_7, sensitive, 1girl, solo"
    assert build_anima_prompt(*once, style) == once


def test_the_users_own_score_and_rating_replace_the_defaults():
    positive, _ = build_anima_prompt("1girl, score_9, nsfw", "", PromptStyle())
    assert positive == "masterpiece, best quality, 1girl, score_9, nsfw"
    positive, negative = build_anima_prompt("(masterpiece:1.2), 1girl, low quality", "", PromptStyle())
    assert positive.startswith("best quality, score_7, safe, (masterpiece:1.2)")
    assert "low quality" not in negative.split(", ")  # not fought against


def test_style_flags_turn_the_additions_off_and_aesthetic_is_animagines_only():
    style = PromptStyle(quality_tags=False, default_negative=False, aesthetic="very aesthetic")
    assert build_anima_prompt("1girl", "", style) == ("1girl", "")
