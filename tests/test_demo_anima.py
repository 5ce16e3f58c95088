"""demo-anima and what it stands on: the torchvision shim, the tiny Anima built offline, its
place in the models cache, and loading through the real Anima loader."""

import json
import shutil

import numpy as np
import pytest

from studio.errors import ModelNotFoundError
from studio.fileio import COMPLETE_MARKER, folder_is_complete
from studio.models import anima_compat, demo_anima
from studio.models.catalog import ModelSource, load_catalog, resolve_reference
from studio.models.loaders import load_anima, load_model

PROMPT = "masterpiece, best quality, score_7, safe, 1girl, solo, hatsune miku, @artist name, long hair"
NEGATIVE = "worst quality, low quality"


def generate(pipe, prompt=PROMPT, size=32, seed=0, steps=2):
    import torch

    return pipe(
        prompt=prompt,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        output="images",
    )


def all_weights(pipe):
    return {
        f"{name}.{key}": tensor
        for name in ("text_encoder", "text_conditioner", "transformer", "vae")
        for key, tensor in getattr(pipe, name).state_dict().items()
    }


@pytest.fixture(scope="module")
def pipe():
    return demo_anima.build_demo_anima_pipeline(seed=0)


@pytest.fixture(scope="module")
def reference_image(pipe):
    return generate(pipe)


@pytest.fixture(scope="module")
def cached_folder(tmp_path_factory):
    return demo_anima.ensure_demo_anima(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def loaded(cached_folder):
    import torch

    source = ModelSource("demo-anima", "anima", "folder", str(cached_folder), demo=True)
    return load_anima(source, torch.float32, "cpu")


# --- the torchvision shim --------------------------------------------------------------------
def reference_nearest(image, height, width):
    """torchvision's documented NEAREST for tensors, by index arithmetic: output (i, j) reads
    input (floor(i * H / height), floor(j * W / width))."""
    in_h, in_w = image.shape[-2:]
    rows = [i * in_h // height for i in range(height)]
    cols = [j * in_w // width for j in range(width)]
    return image[..., rows, :][..., :, cols]


@pytest.mark.parametrize(
    "shape, size",
    [
        ((1, 1, 32, 32), (4, 4)),  # the padding mask at 32 px -> 4x4 latents
        ((1, 1, 1024, 832), (128, 104)),  # a real size, downscale 8
        ((1, 1, 7, 5), (10, 3)),  # non-integer ratios, up and down at once
        ((2, 3, 13, 17), (17, 13)),
        ((1, 100, 30), (30, 100)),  # three dimensions, as torchvision also accepts
        ((9, 9), (4, 7)),
    ],
)
def test_shim_resize_matches_torchvision_nearest(shape, size):
    import torch

    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    resized = anima_compat.nearest_resize(image, list(size), interpolation=anima_compat.InterpolationMode.NEAREST)
    assert resized.shape == (*shape[:-2], *size)
    assert torch.equal(resized, reference_nearest(image, *size))


def test_shim_resize_keeps_dtype_and_refuses_what_it_does_not_implement():
    import torch

    mask = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    resized = anima_compat.nearest_resize(mask, [4, 6])
    assert resized.dtype == torch.bool and torch.equal(resized, reference_nearest(mask, 4, 6))
    assert anima_compat.nearest_resize(mask.to(torch.bfloat16), [4, 6]).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="NEAREST"):
        anima_compat.nearest_resize(mask.float(), [4, 6], interpolation="bilinear")
    with pytest.raises(ValueError, match="height, width"):
        anima_compat.nearest_resize(mask.float(), [4])


def test_shim_is_installed_only_once_and_only_without_torchvision():
    import importlib

    assert not anima_compat.torchvision_available()
    assert anima_compat.ensure_cosmos_resize() is True
    module = importlib.import_module(anima_compat.COSMOS_MODULE)
    installed = module.transforms
    assert anima_compat.ensure_cosmos_resize() is True
    assert module.transforms is installed
    assert module.transforms.functional.resize is anima_compat.nearest_resize


def test_tiny_cosmos_transformer_runs_with_the_shim_and_uses_the_padding_mask():
    import torch

    anima_compat.ensure_cosmos_resize()
    torch.manual_seed(0)
    transformer = demo_anima._build_transformer().eval()
    latents = torch.randn(1, demo_anima.LATENT_CHANNELS, 1, 4, 4)
    text = torch.randn(1, 8, demo_anima.TEXT_EMBED)
    timestep = torch.tensor([0.5])
    with torch.no_grad():
        empty = transformer(latents, timestep, text, padding_mask=torch.zeros(1, 1, 32, 32), return_dict=False)[0]
        padded = torch.zeros(1, 1, 32, 32)
        padded[..., 16:, :] = 1.0
        masked = transformer(latents, timestep, text, padding_mask=padded, return_dict=False)[0]
    assert empty.shape == latents.shape and torch.isfinite(empty).all()
    assert not torch.equal(empty, masked)  # the resized mask reached the model


# --- tokenizers -------------------------------------------------------------------------------
def test_qwen_tokenizer_is_byte_level_and_learned_booru_words():
    tokenizer = demo_anima.build_demo_qwen_tokenizer()
    for text in (PROMPT, "hatsune miku \\(cosplay\\), 1girl", "初音ミク, 1girl"):
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.tokenize(" girl") == ["Ġgirl"]
    assert len(tokenizer(PROMPT).input_ids) < len(PROMPT) // 2  # merges make words, not letters
    assert tokenizer.pad_token == "<|endoftext|>"


def test_t5_tokenizer_has_t5s_special_ids_and_sentinels():
    tokenizer = demo_anima.build_demo_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("1girl, solo, hatsune miku").input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert {"▁solo", "▁hatsune", "▁miku"} <= set(tokenizer.convert_ids_to_tokens(ids))  # whole words
    assert "<extra_id_0>" in tokenizer.get_vocab()


# --- the tiny model ---------------------------------------------------------------------------
def test_same_seed_gives_identical_weights_and_images(pipe, reference_image):
    again = demo_anima.build_demo_anima_pipeline(seed=0)
    weights, weights_again = all_weights(pipe), all_weights(again)
    assert weights.keys() == weights_again.keys()
    for key, tensor in weights.items():
        assert tensor.equal(weights_again[key]), key
    np.testing.assert_array_equal(generate(again), reference_image)


def test_other_seed_gives_other_weights_and_image(pipe, reference_image):
    other = demo_anima.build_demo_anima_pipeline(seed=1)
    assert not other.transformer.proj_out.weight.equal(pipe.transformer.proj_out.weight)
    assert not other.text_conditioner.out_proj.weight.equal(pipe.text_conditioner.out_proj.weight)
    assert np.abs(generate(other) - reference_image).max() > 1e-3


@pytest.mark.parametrize("size", [32, 64])
def test_images_are_finite_not_constant_and_follow_the_seed(pipe, size):
    image = generate(pipe, size=size, seed=3)
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.02
    assert 0.05 < image.mean() < 0.95
    np.testing.assert_array_equal(generate(pipe, size=size, seed=3), image)
    assert np.abs(generate(pipe, size=size, seed=4) - image).max() > 1e-3


def test_prompt_changes_the_image(pipe, reference_image):
    other = generate(pipe, prompt="1boy, short hair, night, city street")
    assert np.abs(other - reference_image).max() > 1e-3


def test_shapes_follow_anima(pipe):
    assert pipe.vae_scale_factor == 8
    assert pipe.num_channels_latents == 16
    assert tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
    assert pipe.text_conditioner.config.target_vocab_size == len(pipe.t5_tokenizer)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


# --- the models cache -------------------------------------------------------------------------
def test_cache_holds_a_modular_diffusers_folder(cached_folder):
    index = json.loads((cached_folder / "modular_model_index.json").read_text())
    assert index["_class_name"] == "AnimaModularPipeline"
    for name in ("text_encoder", "tokenizer", "t5_tokenizer", "text_conditioner", "transformer", "vae", "scheduler"):
        assert (cached_folder / name).is_dir(), name
        assert index[name][2]["pretrained_model_name_or_path"] is None  # found beside the index
    assert not list(cached_folder.rglob("*.bin"))
    assert folder_is_complete(cached_folder, demo_anima.DEMO_ANIMA_FORMAT_VERSION)


def test_ensure_writes_once(cached_folder):
    weights = cached_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert demo_anima.ensure_demo_anima(cached_folder.parent) == cached_folder
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["marker removed", "old version"])
def test_half_written_or_outdated_folder_is_rebuilt(cached_folder, tmp_path, damage):
    folder = tmp_path / "demo-anima"
    shutil.copytree(cached_folder, folder)
    marker = folder / COMPLETE_MARKER
    if damage == "marker removed":
        marker.unlink()
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # a crash midway
    else:
        marker.write_text(json.dumps({"version": demo_anima.DEMO_ANIMA_FORMAT_VERSION - 1}))
    assert demo_anima.ensure_demo_anima(tmp_path) == folder
    assert folder_is_complete(folder, demo_anima.DEMO_ANIMA_FORMAT_VERSION)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- loading through the real loader ----------------------------------------------------------
def test_loads_through_the_anima_loader_and_matches_the_build(loaded, reference_image):
    from diffusers import AnimaModularPipeline

    assert isinstance(loaded.model, AnimaModularPipeline)
    assert loaded.weights_file.name == "diffusion_pytorch_model.safetensors"
    assert loaded.weights_file.parent.name == "transformer"
    assert 0 < loaded.largest_component_bytes < loaded.size_bytes
    np.testing.assert_allclose(generate(loaded.model), reference_image, atol=1e-5)


def test_catalog_demo_materializes_and_loads(tmp_path):
    import torch

    source = resolve_reference("demo-anima", load_catalog())
    assert (source.family, source.kind, source.location) == ("anima", "demo", "anima")
    loaded = load_model(source, tmp_path, torch.float32, "cpu")
    assert (tmp_path / "demo-anima" / "modular_model_index.json").is_file()
    assert generate(loaded.model).shape == (1, 32, 32, 3)


def test_folders_and_repo_ids_resolve_to_the_anima_family(cached_folder):
    catalog = load_catalog()
    assert resolve_reference(str(cached_folder), catalog).family == "anima"
    assert resolve_reference("circlestone-labs/Anima-Base-v1.0-Diffusers", catalog).family == "anima"
    assert catalog["anima"].family == "anima" and catalog["anima"].defaults["sampler"] == "Euler"


def test_a_missing_component_is_named(cached_folder, tmp_path):
    import torch

    folder = tmp_path / "broken-anima"
    shutil.copytree(cached_folder, folder)
    shutil.rmtree(folder / "vae")
    source = ModelSource("broken-anima", "anima", "folder", str(folder))
    with pytest.raises(ModelNotFoundError, match="vae could not be loaded"):
        load_anima(source, torch.float32, "cpu")


def test_cpu_placement_keeps_the_pipeline_on_the_cpu(loaded):
    from studio.models.devices import DeviceInfo
    from studio.models.vram import PLACEMENTS, VramPolicy

    placement = PLACEMENTS["anima"]
    placement.place(loaded.model, VramPolicy.CPU, DeviceInfo("cpu", "CPU"))
    assert str(loaded.model.device) == "cpu"
    placement.reset(loaded.model)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["high", "normal", "low"])
def test_gpu_policies_run(cached_folder, policy):
    import torch

    from studio.models.devices import probe_devices
    from studio.models.vram import PLACEMENTS, VramPolicy

    device = probe_devices()
    if not device.accelerator:
        pytest.skip("needs a CUDA device")
    source = ModelSource("demo-anima", "anima", "folder", str(cached_folder), demo=True)
    pipe = load_anima(source, torch.float32, device.execution_device).model
    PLACEMENTS["anima"].place(pipe, VramPolicy(policy), device)
    assert pipe._execution_device.type == "cuda"
    assert np.isfinite(generate(pipe, size=64)).all()
