"""Anima from the split files ComfyUI users already have, loaded into diffusers' components.

ComfyUI runs Anima from three files:
- the diffusion model (`models/diffusion_models/anima-base-v1.0.safetensors`): the Cosmos-Predict2
  DiT in its original names (`blocks.N.self_attn.q_proj`, `x_embedder.proj.1`, ...; sometimes under
  `net.` or `model.diffusion_model.`) with the LLM adapter inside it (`llm_adapter.blocks.N...`);
- the Qwen3 0.6B text encoder (`models/text_encoders/qwen_3_06b_base.safetensors`): transformers'
  names under `model.` (`model.layers.N.self_attn.q_proj`), perhaps with an `lm_head`;
- the Qwen-Image VAE (`models/vae/qwen_image_vae.safetensors`): Wan 2.1's VAE layout
  (`encoder.downsamples.N.residual.2`, `decoder.upsamples.N`, `conv1`/`conv2`).

The DiT's keys go through diffusers' own Cosmos converter
(`convert_cosmos_transformer_checkpoint_to_diffusers`), the VAE's through its Wan VAE converter
(`convert_wan_vae_to_diffusers`; the Qwen-Image VAE has the same modules). The LLM adapter's names
are AnimaTextConditioner's once `llm_adapter.` is taken off, and the text encoder's are
Qwen3Model's once `model.` is. Configs, tokenizers and the scheduler (none of which are in
ComfyUI's files) come from an Anima diffusers folder: a downloaded copy whose shapes match the DiT,
or the configs-only part of the catalog's hub repo.

Every tensor is checked: a key the model lacks or a weight the file lacks is reported by name,
so a wrong file never loads as a half-random model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from studio.errors import ModelNotFoundError
from studio.fileio import inside
from studio.models.catalog import safetensors_keys, safetensors_shape

DIT_ANCHOR = "blocks.0.self_attn.q_proj.weight"
TEXT_ENCODER_ANCHOR = "layers.0.self_attn.q_proj.weight"
# What ComfyUI calls the companion files, most specific first; then any Qwen3 / Qwen-Image file.
TEXT_ENCODER_PATTERNS = ("qwen_3_06b*.safetensors", "qwen3*0.6b*.safetensors", "qwen3*06b*.safetensors")
VAE_PATTERNS = ("qwen_image_vae*.safetensors", "qwen*image*vae*.safetensors")
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")  # ComfyUI's folder names, new and old
VAE_FOLDERS = ("vae",)
# Keys in the original files that no diffusers module holds (training counters, buffers that
# diffusers recomputes, the causal LM head the text encoder does not use).
IGNORED_SUFFIXES = ("_extra_state",)
IGNORED_TEXT_ENCODER = ("lm_head.",)


@dataclass(frozen=True)
class AnimaFiles:
    dit: Path
    text_encoder: Path
    vae: Path


DIT_FOLDERS = ("diffusion_models", "unet", "checkpoints")  # ComfyUI's folders a DiT file sits in


def models_root(dit: Path) -> Path:
    """The folder the companions are looked for in: ComfyUI's `models/` when the DiT sits in one
    of its model folders, else the DiT's own folder (never above it)."""
    return dit.parent.parent if dit.parent.name in DIT_FOLDERS else dit.parent


def _companion(dit: Path, folders: tuple[str, ...], patterns: tuple[str, ...]) -> Path | None:
    """A file beside the DiT, or in ComfyUI's sibling folder for it (`../text_encoders`, `../vae`),
    found by ComfyUI's file names; only files inside that models folder count (a link out of it
    does not)."""
    root = models_root(dit)
    places = list(dict.fromkeys([dit.parent, *(root / name for name in folders)]))
    for pattern in patterns:
        for place in places:
            for candidate in sorted(place.glob(pattern)) if place.is_dir() else []:
                if candidate.is_file() and candidate != dit and inside(candidate, root):
                    return candidate
    return None


def find_files(dit: Path, vae: str | None = None) -> AnimaFiles:
    """The DiT and its text encoder and VAE files, or a message saying which is missing and where
    it was looked for."""
    text_encoder = _companion(dit, TEXT_ENCODER_FOLDERS, TEXT_ENCODER_PATTERNS)
    vae_file = Path(vae) if vae else _companion(dit, VAE_FOLDERS, VAE_PATTERNS)
    missing = []
    if text_encoder is None:
        missing.append("the Qwen3 text encoder (qwen_3_06b_base.safetensors)")
    if vae_file is None:
        missing.append("the Qwen-Image VAE (qwen_image_vae.safetensors)")
    if missing:
        root = models_root(dit)
        raise ModelNotFoundError(
            f"{dit.name} is Anima's diffusion model in ComfyUI's layout; loading it also needs "
            f"{' and '.join(missing)}, looked for beside it and in {root / 'text_encoders'} / {root / 'vae'}, "
            "where ComfyUI keeps them"
        )
    if not vae_file.is_file():
        raise ModelNotFoundError(f"VAE file not found: {vae_file}")
    return AnimaFiles(dit, text_encoder, vae_file)


def _prefix(keys, anchor: str) -> str | None:
    """What stands before `anchor` in the shortest key that ends with it (`net.`, `model.`, '')."""
    hits = sorted((k for k in keys if k.endswith(anchor)), key=len)
    return hits[0][: -len(anchor)] if hits else None


def split_dit(state: dict) -> tuple[dict, dict]:
    """ComfyUI's Anima diffusion model -> (CosmosTransformer3DModel state, AnimaTextConditioner state)."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    prefix = _prefix(state, DIT_ANCHOR)
    if prefix is None:
        raise ModelNotFoundError(f"not an Anima diffusion model: no tensor ends in {DIT_ANCHOR}")
    adapter_prefix = f"{prefix}llm_adapter."
    conditioner = {k.removeprefix(adapter_prefix): v for k, v in state.items() if k.startswith(adapter_prefix)}
    dit = {k.removeprefix(prefix): v for k, v in state.items()
           if k.startswith(prefix) and not k.startswith(adapter_prefix) and not k.endswith(IGNORED_SUFFIXES)}
    return convert_cosmos_transformer_checkpoint_to_diffusers(dit), conditioner


def convert_text_encoder(state: dict) -> dict:
    """ComfyUI's Qwen3 file -> Qwen3Model's state (`model.layers.N` -> `layers.N`, no lm_head)."""
    prefix = _prefix(state, TEXT_ENCODER_ANCHOR)
    if prefix is None:
        raise ModelNotFoundError(f"not a Qwen3 text encoder: no tensor ends in {TEXT_ENCODER_ANCHOR}")
    return {k.removeprefix(prefix): v for k, v in state.items()
            if k.startswith(prefix) and not k.removeprefix(prefix).startswith(IGNORED_TEXT_ENCODER)}


def convert_vae(state: dict) -> dict:
    """ComfyUI's Qwen-Image VAE (Wan 2.1 layout) -> AutoencoderKLQwenImage's state; a file already
    in diffusers' names passes through."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    if "encoder.conv_in.weight" in state:
        return dict(state)
    return convert_wan_vae_to_diffusers(state)


def _load_into(model_class, config: dict, state: dict, what: str, dtype):
    """Build `model_class` from `config` without initialising weights, then take every tensor of
    `state` (all of them, and nothing else), in `dtype` but for the modules the model keeps in
    float32 (as from_pretrained does)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(config) if not hasattr(model_class, "from_config") else model_class.from_config(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {len(missing)} ({', '.join(missing[:3])})" if missing else "",
            f"unknown {len(unexpected)} ({', '.join(unexpected[:3])})" if unexpected else "") if part)
        raise ModelNotFoundError(f"{what} does not fit Anima's {model_class.__name__}: {detail}")
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    state = {key: tensor.to(torch.float32 if any(part in key.split(".") for part in keep_fp32) else dtype)
             if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shapes: a file for another size of the model
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ModelNotFoundError(f"{what} does not fit the configs it was loaded with: {first[:300]}") from None
    return model.eval()


def dit_size(dit: Path) -> tuple[int, int] | None:
    """(width, blocks) of an Anima DiT file, read from its header; None if it is not one."""
    keys = safetensors_keys(dit)
    prefix = _prefix(keys, DIT_ANCHOR)
    if prefix is None:
        return None
    blocks = {k.removeprefix(f"{prefix}blocks.").split(".")[0] for k in keys if k.startswith(f"{prefix}blocks.")}
    shape = safetensors_shape(dit, f"{prefix}{DIT_ANCHOR}")
    return (shape[0], len(blocks)) if shape else None


def size_of_config(config: dict) -> tuple[int, int]:
    return config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0), config.get("num_layers", 0)


def config_fits(folder: Path, dit: Path) -> bool:
    """Whether an Anima diffusers folder's transformer config has the DiT file's width and depth
    (so its configs can stand in for the ones ComfyUI's files lack)."""
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return dit_size(dit) == size_of_config(config)


def load_components(files: AnimaFiles, config_folder: Path, dtype) -> dict:
    """The seven components of an AnimaModularPipeline: weights from ComfyUI's three files,
    configs, tokenizers and scheduler from `config_folder`."""
    import diffusers
    import transformers
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from safetensors.torch import load_file

    from studio.models.loaders import check_safetensors

    for path in (files.dit, files.text_encoder, files.vae):
        check_safetensors(path)

    def config(name: str) -> dict:
        return json.loads((config_folder / name / "config.json").read_text())

    transformer_state, conditioner_state = split_dit(load_file(str(files.dit)))
    components = {
        "transformer": _load_into(CosmosTransformer3DModel, config("transformer"), transformer_state,
                                  files.dit.name, dtype),
        "text_conditioner": _load_into(AnimaTextConditioner, config("text_conditioner"), conditioner_state,
                                       f"{files.dit.name} (its llm_adapter)", dtype),
    }
    del transformer_state, conditioner_state
    components["vae"] = _load_into(AutoencoderKLQwenImage, config("vae"), convert_vae(load_file(str(files.vae))),
                                   files.vae.name, dtype)
    text_config = transformers.AutoConfig.from_pretrained(str(config_folder / "text_encoder"))
    text_class = getattr(transformers, (text_config.architectures or ["Qwen3Model"])[0])
    components["text_encoder"] = _load_into(text_class, text_config,
                                            convert_text_encoder(load_file(str(files.text_encoder))),
                                            files.text_encoder.name, dtype)
    components["tokenizer"] = transformers.AutoTokenizer.from_pretrained(str(config_folder / "tokenizer"))
    components["t5_tokenizer"] = transformers.AutoTokenizer.from_pretrained(str(config_folder / "t5_tokenizer"))
    scheduler_folder = config_folder / "scheduler"
    scheduler_class = json.loads((scheduler_folder / "scheduler_config.json").read_text())["_class_name"]
    components["scheduler"] = getattr(diffusers, scheduler_class).from_pretrained(str(scheduler_folder))
    return components
