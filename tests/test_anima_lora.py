"""LoRAs on demo-anima through generate(): files in the ComfyUI / diffusion-pipe layout, the
diffusers layout and the kohya layout (which diffusers alone would load as a silent no-op) each
reproduce the in-memory peft model, unknown layers are refused, and removal restores the base."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from studio.errors import LoraError
from studio.generation.generate import generate
from studio.generation.infotext import lora_hash, parse_infotext, parse_lora_hashes
from studio.models.lora_format import anima_original_path, inspect_lora
from studio.schemas import GenerateConfig, LoraSpec, PromptStyle
from tests.lora_fixtures import add_random_lora

RANK, ALPHA = 4, 8.0
LORA_TARGETS = {
    "transformer": {"r": RANK, "lora_alpha": ALPHA,
                    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]},
    "text_conditioner": {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
SIZE = {"width": 64, "height": 64, "steps": 2}
SEED, CFG = 9, 4.0
PLAIN = PromptStyle(quality_tags=False, default_negative=False)


def _modules(state_dict):
    """{module: (A, B)} from a peft state dict."""
    return {key.removesuffix(".lora_A.weight"): (tensor, state_dict[key.replace(".lora_A.", ".lora_B.")])
            for key, tensor in state_dict.items() if key.endswith(".lora_A.weight")}


def write_comfyui(path, sds):
    out = {}
    for component, sd in sds.items():
        for module, (a, b) in _modules(sd).items():
            name = f"diffusion_model.{anima_original_path(component, module)}"
            out[f"{name}.lora_A.weight"] = a.contiguous()
            out[f"{name}.lora_B.weight"] = (b * (ALPHA / RANK)).contiguous()  # no alpha key: baked in
    save_file(out, str(path))
    return path


def write_diffusers(path, sds, components=("transformer", "text_conditioner"), prefixed=True):
    out = {}
    for component in components:
        for module, (a, b) in _modules(sds[component]).items():
            name = f"{component}.{module}" if prefixed else module
            out[f"{name}.lora_A.weight"] = a.contiguous()
            out[f"{name}.lora_B.weight"] = (b * (ALPHA / RANK)).contiguous()
    save_file(out, str(path))
    return path


def write_kohya(path, sds):
    out = {}
    for component, sd in sds.items():
        for module, (a, b) in _modules(sd).items():
            name = "lora_unet_" + anima_original_path(component, module).replace(".", "_")
            out[f"{name}.lora_down.weight"] = a.contiguous()
            out[f"{name}.lora_up.weight"] = b.contiguous()  # alpha as its own key, kohya style
            out[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK),
                                        "ss_network_alpha": "8"})
    return path


def plain_image(pipe):
    image = pipe(prompt="1girl, solo", negative_prompt="", num_inference_steps=SIZE["steps"],
                 width=SIZE["width"], height=SIZE["height"],
                 generator=torch.Generator("cpu").manual_seed(SEED), output="images")[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from studio.models.demo_anima import build_demo_anima_pipeline

    folder = tmp_path_factory.mktemp("anima-loras")
    pipe = build_demo_anima_pipeline()
    sds = add_random_lora(pipe, LORA_TARGETS, seed=3, b_std=0.05)
    return {
        "ref": plain_image(pipe),  # the in-memory peft model's image
        "comfyui": write_comfyui(folder / "comfy.safetensors", sds),
        "diffusers": write_diffusers(folder / "diffusers.safetensors", sds),
        "kohya": write_kohya(folder / "kohya.safetensors", sds),
        "adapter": write_diffusers(folder / "adapter.safetensors", sds, ("transformer",), prefixed=False),
        "folder": folder,
    }


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    from studio.models.demo_anima import ensure_demo_anima
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    models = tmp_path_factory.mktemp("models")
    ensure_demo_anima(models)
    return ModelManager(models, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))


def run(manager, tmp_path, loras=()):
    config = GenerateConfig(prompt="1girl, solo", model="demo-anima", seed=SEED, cfg_scale=CFG, style=PLAIN,
                            loras=[LoraSpec(path=str(p), weight=w) for p, w in loras], **SIZE)
    result = generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl")
    return np.asarray(Image.open(result.images[0].path).convert("RGB"), dtype=np.int16), result


@pytest.fixture(scope="module")
def base(manager, tmp_path_factory):
    return run(manager, tmp_path_factory.mktemp("base"))[0]


def test_fixture_files_are_detected_as_anima(files):
    assert inspect_lora(files["comfyui"]).format == "comfyui"
    assert inspect_lora(files["kohya"]).format == "kohya"
    assert inspect_lora(files["diffusers"]).format == "diffusers"
    for layout in ("comfyui", "kohya", "diffusers"):
        assert inspect_lora(files[layout]).family == "anima"


def test_original_names_invert_diffusers_own_conversion():
    """ComfyUI names made by anima_original_path map back to the same module in diffusers."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers

    from studio.models.demo_anima import build_demo_anima_pipeline

    pipe = build_demo_anima_pipeline()
    for component in ("transformer", "text_conditioner"):
        for module_path, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear):
                key = f"diffusion_model.{anima_original_path(component, module_path)}.lora_A.weight"
                converted = _convert_non_diffusers_anima_lora_to_diffusers({key: None})
                assert list(converted) == [f"{component}.{module_path}.lora_A.weight"]


def test_diffusers_alone_ignores_kohya_anima_files(files):
    """Why kohya files are converted: diffusers loads them without error and changes nothing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from studio.models.demo_anima import build_demo_anima_pipeline

    pipe = build_demo_anima_pipeline()
    try:
        pipe.load_lora_weights(str(files["kohya"]), adapter_name="k")
    except (ValueError, KeyError):
        return  # a diffusers that refuses it is fine too: no silent no-op
    layers = [m for c in ("transformer", "text_conditioner") for m in getattr(pipe, c).modules()
              if isinstance(m, BaseTunerLayer)]
    assert layers == []


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "kohya"])
def test_each_layout_reproduces_the_in_memory_peft_model(manager, files, base, tmp_path, layout):
    image, result = run(manager, tmp_path, [(files[layout], 1.0)])
    assert np.abs(image - base).max() > 10, "the LoRA must change the image"
    assert np.abs(image - files["ref"]).max() <= 2
    params = parse_infotext(result.images[0].infotext)[2]
    assert parse_lora_hashes(params["Lora hashes"]) == {files[layout].stem: lora_hash(files[layout])}
    # removing it restores the base exactly
    again, result = run(manager, tmp_path)
    assert np.array_equal(again, base)
    assert "Lora hashes" not in parse_infotext(result.images[0].infotext)[2]


def test_save_lora_adapter_layout_is_not_a_no_op(manager, files, base, tmp_path):
    image, _ = run(manager, tmp_path, [(files["adapter"], 1.0)])
    assert np.abs(image - base).max() > 10
    assert np.array_equal(run(manager, tmp_path)[0], base)


def test_weights_and_stacking(manager, files, base, tmp_path):
    full, _ = run(manager, tmp_path, [(files["kohya"], 1.0)])
    half, _ = run(manager, tmp_path, [(files["kohya"], 0.5)])
    assert np.abs(half - full).max() > 0 and np.abs(half - base).max() > 0
    both, result = run(manager, tmp_path, [(files["comfyui"], 0.5), (files["kohya"], 0.5)])
    assert np.abs(both - files["ref"]).max() <= 2  # the same LoRA twice at half weight
    assert len(parse_lora_hashes(parse_infotext(result.images[0].infotext)[2]["Lora hashes"])) == 2
    assert np.array_equal(run(manager, tmp_path)[0], base)


@pytest.mark.parametrize("prefix", ["diffusion_model.not_a_layer", "lora_unet_not_a_layer", "transformer.nope"])
def test_a_file_with_unknown_layers_is_refused(manager, base, tmp_path, prefix):
    path = tmp_path / "unknown.safetensors"
    down, up = ("lora_down", "lora_up") if prefix.startswith("lora_unet") else ("lora_A", "lora_B")
    save_file({f"{prefix}.{down}.weight": torch.randn(4, 32), f"{prefix}.{up}.weight": torch.randn(32, 4)}, str(path))
    with pytest.raises(LoraError, match="changes nothing|could not be loaded"):
        run(manager, tmp_path, [(path, 1.0)])
    assert np.array_equal(run(manager, tmp_path)[0], base)


def test_an_sdxl_lora_is_refused_on_anima(manager, tmp_path):
    from tests.lora_fixtures import write_demo_kohya_lora

    path = write_demo_kohya_lora(tmp_path / "sdxl.safetensors", seed=1)
    with pytest.raises(LoraError, match="SDXL.*Anima"):
        run(manager, tmp_path, [(path, 1.0)])


TE_TARGETS = {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@pytest.fixture(scope="module")
def te_files(tmp_path_factory):
    """A LoRA on the DiT and on the Qwen3 text encoder, as ComfyUI (and our trainer) names the
    encoder's keys and as sd-scripts' raw files do (`lora_te_*`, lora_down/lora_up + alpha)."""
    from studio.models.demo_anima import build_demo_anima_pipeline

    folder = tmp_path_factory.mktemp("anima-te-loras")
    pipe = build_demo_anima_pipeline()
    sds = add_random_lora(pipe, {"transformer": LORA_TARGETS["transformer"], "text_encoder": TE_TARGETS},
                          seed=5, b_std=0.05)
    dit_only = {"transformer": sds["transformer"]}
    comfy = write_comfyui(folder / "dit.safetensors", dit_only)
    tensors = load_file(str(comfy))
    kohya = dict(tensors)
    for module, (a, b) in _modules(sds["text_encoder"]).items():
        tensors[f"text_encoders.qwen3_06b.transformer.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"text_encoders.qwen3_06b.transformer.model.{module}.lora_B.weight"] = (b * (ALPHA / RANK)).contiguous()
        kohya[f"lora_te_{module.replace('.', '_')}.lora_down.weight"] = a.contiguous()
        kohya[f"lora_te_{module.replace('.', '_')}.lora_up.weight"] = b.contiguous()
        kohya[f"lora_te_{module.replace('.', '_')}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(folder / "comfy_te.safetensors"))
    save_file(kohya, str(folder / "kohya_te.safetensors"))
    return {"ref": plain_image(pipe), "dit": comfy, "comfyui": folder / "comfy_te.safetensors",
            "kohya": folder / "kohya_te.safetensors"}


@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
def test_the_text_encoders_lora_is_applied_too(manager, te_files, base, tmp_path, layout):
    """Our own files (and ComfyUI's) carry the Qwen3 encoder's LoRA: generation applies it, so the
    image is the in-memory model's, not the DiT part's alone; removal restores the base."""
    dit_only, _ = run(manager, tmp_path, [(te_files["dit"], 1.0)])
    image, result = run(manager, tmp_path, [(te_files[layout], 1.0)])
    assert not result.warnings, result.warnings  # no "only 24 of its 32 layers match"
    assert np.abs(image - dit_only).max() > 0, "the text encoder's part changes the image"
    assert np.abs(image - te_files["ref"]).max() <= 2
    half, _ = run(manager, tmp_path, [(te_files[layout], 0.5)])
    assert np.abs(half - image).max() > 0
    assert np.array_equal(run(manager, tmp_path)[0], base)
