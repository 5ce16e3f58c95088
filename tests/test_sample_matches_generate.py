"""A training sample is the image the Generate tab makes with the saved LoRA and the sample's own
infotext (prompt, seed, sampler, CFG, size): the trainer samples through the same prompt encoder
and sampler, so what a run shows is what the user gets."""

import numpy as np
import pytest
from PIL import Image

from studio.generation.generate import generate
from studio.generation.infotext import parse_infotext, read_infotext
from studio.schemas import GenerateConfig, LoraSpec
from studio.training.trainer import train
from tests.train_fixtures import fast_config, make_dataset


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("model", ["demo-sdxl", "demo-anima"])
def test_the_last_sample_is_the_generate_tabs_image_with_the_saved_lora(model, tmp_path, demo_models_dir):
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    config = fast_config(make_dataset(tmp_path / "data"), pretrained_model=model, max_train_steps=2,
                         learning_rate=1e-2, sample_prompts=["1girl, solo, (smile:1.2)"], sample_every_n_steps=2,
                         sample_steps=2, sample_size=(64, 64))
    result = train(config, run_dir=tmp_path / "run", models_dir=demo_models_dir, cache_dir=tmp_path / "cache")
    sample = result.run_dir / "samples" / "step000002-0.png"
    prompt, negative, params = parse_infotext(read_infotext(sample))
    manager = ModelManager(demo_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    images = []
    for loras in ([LoraSpec(path=str(result.loras[-1]), weight=1.0)], []):
        request = GenerateConfig(
            model=model, prompt=prompt, negative_prompt=negative, seed=int(params["Seed"]), sampler=params["Sampler"],
            cfg_scale=float(params["CFG scale"]), steps=int(params["Steps"]), width=64, height=64, loras=loras,
            style={"quality_tags": False, "default_negative": False})
        images.append(pixels(generate(manager, request, outputs_dir=tmp_path / "out",
                                      default_model="demo-sdxl").images[0].path))
    with_lora, without = images
    assert np.array_equal(with_lora, pixels(sample))
    assert not np.array_equal(without, pixels(sample)), "the LoRA is part of that image"
