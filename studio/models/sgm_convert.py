"""Diffusers -> original SGM (Stability's generative-models) key names for SDXL checkpoints.

Single-file SDXL checkpoints, the way Animagine XL and every fine-tune ship, use SGM names:
`model.diffusion_model.*` (UNet), `conditioner.embedders.0.transformer.*` (CLIP-L),
`conditioner.embedders.1.model.*` (OpenCLIP bigG, with fused q/k/v) and `first_stage_model.*`
(VAE). The tables are derived from the model configs, so they hold for full-size models too.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# Diffusers -> original SGM single-file layout (what sd_xl_base_1.0.safetensors, Animagine XL and
# every SDXL fine-tune ship as). Driven by the model configs, so it works on full-size models too.
# ---------------------------------------------------------------------------------------------
SGM_UNET_PREFIX = "model.diffusion_model."
SGM_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SGM_VAE_PREFIX = "first_stage_model."

UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _unet_prefix_table(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Map each diffusers module prefix to its SGM prefix and the renames of its leaf names.

    SGM numbers `input_blocks` sequentially (conv_in, then per level its layers and a downsampler)
    and `output_blocks` likewise (per level layers_per_block + 1 layers, the upsampler sitting
    beside the last one, after its attention if it has one).
    """
    levels = len(config["block_out_channels"])
    layers = _per_level(config["layers_per_block"], levels)
    table: dict[str, tuple[str, dict[str, str]]] = {
        "conv_in.": ("input_blocks.0.0.", {}),
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET_NAMES),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET_NAMES),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
    }
    index = 1
    for level in range(levels):
        for layer in range(layers[level]):
            table[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{index}.0.", UNET_RESNET_NAMES)
            table[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1
    index = 0
    for level, (block_type, level_layers) in enumerate(zip(config["up_block_types"], reversed(layers))):
        for layer in range(level_layers + 1):
            table[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{index}.0.", UNET_RESNET_NAMES)
            table[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{index}.1.", {})
            index += 1
        if level < levels - 1:
            slot = 2 if "CrossAttn" in block_type else 1
            table[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{index - 1}.{slot}.conv.", {})
    return table


def _vae_prefix_table(config) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM's VAE names: encoder.down.{i}.block.{j}, decoder.up.{i} numbered from the *bottom*."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    table: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        table[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION_NAMES)
        for k in range(2):
            table[f"{part}.mid_block.resnets.{k}."] = (f"{part}.mid.block_{k + 1}.", _VAE_RESNET_NAMES)
    for level in range(levels):
        down, up = f"encoder.down_blocks.{level}.", f"decoder.up_blocks.{level}."
        ldm_down, ldm_up = f"encoder.down.{level}.", f"decoder.up.{levels - 1 - level}."
        for layer in range(layers):
            table[f"{down}resnets.{layer}."] = (f"{ldm_down}block.{layer}.", _VAE_RESNET_NAMES)
        table[f"{down}downsamplers.0.conv."] = (f"{ldm_down}downsample.conv.", {})
        for layer in range(layers + 1):
            table[f"{up}resnets.{layer}."] = (f"{ldm_up}block.{layer}.", _VAE_RESNET_NAMES)
        table[f"{up}upsamplers.0.conv."] = (f"{ldm_up}upsample.conv.", {})
    return table


def _rename_by_table(state_dict, table, what: str) -> dict[str, object]:
    """Rename every key through the prefix table; an unknown key is an error, never dropped."""
    converted = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n]) + "."
            if prefix in table:
                new_prefix, leaf_names = table[prefix]
                leaf = key[len(prefix) :]
                module, _, param = leaf.rpartition(".")
                leaf = f"{leaf_names.get(module, module)}.{param}" if module else leaf
                converted[new_prefix + leaf] = tensor
                break
        else:
            raise ValueError(f"{what}: no SGM name for diffusers key {key!r}")
    return converted


def unet_to_sgm(state_dict, config) -> dict[str, object]:
    """SDXL/SD UNet2DConditionModel weights -> `model.diffusion_model.*` names."""
    converted = _rename_by_table(state_dict, _unet_prefix_table(config), "UNet")
    return {SGM_UNET_PREFIX + key: tensor for key, tensor in converted.items()}


def vae_to_ldm(state_dict, config) -> dict[str, object]:
    """AutoencoderKL weights -> `first_stage_model.*` names; attention projections become 1x1 convs."""
    converted = _rename_by_table(state_dict, _vae_prefix_table(config), "VAE")
    out = {}
    for key, tensor in converted.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[SGM_VAE_PREFIX + key] = tensor
    return out


def clip_l_to_sgm(state_dict) -> dict[str, object]:
    """CLIPTextModel weights -> `conditioner.embedders.0.transformer.text_model.*` (HF layout).

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel's own keys; checkpoints
    in the wild (and diffusers' single-file detection) keep it.
    """
    out = {}
    for key, tensor in state_dict.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[SGM_CLIP_L_PREFIX + key] = tensor
    return out


def open_clip_to_sgm(state_dict) -> dict[str, object]:
    """CLIPTextModelWithProjection weights -> OpenCLIP names under `conditioner.embedders.1.model.`.

    OpenCLIP keeps q/k/v as one `in_proj` matrix (rows q, then k, then v) and stores
    `text_projection` as [width, projection_dim], the transpose of a Linear weight.
    """
    import torch

    sd = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    sd.pop("embeddings.position_ids", None)
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
    qkv: dict[tuple[str, str], dict[str, object]] = {}
    for key, tensor in sd.items():
        match = layer_re.fullmatch(key)
        if match is None:
            raise ValueError(f"OpenCLIP text encoder: no OpenCLIP name for key {key!r}")
        layer, module, param = match.groups()
        block = f"transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((block, param), {})[module[-6]] = tensor
        elif module in _OPEN_CLIP_LAYER_NAMES:
            out[f"{block}{_OPEN_CLIP_LAYER_NAMES[module]}.{param}"] = tensor
        else:
            raise ValueError(f"OpenCLIP text encoder: no OpenCLIP name for key {key!r}")
    for (block, param), parts in qkv.items():
        out[f"{block}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {SGM_OPEN_CLIP_PREFIX + key: tensor for key, tensor in out.items()}


def sdxl_pipeline_to_sgm(pipe) -> dict[str, object]:
    """All of an SDXL pipeline's weights as one SGM-layout state dict (contiguous, CPU)."""
    state = {
        **unet_to_sgm(pipe.unet.state_dict(), pipe.unet.config),
        **clip_l_to_sgm(pipe.text_encoder.state_dict()),
        **open_clip_to_sgm(pipe.text_encoder_2.state_dict()),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
    }
    return {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
