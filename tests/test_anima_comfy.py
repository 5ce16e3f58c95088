"""ComfyUI's split Anima files (diffusion model with its LLM adapter, Qwen3 text encoder, Qwen-Image
VAE) load into diffusers' components: the demo model written in ComfyUI's layout loads back
tensor for tensor and makes the same image; what is missing or does not fit is named."""

import numpy as np
import pytest

from studio.errors import ModelNotFoundError
from studio.models.catalog import load_catalog, resolve_reference
from tests.anima_comfy_fixture import write_comfy_anima

COMPONENTS = ("transformer", "text_conditioner", "text_encoder", "vae")
# Names in ComfyUI's real files, from the original models' conventions (Cosmos-Predict2's
# MiniTrainDIT with `net.`, Anima's llm_adapter, transformers' Qwen3, Wan 2.1's VAE).
COMFY_NAMES = {
    "diffusion_models/anima-demo.safetensors": [
        "net.x_embedder.proj.1.weight", "net.t_embedder.1.linear_1.weight", "net.t_embedding_norm.weight",
        "net.blocks.0.self_attn.q_proj.weight", "net.blocks.0.self_attn.output_proj.weight",
        "net.blocks.0.cross_attn.k_norm.weight", "net.blocks.0.adaln_modulation_mlp.1.weight",
        "net.blocks.0.mlp.layer1.weight", "net.final_layer.linear.weight",
        "net.final_layer.adaln_modulation.2.weight", "net.llm_adapter.embed.weight",
        "net.llm_adapter.blocks.0.cross_attn.o_proj.weight", "net.llm_adapter.blocks.0.mlp.2.weight",
        "net.llm_adapter.out_proj.weight", "net.llm_adapter.norm.weight"],
    "text_encoders/qwen_3_06b_base.safetensors": [
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.norm.weight", "lm_head.weight"],
    "vae/qwen_image_vae.safetensors": [
        "conv1.weight", "conv2.weight", "encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
        "encoder.downsamples.0.residual.2.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight",
        "decoder.upsamples.0.residual.6.weight", "decoder.upsamples.3.resample.1.weight",
        "decoder.upsamples.4.shortcut.weight", "decoder.head.0.gamma"],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from studio.models.demo_anima import build_demo_anima_pipeline, ensure_demo_anima

    models = tmp_path_factory.mktemp("models")
    ensure_demo_anima(models)  # its configs stand in for the ones ComfyUI's files lack
    return models, build_demo_anima_pipeline()


def load(path, models, **changes):
    import dataclasses

    import torch

    from studio.models.loaders import load_model

    source = dataclasses.replace(resolve_reference(str(path), load_catalog()), **changes)
    return load_model(source, models, torch.float32, "cpu")


def assert_same_weights(expected, loaded, cast=None):
    import torch

    for name in COMPONENTS:
        want, got = getattr(expected, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(want) == set(got), name
        for key, tensor in want.items():
            tensor = tensor.to(cast).float() if cast is not None and tensor.is_floating_point() else tensor
            assert torch.equal(tensor, got[key]), f"{name}.{key}"


def test_comfyui_files_carry_the_original_names(demo, tmp_path):
    from safetensors import safe_open

    from studio.models.catalog import family_of_checkpoint

    _, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path)
    for name, expected in COMFY_NAMES.items():
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            keys = set(handle.keys())
        assert set(expected) <= keys, (name, sorted(set(expected) - keys))
    assert family_of_checkpoint(dit, "sdxl") == "anima"


@pytest.mark.parametrize("prefix", ["net.", "", "model.diffusion_model."])
def test_the_demo_in_comfyui_layout_loads_tensor_for_tensor(demo, tmp_path, prefix):
    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path / "ComfyUI" / "models", dit_prefix=prefix)
    loaded = load(dit, models)
    assert loaded.weights_file == dit, "the DiT file identifies the model (Model hash)"
    assert_same_weights(pipe, loaded.model)
    assert type(loaded.model.tokenizer).__name__ == "Qwen2Tokenizer"


def test_bf16_files_load_as_their_values(demo, tmp_path):
    import torch

    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path, dtype=torch.bfloat16)
    assert_same_weights(pipe, load(dit, models).model, cast=torch.bfloat16)


def test_an_image_from_comfyui_files_equals_the_diffusers_folders(demo, tmp_path):
    """Through the app's own generate(): the same seed gives the same pixels from either layout."""
    from PIL import Image

    from studio.generation.generate import generate
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.schemas import GenerateConfig

    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path / "comfy")
    manager = ModelManager(models, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    images = []
    for model in ("demo-anima", str(dit)):
        config = GenerateConfig(prompt="1girl, solo", model=model, width=64, height=64, steps=2, seed=3)
        result = generate(manager, config, outputs_dir=tmp_path / "out", default_model="demo-sdxl")
        images.append(np.asarray(Image.open(result.images[0].path).convert("RGB")))
    assert images[0].std() > 2
    assert np.array_equal(images[0], images[1])


def test_missing_companions_are_named_with_where_they_were_looked_for(demo, tmp_path):
    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path)
    (tmp_path / "text_encoders" / "qwen_3_06b_base.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"Qwen3 text encoder \(qwen_3_06b_base.safetensors\).*text_encoders"):
        load(dit, models)
    (tmp_path / "clip").mkdir()  # ComfyUI's older folder name is looked in too
    write_comfy_anima(pipe, tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "text_encoders" / "qwen_3_06b_base.safetensors").rename(
        tmp_path / "clip" / "qwen_3_06b_base.safetensors")
    assert load(dit, models).model.text_encoder is not None


def test_a_vae_given_by_path_is_used(demo, tmp_path):
    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path / "comfy")
    moved = tmp_path / "my-vae.safetensors"
    (tmp_path / "comfy" / "vae" / "qwen_image_vae.safetensors").rename(moved)
    with pytest.raises(ModelNotFoundError, match="Qwen-Image VAE"):
        load(dit, models)
    assert load(dit, models, vae=str(moved)).model.vae is not None


def test_a_file_that_does_not_fit_is_refused_by_name(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path)
    tensors = load_file(str(dit))
    del tensors["net.blocks.0.cross_attn.v_proj.weight"]
    save_file(tensors, str(dit))
    with pytest.raises(ModelNotFoundError, match=r"missing 1 \(transformer_blocks.0.attn2.to_v.weight\)"):
        load(dit, models)
    text = tmp_path / "text_encoders" / "qwen_3_06b_base.safetensors"
    write_comfy_anima(pipe, tmp_path)
    tensors = load_file(str(text))
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:, :8].contiguous()
    save_file(tensors, str(text))
    with pytest.raises(ModelNotFoundError, match="qwen_3_06b_base.safetensors does not fit .*size mismatch"):
        load(dit, models)


def test_configs_of_another_size_are_not_used(demo, tmp_path):
    """Only a diffusers folder whose DiT has the file's width and depth lends its configs; with
    none in the models folder and the hub offline, the message says what to do."""
    from safetensors.torch import load_file, save_file

    models, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path / "comfy")
    tensors = load_file(str(dit))
    save_file({k: v for k, v in tensors.items() if not k.startswith("net.blocks.1.")}, str(dit))  # one block less
    with pytest.raises(ModelNotFoundError, match="configs and tokenizers .* not cached .* connect once"):
        load(dit, models)
    with pytest.raises(ModelNotFoundError, match="does not have the shape of the Anima model"):
        load(dit, models, config=str(models / "demo-anima"))


def test_demo_sized_files_find_the_demo_configs_in_an_empty_models_folder(demo, tmp_path):
    _, pipe = demo
    dit = write_comfy_anima(pipe, tmp_path / "comfy")
    loaded = load(dit, tmp_path / "models")
    assert (tmp_path / "models" / "demo-anima" / "transformer" / "config.json").is_file()
    assert_same_weights(pipe, loaded.model)


def test_comfyui_diffusion_models_folder_is_listed(tmp_path):
    from studio.models.folders import model_files

    comfy = tmp_path / "ComfyUI" / "models"
    for name in ("diffusion_models/anima-base-v1.0.safetensors", "text_encoders/qwen_3_06b_base.safetensors"):
        (comfy / name).parent.mkdir(parents=True, exist_ok=True)
        (comfy / name).write_bytes(b"")
    assert [label for label, _ in model_files([comfy], "checkpoint")] == ["anima-base-v1.0.safetensors · ComfyUI"]


def test_companions_are_never_looked_for_above_the_dits_own_folder(demo, tmp_path):
    """A DiT outside ComfyUI's model folders finds its companions beside it only: files one level
    up (outside the folder the request was allowed into) or linked in from elsewhere are not used."""
    import shutil

    models, pipe = demo
    write_comfy_anima(pipe, tmp_path / "elsewhere")
    allowed = tmp_path / "workspace"
    allowed.mkdir()
    dit = allowed / "anima.safetensors"
    shutil.move(tmp_path / "elsewhere" / "diffusion_models" / "anima-demo.safetensors", dit)
    shutil.move(tmp_path / "elsewhere" / "text_encoders", tmp_path / "text_encoders")  # above the folder
    (allowed / "qwen_image_vae.safetensors").symlink_to(tmp_path / "elsewhere" / "vae" / "qwen_image_vae.safetensors")
    with pytest.raises(ModelNotFoundError, match="Qwen3 text encoder .* and the Qwen-Image VAE"):
        load(dit, models)
    shutil.move(tmp_path / "text_encoders" / "qwen_3_06b_base.safetensors", allowed / "qwen_3_06b_base.safetensors")
    shutil.move(tmp_path / "elsewhere" / "vae" / "qwen_image_vae.safetensors", tmp_path / "vae.safetensors")
    (allowed / "qwen_image_vae.safetensors").unlink()
    shutil.copy(tmp_path / "vae.safetensors", allowed / "qwen_image_vae.safetensors")
    assert_same_weights(pipe, load(dit, models).model)
