"""The tiny demo SDXL: deterministic, offline, loadable as a diffusers folder and as one SGM file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studio.fileio import COMPLETE_MARKER
from studio.models import demo as demo_models
from studio.models import sgm_convert

PROMPT = "masterpiece, best quality, 1girl, solo, hatsune miku, long hair, smile"
NEGATIVE = "lowres, worst quality"
TYPICAL_PROMPTS = [
    "1girl, solo",
    "masterpiece, best quality, very aesthetic, absurdres, 1girl, hatsune miku, vocaloid, "
    "long hair, twintails, blue eyes, school uniform, smile, looking at viewer, outdoors",
    "a photo of a cat sitting on the sofa",
    "1boy, (red eyes:1.2), hat, @artist name, 2024",
    "初音ミク, 1girl",  # characters outside the learned merges still round-trip (byte-level BPE)
]


def generate(pipe, prompt=PROMPT, steps=2, size=64, seed=0):
    import torch

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        prompt,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=6.0,
        generator=generator,
        output_type="np",
    )
    return result.images


def all_weights(pipe):
    return {
        f"{name}.{key}": tensor
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        for key, tensor in getattr(pipe, name).state_dict().items()
    }


@pytest.fixture(scope="module")
def pipe():
    return demo_models.build_demo_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def reference_image(pipe):
    return generate(pipe)


@pytest.fixture(scope="module")
def cached_demo(tmp_path_factory):
    return demo_models.ensure_demo_sdxl(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def config_only_folder(cached_demo, tmp_path_factory):
    """The diffusers folder without any weights: from_single_file must take every weight from the
    single file (diffusers silently falls back to a component's folder weights when it cannot find
    that component in the checkpoint)."""
    folder = tmp_path_factory.mktemp("config-only") / "demo-sdxl"
    shutil.copytree(cached_demo.folder, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


# --- determinism and usefulness of the random weights ---------------------------------------------
def test_same_seed_gives_identical_weights_and_images(pipe, reference_image):
    again = demo_models.build_demo_sdxl_pipeline(seed=0)
    weights, weights_again = all_weights(pipe), all_weights(again)
    assert weights.keys() == weights_again.keys()
    for key, tensor in weights.items():
        assert tensor.equal(weights_again[key]), key
    np.testing.assert_array_equal(generate(again), reference_image)


def test_other_seed_gives_other_weights_and_image(pipe, reference_image):
    other = demo_models.build_demo_sdxl_pipeline(seed=1)
    assert not other.unet.conv_in.weight.equal(pipe.unet.conv_in.weight)
    assert not other.text_encoder_2.text_projection.weight.equal(pipe.text_encoder_2.text_projection.weight)
    assert np.abs(generate(other) - reference_image).max() > 1e-3


def test_image_is_finite_and_not_constant(reference_image):
    assert reference_image.shape == (1, 64, 64, 3)
    assert np.isfinite(reference_image).all()
    assert reference_image.std() > 0.02
    assert 0.05 < reference_image.mean() < 0.95  # not saturated to black or white


def test_prompt_changes_the_image(pipe, reference_image):
    other = generate(pipe, prompt="1boy, short hair, night, city street")
    assert np.abs(other - reference_image).max() > 1e-3


def test_a_lora_changes_the_image(reference_image):
    from peft import LoraConfig

    lora_pipe = demo_models.build_demo_sdxl_pipeline(seed=0)
    lora_pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    assert np.abs(generate(lora_pipe) - reference_image).max() > 1e-3


def test_shapes_follow_sdxl(pipe):
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    time_ids_dim = 6 * pipe.unet.config.addition_time_embed_dim
    expected_add_dim = time_ids_dim + pipe.text_encoder_2.config.projection_dim
    assert pipe.unet.config.projection_class_embeddings_input_dim == expected_add_dim
    assert pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.scheduler.config.steps_offset == 1


# --- tokenizer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", TYPICAL_PROMPTS)
def test_tokenizer_round_trips_typical_prompts(pipe, prompt):
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tokenizer(prompt).input_ids
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        # CLIP decodes every word end as a space ("1 girl , solo"); text and order survive
        assert "".join(decoded.split()) == "".join(prompt.lower().split())


def test_tokenizer_wraps_prompts_in_bos_and_eos(pipe):
    ids = pipe.tokenizer("1girl, solo").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.convert_ids_to_tokens(ids[0]) == "<|startoftext|>"
    assert pipe.tokenizer.convert_ids_to_tokens(ids[-1]) == "<|endoftext|>"
    assert len(ids) == 6  # bos, "1", "girl", ",", "solo", eos: booru words are single tokens


def test_typical_prompt_takes_a_realistic_token_count(pipe):
    ids = pipe.tokenizer(TYPICAL_PROMPTS[1]).input_ids
    assert len(ids) <= 45  # real CLIP: 41 tokens; letters alone would take ~150


def test_text_encoder_special_ids_match_tokenizers(pipe):
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert encoder.config.bos_token_id == tokenizer.bos_token_id
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.pad_token_id == tokenizer.pad_token_id
        assert encoder.config.vocab_size == len(tokenizer)
    assert pipe.tokenizer_2.pad_token == "!"  # as in real SDXL
    padded = pipe.tokenizer_2("1girl", padding="max_length").input_ids
    assert len(padded) == 77 and padded[-1] == pipe.tokenizer_2.convert_tokens_to_ids("!")


# --- writing into a models cache -------------------------------------------------------------------
def test_folder_load_matches_in_memory_pipeline(cached_demo, reference_image):
    from diffusers import StableDiffusionXLPipeline

    loaded = StableDiffusionXLPipeline.from_pretrained(cached_demo.folder)
    np.testing.assert_allclose(generate(loaded), reference_image, atol=1e-5)


def test_single_file_load_matches_in_memory_pipeline(cached_demo, reference_image):
    from diffusers import StableDiffusionXLPipeline

    loaded = StableDiffusionXLPipeline.from_single_file(
        str(cached_demo.single_file), config=str(cached_demo.folder)
    )
    np.testing.assert_allclose(generate(loaded), reference_image, atol=1e-5)


def test_single_file_supplies_every_weight(cached_demo, config_only_folder, reference_image):
    from diffusers import StableDiffusionXLPipeline

    loaded = StableDiffusionXLPipeline.from_single_file(
        str(cached_demo.single_file), config=str(config_only_folder)
    )
    np.testing.assert_allclose(generate(loaded), reference_image, atol=1e-5)


def test_single_file_uses_sgm_names_and_metadata(cached_demo, pipe):
    from safetensors import safe_open

    with safe_open(str(cached_demo.single_file), framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        in_proj = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    width = pipe.text_encoder_2.config.hidden_size
    assert in_proj.shape == (3 * width, width)
    assert projection.shape == (width, pipe.text_encoder_2.config.projection_dim)  # OpenCLIP: transposed
    assert projection.equal(pipe.text_encoder_2.text_projection.weight.T)
    assert vae_q.ndim == 4  # LDM's VAE attention uses 1x1 convs
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    ):
        assert key in keys, key
    merged_qkv = 4 * pipe.text_encoder_2.config.num_hidden_layers  # per layer: 6 q/k/v tensors -> 2 in_proj
    assert len(keys) == len(all_weights(pipe)) - merged_qkv
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_ensure_is_idempotent(cached_demo, tmp_path):
    def stamps():
        files = [cached_demo.single_file, *cached_demo.folder.rglob("*")]
        return {path: path.stat().st_mtime_ns for path in files if path.is_file()}

    before = stamps()
    again = demo_models.ensure_demo_sdxl(cached_demo.folder.parent)
    assert again == cached_demo
    assert stamps() == before
    assert [p.name for p in cached_demo.folder.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_half_written_folder_is_rebuilt(tmp_path, cached_demo, reference_image):
    from diffusers import StableDiffusionXLPipeline

    cache = tmp_path / "models"
    shutil.copytree(cached_demo.folder, cache / "demo-sdxl")
    shutil.copy(cached_demo.single_file, cache / "demo-sdxl.safetensors")
    (cache / "demo-sdxl" / COMPLETE_MARKER).unlink()  # a crash before the marker was written
    shutil.rmtree(cache / "demo-sdxl" / "unet")
    (cache / "demo-sdxl" / "leftover.txt").write_text("from the crashed run")

    rebuilt = demo_models.ensure_demo_sdxl(cache)
    assert (rebuilt.folder / COMPLETE_MARKER).is_file()
    assert not (rebuilt.folder / "leftover.txt").exists()
    marker = json.loads((rebuilt.folder / COMPLETE_MARKER).read_text())
    assert marker["version"] == demo_models.DEMO_FORMAT_VERSION
    loaded = StableDiffusionXLPipeline.from_pretrained(rebuilt.folder)
    np.testing.assert_allclose(generate(loaded), reference_image, atol=1e-5)


def test_missing_single_file_is_rebuilt(tmp_path, cached_demo):
    cache = tmp_path / "models"
    shutil.copytree(cached_demo.folder, cache / "demo-sdxl")
    marker = cache / "demo-sdxl" / COMPLETE_MARKER
    marker_mtime = marker.stat().st_mtime_ns
    rebuilt = demo_models.ensure_demo_sdxl(cache)
    from safetensors.torch import load_file

    expected, written = load_file(cached_demo.single_file), load_file(rebuilt.single_file)
    assert written.keys() == expected.keys()
    assert all(written[key].equal(expected[key]) for key in expected)
    assert marker.stat().st_mtime_ns == marker_mtime  # the complete folder was left alone


# --- the converter on full-size SDXL shapes (meta tensors: no memory, no time) -------------------
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
)


def test_unet_converter_on_full_size_sdxl_matches_known_names_and_diffusers_loader():
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    diffusers_sd = unet.state_dict()
    sgm = sgm_convert.unet_to_sgm(diffusers_sd, unet.config)
    for key in (  # names as they appear in sd_xl_base_1.0.safetensors
        "model.diffusion_model.input_blocks.6.0.op.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
    ):
        assert key in sgm, key
    assert sgm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert not any(".input_blocks.9." in key or ".output_blocks.9." in key for key in sgm)
    back = convert_ldm_unet_checkpoint(sgm, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in diffusers_sd.items()}


def test_vae_converter_on_full_size_sdxl_round_trips_through_diffusers_loader():
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    diffusers_sd = vae.state_dict()
    ldm = sgm_convert.vae_to_ldm(diffusers_sd, vae.config)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in diffusers_sd.items()}


def test_open_clip_converter_on_full_size_clip_g():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
    )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    sgm = sgm_convert.open_clip_to_sgm(model.state_dict())
    prefix = "conditioner.embedders.1.model."
    assert sgm[prefix + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert sgm[prefix + "transformer.resblocks.31.mlp.c_fc.weight"].shape == (5120, 1280)
    # the key diffusers probes to recognise an SDXL base checkpoint
    assert prefix + "transformer.resblocks.9.mlp.c_proj.bias" in sgm


def test_converter_refuses_unknown_keys():
    with pytest.raises(ValueError, match="no SGM name"):
        sgm_convert.unet_to_sgm({"encoder_hid_proj.weight": None}, SDXL_UNET_CONFIG)


# --- module hygiene -------------------------------------------------------------------------------
def test_import_does_no_work():
    code = (
        "import sys, studio.models.demo; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    repo_root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    )
    assert out.stdout.strip() == "[]"


def test_a_single_file_given_by_path_finds_its_configs_in_the_models_folder(cached_demo, tmp_path):
    """Offline, diffusers needs an SDXL single file's configs; an SDXL diffusers folder in the
    models cache whose UNet has the file's shape lends them (one of another shape does not)."""
    import json
    import shutil

    from studio.models.catalog import load_catalog, resolve_reference
    from studio.models.loaders import materialize

    copy = tmp_path / "my-checkpoint.safetensors"
    shutil.copy(cached_demo.single_file, copy)
    source = resolve_reference(str(copy), load_catalog())
    assert source.config is None
    models = cached_demo.folder.parent
    assert materialize(source, models).config == str(cached_demo.folder)
    other = tmp_path / "models"
    shutil.copytree(cached_demo.folder, other / "other-sdxl")
    config_file = other / "other-sdxl" / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "projection_class_embeddings_input_dim": 1}))
    assert materialize(source, other).config is None
