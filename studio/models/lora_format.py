"""LoRA files as the rest of the ecosystem writes and reads them.

Three jobs, all about the file on disk rather than about a loaded model:

- naming: diffusers module paths -> the original SGM (Stability "generative-models") paths that
  kohya sd-scripts writes for SDXL, and kohya's `lora_unet_...` / `lora_te1_...` names;
- saving: a peft state dict (what `get_peft_model_state_dict` returns) -> a kohya-format
  `.safetensors` file with real alphas and ss_*/ModelSpec metadata, written atomically;
- inspecting: what a `.safetensors` LoRA is (format, model family, rank, parts), read from the
  header alone, and a clear error for pickles, empty, truncated or corrupt files.

Importing this module does no work: torch and safetensors are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from studio.errors import LoraError, UnsafeCheckpointError
from studio.models.catalog import PICKLE_SUFFIXES
from studio.models.sgm_convert import UNET_RESNET_NAMES

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
MODELSPEC_VERSION = "1.0.1"

LoraFormat = Literal["kohya", "diffusers", "peft", "comfyui", "lycoris", "unknown"]
ModelFamily = Literal["sdxl", "sd1", "sd2", "anima", "flux", "unknown"]


# ---------------------------------------------------------------------------------------------
# 1. Names: diffusers UNet paths -> original SGM paths -> kohya lora names
# ---------------------------------------------------------------------------------------------
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_ATTENTION_PARTS = ("norm", "proj_in", "proj_out", "transformer_blocks")
_BLOCK_PATH = re.compile(
    r"^(?P<side>down_blocks|up_blocks)\.(?P<level>\d+)"
    r"\.(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<index>\d+)(?:\.(?P<inner>.+))?$"
)
_MID_PATH = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


def _resnet_inner(inner: str | None, module_path: str) -> str:
    if inner not in UNET_RESNET_NAMES:
        raise LoraError(
            f"cannot map UNet module {module_path!r} to the SGM layout: unknown resnet part {inner!r}"
        )
    return UNET_RESNET_NAMES[inner]


def _attention_inner(inner: str | None, module_path: str) -> str:
    if not inner or inner.split(".")[0] not in _ATTENTION_PARTS:
        raise LoraError(
            f"cannot map UNet module {module_path!r} to the SGM layout: unknown attention part {inner!r}"
        )
    return inner  # SGM's SpatialTransformer uses diffusers' inner names unchanged


def diffusers_to_sgm_unet_name(module_path: str, *, layers_per_block: int = 2) -> str:
    """Map a diffusers SDXL UNet module path to the original SGM path kohya and ComfyUI use.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`
    -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`. Each SGM input block holds one
    resnet (index 0) and optionally one attention (index 1); each level has `layers_per_block`
    of them plus one block for the downsampler. SDXL's upsamplers always follow an attention
    block, so they sit at index 2 of their output block. Raises LoraError for unknown paths.
    """
    if module_path in _TOP_LEVEL:
        return _TOP_LEVEL[module_path]
    per_level = layers_per_block + 1
    match = _BLOCK_PATH.match(module_path)
    if match:
        side, kind, inner = match["side"], match["kind"], match["inner"]
        level, index = int(match["level"]), int(match["index"])
        if side == "down_blocks":
            if kind == "downsamplers" and index == 0 and inner == "conv":
                return f"input_blocks.{(level + 1) * per_level}.0.op"
            if kind in ("resnets", "attentions") and index < layers_per_block:
                block = 1 + level * per_level + index
                if kind == "resnets":
                    return f"input_blocks.{block}.0.{_resnet_inner(inner, module_path)}"
                return f"input_blocks.{block}.1.{_attention_inner(inner, module_path)}"
        else:
            if kind == "upsamplers" and index == 0 and inner == "conv":
                return f"output_blocks.{level * per_level + layers_per_block}.2.conv"
            if kind in ("resnets", "attentions") and index < per_level:
                block = level * per_level + index
                if kind == "resnets":
                    return f"output_blocks.{block}.0.{_resnet_inner(inner, module_path)}"
                return f"output_blocks.{block}.1.{_attention_inner(inner, module_path)}"
    match = _MID_PATH.match(module_path)
    if match:
        kind, index, inner = match.group(1), int(match.group(2)), match.group(3)
        if kind == "resnets" and index in (0, 1):
            return f"middle_block.{index * 2}.{_resnet_inner(inner, module_path)}"
        if kind == "attentions" and index == 0:
            return f"middle_block.1.{_attention_inner(inner, module_path)}"
    raise LoraError(
        f"cannot map UNet module {module_path!r} to the SGM layout kohya/ComfyUI expect: "
        "it is not a known SDXL UNet module"
    )


def kohya_lora_name(prefix: str, module_path: str) -> str:
    """`lora_unet` + `input_blocks.4.1.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_encoder_kohya_path(module_path: str) -> str:
    """CLIP paths as kohya names them: always under `text_model.` (transformers 5's CLIPTextModel
    drops that prefix from its own module names; CLIPTextModelWithProjection keeps it)."""
    if module_path.startswith(("text_model.", "text_projection")):
        return module_path
    return f"text_model.{module_path}"


# Anima (Cosmos DiT): diffusers' CosmosTransformer3DModel paths -> the original (ComfyUI /
# diffusion-pipe / kohya) paths, the inverse of diffusers' own renaming of `diffusion_model.` keys.
# Applied in order; the LLM adapter (text_conditioner) keeps its names under `llm_adapter.`.
_ANIMA_DIFFUSERS_TO_ORIGINAL = (
    ("attn1.to_q", "self_attn.q_proj"),
    ("attn1.to_k", "self_attn.k_proj"),
    ("attn1.to_v", "self_attn.v_proj"),
    ("attn1.to_out.0", "self_attn.output_proj"),
    ("attn2.to_q", "cross_attn.q_proj"),
    ("attn2.to_k", "cross_attn.k_proj"),
    ("attn2.to_v", "cross_attn.v_proj"),
    ("attn2.to_out.0", "cross_attn.output_proj"),
    ("norm1.linear_1", "adaln_modulation_self_attn.1"),
    ("norm1.linear_2", "adaln_modulation_self_attn.2"),
    ("norm2.linear_1", "adaln_modulation_cross_attn.1"),
    ("norm2.linear_2", "adaln_modulation_cross_attn.2"),
    ("norm3.linear_1", "adaln_modulation_mlp.1"),
    ("norm3.linear_2", "adaln_modulation_mlp.2"),
    ("ff.net.0.proj", "mlp.layer1"),
    ("ff.net.2", "mlp.layer2"),
    ("norm_out.linear_1", "final_layer.adaln_modulation.1"),
    ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
    ("proj_out", "final_layer.linear"),
    ("time_embed.t_embedder", "t_embedder.1"),
    ("time_embed.norm", "t_embedding_norm"),
    ("patch_embed.proj", "x_embedder.proj.1"),
    ("transformer_blocks.", "blocks."),
)
ANIMA_COMFY_PREFIX = "diffusion_model."
ANIMA_KOHYA_PREFIX = "lora_unet"


def anima_original_path(component: str, module_path: str) -> str:
    """An Anima module's path in the original checkpoint (what ComfyUI keys follow after
    `diffusion_model.` and kohya names after `lora_unet_`): `transformer_blocks.0.attn1.to_q`
    -> `blocks.0.self_attn.q_proj`; text_conditioner `blocks.0.mlp.0` -> `llm_adapter.blocks.0.mlp.0`."""
    if component == "text_conditioner":
        return f"llm_adapter.{module_path}"
    for diffusers_part, original_part in _ANIMA_DIFFUSERS_TO_ORIGINAL:
        module_path = module_path.replace(diffusers_part, original_part)
    return module_path


# ---------------------------------------------------------------------------------------------
# 2. Saving: peft state dict -> kohya .safetensors
# ---------------------------------------------------------------------------------------------
_PEFT_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)


def _group_peft_state_dict(
    state_dict: Mapping[str, torch.Tensor], component: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{module_path: {"down": A, "up": B, ["magnitude": m]}} from peft keys."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key.removeprefix("base_model.model."))
        if not match:
            raise LoraError(
                f"{component}: unsupported LoRA tensor {key!r}; expected peft keys ending in "
                "lora_A.weight, lora_B.weight or lora_magnitude_vector"
            )
        part = {"lora_A.weight": "down", "lora_B.weight": "up"}.get(match["part"], "magnitude")
        modules.setdefault(match["module"], {})[part] = tensor
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(
                f"{component}: module {module!r} has only {sorted(parts)}; need both lora_A and lora_B"
            )
    return modules


def _dora_scale(magnitude: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """peft's per-output-row magnitude [out] -> LyCORIS/ComfyUI `dora_scale` [out, 1(, 1, 1)]."""
    return magnitude.reshape(up.shape[0], *([1] * (down.dim() - 1)))


def kohya_state_dict(
    *,
    unet: Mapping[str, torch.Tensor] | None = None,
    text_encoder: Mapping[str, torch.Tensor] | None = None,
    text_encoder_2: Mapping[str, torch.Tensor] | None = None,
    alpha: float,
    layers_per_block: int = 2,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Convert peft state dicts (one per model part) into kohya tensors, SGM names for the UNet.

    `alpha` is the adapter's real lora_alpha (peft's scaling is alpha / rank, kohya's the same),
    written as each module's 0-dim `.alpha`. DoRA magnitudes are written as `.dora_scale`
    with LyCORIS' shape [out, 1, ...] (the per-output-row norm ComfyUI and diffusers read).
    """
    import torch

    parts = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if not any(parts.values()):
        raise LoraError("nothing to save: every model part's LoRA state dict is empty")
    out: dict[str, torch.Tensor] = {}
    for component, state_dict in parts.items():
        if not state_dict:
            continue
        for module, tensors in _group_peft_state_dict(state_dict, component).items():
            if component == "unet":
                path = diffusers_to_sgm_unet_name(module, layers_per_block=layers_per_block)
            else:
                path = text_encoder_kohya_path(module)
            name = kohya_lora_name(KOHYA_PREFIXES[component], path)
            if f"{name}.lora_down.weight" in out:
                raise LoraError(f"two modules map to the same kohya name {name!r}")
            down, up = tensors["down"], tensors["up"]
            if up.dim() == 4 and up.shape[2:] != (1, 1):
                raise LoraError(
                    f"{component}: module {module!r} has a {tuple(up.shape)} lora_B; kohya expects 1x1"
                )
            converted = {"lora_down.weight": down, "lora_up.weight": up}
            if "magnitude" in tensors:
                converted["dora_scale"] = _dora_scale(tensors["magnitude"], up, down)
            for suffix, tensor in converted.items():
                tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype)
                out[f"{name}.{suffix}"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_kohya_lora(
    path: str | os.PathLike,
    *,
    unet: Mapping[str, torch.Tensor] | None = None,
    text_encoder: Mapping[str, torch.Tensor] | None = None,
    text_encoder_2: Mapping[str, torch.Tensor] | None = None,
    alpha: float,
    metadata: Mapping[str, str] | None = None,
    layers_per_block: int = 2,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a kohya-format SDXL LoRA (see `kohya_state_dict`) atomically; returns the path.

    `unet`, `text_encoder` (CLIP-L -> lora_te1) and `text_encoder_2` (CLIP-G -> lora_te2) are peft
    state dicts as `get_peft_model_state_dict(model)` returns them. `metadata` values must be
    strings (use `kohya_metadata`).
    """
    tensors = kohya_state_dict(
        unet=unet,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        alpha=alpha,
        layers_per_block=layers_per_block,
        dtype=dtype,
    )
    metadata = dict(metadata or {})
    not_strings = sorted(str(k) for k, v in metadata.items() if not _is_str_pair(k, v))
    if not_strings:
        raise LoraError(f"LoRA metadata values must be strings; these are not: {', '.join(not_strings)}")
    return _write_safetensors_atomically(Path(path), tensors, metadata)


def _is_str_pair(key: object, value: object) -> bool:
    return isinstance(key, str) and isinstance(value, str)


def _write_safetensors_atomically(path: Path, tensors: dict, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    from studio.fileio import atomic_path

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def kohya_metadata(
    *,
    output_name: str,
    network_dim: int,
    network_alpha: float,
    network_args: Mapping[str, object] | None = None,
    network_module: str = "networks.lora",
    base_model_version: str = SDXL_BASE_MODEL_VERSION,
    architecture: str = SDXL_LORA_ARCHITECTURE,
    implementation: str = SDXL_IMPLEMENTATION,
    base_model_name: str = "",
    learning_rate: float | None = None,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    optimizer: str = "",
    lr_scheduler: str = "",
    max_train_steps: int | None = None,
    steps: int | None = None,
    epoch: int | None = None,
    num_epochs: int | None = None,
    resolution: tuple[int, int] = (1024, 1024),
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    trigger_words: str = "",
    title: str = "",
    date: datetime | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ss_* (sd-scripts) and modelspec.* header entries tools show for a LoRA; all strings.

    `resolution` is (width, height). `tag_frequency` is `{dataset_dir: {tag: count}}`. `date`
    defaults to now (UTC) and is written in ISO format. `extra` entries are added last.
    """
    width, height = resolution
    date = date or datetime.now(timezone.utc)
    values: dict[str, object] = {
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_args": json.dumps(dict(network_args or {})),
        "ss_base_model_version": base_model_version,
        "ss_sd_model_name": base_model_name,
        "ss_output_name": output_name,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": lr_scheduler,
        "ss_max_train_steps": max_train_steps,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_resolution": f"({width}, {height})",
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in (tag_frequency or {}).items()}),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": date.isoformat(timespec="seconds"),
        "modelspec.trigger_phrase": trigger_words,
    }
    metadata = {key: _metadata_string(value) for key, value in values.items() if value not in (None, "")}
    metadata.update(extra or {})
    return metadata


def _metadata_string(value: object) -> str:
    if isinstance(value, float):
        return format(value, "g")  # 8.0 -> "8", 1e-4 -> "0.0001"
    return str(value)


# ---------------------------------------------------------------------------------------------
# 3. Inspecting: what is this file? (header only)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraInfo:
    path: Path
    format: LoraFormat
    family: ModelFamily
    modules: int  # adapted layers (one lora_down/lora_A each)
    ranks: tuple[int, ...]  # distinct ranks, ascending
    has_text_encoder: bool
    has_dora: bool
    module_names: tuple[str, ...]  # key prefixes before .lora_down/.lora_A, as in the file
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        """The rank when every module shares one (the usual case)."""
        return self.ranks[0] if len(self.ranks) == 1 else None


def check_lora_path(path: str | os.PathLike) -> Path:
    """The file exists and is not a pickle by name; returns it as a Path."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path.name} is a pickle file ({path.suffix}); loading it could run arbitrary code. "
            "Use the .safetensors version of this LoRA (most model pages offer one)."
        )
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    return path


def read_safetensors_header(path: Path) -> dict:
    """Parse the JSON header of a .safetensors file without reading any tensor data."""
    size = path.stat().st_size
    if size == 0:
        raise LoraError(f"{path.name} is empty (0 bytes): the download or save did not finish")
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        first = fh.read(1)
        # A safetensors file is a little-endian u64 header size, then a JSON object ("{").
        # Only when that fails is a pickle's magic ("PK" zip, or the \x80 PROTO opcode) decisive:
        # a valid header size can start with those bytes too.
        looks_valid = header_len is not None and header_len <= size - 8 and first == b"{"
        if not looks_valid and (head.startswith(b"PK") or head[:1] == b"\x80"):
            raise LoraError(
                f"{path.name} is a pickle (PyTorch .ckpt/.pt) file renamed to .safetensors, not a "
                "safetensors file; it is refused because unpickling can run arbitrary code"
            )
        if header_len is None:
            raise LoraError(f"{path.name} is truncated ({size} bytes): not a complete safetensors file")
        if header_len > size - 8:
            raise LoraError(
                f"{path.name} is truncated or not a safetensors file: its header claims {header_len} "
                f"bytes but the file has {size}"
            )
        raw = first + fh.read(header_len - 1)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path.name} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise LoraError(f"{path.name} has a corrupt safetensors header (not a JSON object)")
    ends = [_tensor_end(name, entry, path) for name, entry in header.items() if name != "__metadata__"]
    data_end = max(ends, default=0)
    if data_end > size - 8 - header_len:
        raise LoraError(
            f"{path.name} is truncated: its tensors need {data_end} bytes of data but only "
            f"{size - 8 - header_len} are there (re-download or re-save it)"
        )
    return header


def _tensor_end(name: str, entry: object, path: Path) -> int:
    try:
        _, end = entry["data_offsets"]  # type: ignore[index]
        return int(end)
    except (TypeError, KeyError, ValueError):
        raise LoraError(f"{path.name} has a corrupt safetensors header (entry {name!r})") from None


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    """Tell what a LoRA file is from its safetensors header alone (no tensor is loaded)."""
    path = check_lora_path(path)
    header = read_safetensors_header(path)
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    shapes = {name: tuple(entry.get("shape", ())) for name, entry in header.items()}
    if not shapes:
        raise LoraError(f"{path.name} holds no tensors: it is not a LoRA")
    down_keys = [k for k in shapes if k.endswith((".lora_down.weight", ".lora_A.weight"))]
    module_names = tuple(sorted(re.sub(r"\.(lora_down|lora_A)\.weight$", "", k) for k in down_keys))
    ranks = tuple(sorted({shapes[k][0] for k in down_keys if shapes[k]}))
    return LoraInfo(
        path=path,
        format=_detect_format(list(shapes)),
        family=_detect_family(shapes, metadata),
        modules=len(module_names),
        ranks=ranks,
        has_text_encoder=any(_is_text_encoder_key(k) for k in shapes),
        has_dora=any(k.endswith(("dora_scale", "lora_magnitude_vector")) for k in shapes),
        module_names=module_names,
        metadata=metadata,
    )


_TEXT_ENCODER_PREFIXES = (
    "lora_te",  # kohya: lora_te_ (SD1/2), lora_te1_ / lora_te2_ (SDXL, Flux)
    "text_encoder",  # diffusers: text_encoder. / text_encoder_2.
    "text_encoders.",  # some ComfyUI exports
    "text_conditioner.",  # Anima's LLM adapter, diffusers names
    "diffusion_model.llm_adapter.",  # Anima's LLM adapter, ComfyUI names
)


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_PREFIXES)


def _detect_format(keys: list[str]) -> LoraFormat:
    if any(re.search(r"\.(hada_w1_a|lokr_w1|lokr_w1_a|oft_blocks|oft_diag)$", k) for k in keys):
        return "lycoris"
    has_kohya_pair = any(k.endswith(".lora_down.weight") for k in keys)
    has_peft_pair = any(k.endswith(".lora_A.weight") for k in keys)
    if has_kohya_pair and all(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if _any_startswith(keys, "diffusion_model.") and (has_peft_pair or has_kohya_pair):
        return "comfyui"
    if has_peft_pair and _any_startswith(keys, "unet.", "text_encoder.", "text_encoder_2.", "transformer."):
        return "diffusers"
    if has_kohya_pair and _any_startswith(keys, "unet.", "text_encoder."):
        return "diffusers"  # the pre-peft diffusers layout (`...processor.to_q_lora.down.weight`)
    if has_peft_pair:
        return "peft"
    return "unknown"


def _any_startswith(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _detect_family(shapes: dict[str, tuple], metadata: dict[str, str]) -> ModelFamily:
    """Key structure first (it is what the loader will see), header metadata second."""
    from_keys = _family_from_keys(shapes)
    if from_keys != "unknown":
        return from_keys
    return _family_from_metadata(metadata)


def _family_from_metadata(metadata: dict[str, str]) -> ModelFamily:
    text = f"{metadata.get('modelspec.architecture', '')} {metadata.get('ss_base_model_version', '')}".lower()
    for needle, family in (
        ("sdxl", "sdxl"),
        ("stable-diffusion-xl", "sdxl"),
        ("flux", "flux"),
        ("anima", "anima"),
        ("cosmos", "anima"),
        ("sd_v1", "sd1"),
        ("stable-diffusion-v1", "sd1"),
        ("sd_v2", "sd2"),
        ("stable-diffusion-v2", "sd2"),
    ):
        if needle in text:
            return family  # type: ignore[return-value]
    return "unknown"


# Structural signs in key names (kohya `_` or diffusers `.` separators) that tell SDXL from SD1/2.
# SDXL's first UNet level has no attention, its transformers are 2 and 10 deep and its up path
# starts with attention; SD1/2 have attention at the first level, 4 levels and depth-1 blocks.
_SEP = r"[._]"
_SDXL_SIGNS = [
    re.compile(r"(^|\n)(lora_te[12]_|text_encoder_2\.)"),
    re.compile(r"label_emb|add_embedding"),
    re.compile(rf"transformer_blocks{_SEP}[1-9]\d*{_SEP}"),
    re.compile(rf"output_blocks{_SEP}[0-2]{_SEP}1{_SEP}(transformer_blocks|proj_in|proj_out)"),
    re.compile(rf"up_blocks{_SEP}0{_SEP}attentions"),
]
_SD_SIGNS = [
    re.compile(r"(^|\n)lora_te_"),
    re.compile(rf"input_blocks{_SEP}([12]|9|1\d){_SEP}1{_SEP}(transformer_blocks|proj_in|proj_out)"),
    re.compile(rf"output_blocks{_SEP}(9|1\d){_SEP}1{_SEP}(transformer_blocks|proj_in|proj_out)"),
    re.compile(rf"down_blocks{_SEP}0{_SEP}attentions|up_blocks{_SEP}3{_SEP}attentions"),
    re.compile(rf"down_blocks{_SEP}3{_SEP}"),
]


def _family_from_keys(shapes: dict[str, tuple]) -> ModelFamily:
    joined = "\n".join(shapes)
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", joined):
        return "flux"
    if re.search(r"llm_adapter|text_conditioner\.|adaln_modulation", joined):
        return "anima"
    if re.search(r"(^|\n)(diffusion_model\.|lora_unet_)blocks[._]\d", joined):
        return "anima"  # Cosmos blocks under ComfyUI / kohya names
    if re.search(r"transformer\.transformer_blocks\.\d+\.attn1\.", joined):
        return "anima"  # Cosmos (Anima's DiT) under diffusers names
    if re.search(r"(^|\n)transformer_blocks\.\d+\.(attn1|attn2|norm[123]\.linear_|ff\.net)", joined):
        return "anima"  # the same without the component prefix (as `save_lora_adapter` writes it)
    sdxl = any(sign.search(joined) for sign in _SDXL_SIGNS)
    sd = any(sign.search(joined) for sign in _SD_SIGNS)
    if sdxl and not sd:
        return "sdxl"
    if sd and not sdxl:
        return _sd1_or_sd2(shapes)
    return "unknown"


def _sd1_or_sd2(shapes: dict[str, tuple]) -> ModelFamily:
    """SD2's cross-attention reads 1024-wide OpenCLIP states; SD1's reads 768-wide CLIP-L."""
    for key, shape in shapes.items():
        is_down = key.endswith((".lora_down.weight", ".lora_A.weight"))
        if is_down and re.search(r"attn2[._]to[._]k", key) and len(shape) == 2:
            return "sd2" if shape[1] == 1024 else "sd1"
    return "sd1"
