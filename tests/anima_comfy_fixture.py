"""An Anima pipeline written as ComfyUI's three files, in the original layouts (for tests).

The names follow the original models, not our loader: Cosmos-Predict2's MiniTrainDIT
(`blocks.N.self_attn.q_proj`, `x_embedder.proj.1`, `t_embedder.1.linear_1`, `final_layer.linear`)
with the LLM adapter inside it (`llm_adapter.`), transformers' Qwen3 under `model.` plus an
`lm_head`, and Wan 2.1's VAE (`encoder.downsamples.N.residual.{0,2,3,6}`, flat
`decoder.upsamples.N` with each level's resample after its `num_res_blocks + 1` residual blocks,
`head.0`/`head.2`, `conv1`/`conv2` around the latent)."""

from __future__ import annotations

import re
from pathlib import Path

_DIT_PARTS = (  # diffusers -> MiniTrainDIT, applied in order
    ("patch_embed.proj", "x_embedder.proj.1"),
    ("time_embed.t_embedder.linear_", "t_embedder.1.linear_"),
    ("time_embed.norm", "t_embedding_norm"),
    ("norm_out.linear_1", "final_layer.adaln_modulation.1"),
    ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
    ("proj_out", "final_layer.linear"),
    ("transformer_blocks.", "blocks."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    ("to_q.", "q_proj."),
    ("to_k.", "k_proj."),
    ("to_v.", "v_proj."),
    ("to_out.0.", "output_proj."),
    ("norm_q.", "q_norm."),
    ("norm_k.", "k_norm."),
    (".norm1.linear_", ".adaln_modulation_self_attn."),
    (".norm2.linear_", ".adaln_modulation_cross_attn."),
    (".norm3.linear_", ".adaln_modulation_mlp."),
    ("ff.net.0.proj", "mlp.layer1"),
    ("ff.net.2", "mlp.layer2"),
)
_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _resnet_part(rest: str) -> str:
    for new, old in _RESNET.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest  # resample.1 / time_conv


def _wan_vae_key(key: str, num_res_blocks: int) -> str:
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
             "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
             "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
             "decoder.conv_out.": "decoder.head.2."}
    for new, old in fixed.items():
        if key.startswith(new):
            return old + key[len(new):]
    if match := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        side, kind, index, rest = match.groups()
        position = 1 if kind == "attentions" else 2 * int(index)
        return f"{side}.middle.{position}.{rest if kind == 'attentions' else _resnet_part(rest)}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{match[1]}.{_resnet_part(match[2])}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{int(match[1]) * (num_res_blocks + 2) + int(match[2])}.{_resnet_part(match[3])}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{int(match[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{match[2]}"
    raise KeyError(key)


def dit_key(key: str) -> str:
    for new, old in _DIT_PARTS:
        key = key.replace(new, old)
    return key


def write_comfy_anima(pipe, root: Path, *, dit_prefix: str = "net.", dit_name: str = "anima-demo.safetensors",
                      dtype=None) -> Path:
    """Write `pipe` as ComfyUI keeps Anima: diffusion_models/<dit_name> (DiT + llm_adapter),
    text_encoders/qwen_3_06b_base.safetensors, vae/qwen_image_vae.safetensors. Returns the DiT file."""
    import torch
    from safetensors.torch import save_file

    def plain(tensor):  # ComfyUI's files are bf16; float32 keeps a test exact
        return tensor.detach().to(dtype or torch.float32).contiguous().clone()

    dit = {f"{dit_prefix}{dit_key(k)}": plain(v) for k, v in pipe.transformer.state_dict().items()}
    dit.update({f"{dit_prefix}llm_adapter.{k}": plain(v) for k, v in pipe.text_conditioner.state_dict().items()})
    dit[f"{dit_prefix}pos_embedder.dim_spatial_range"] = torch.arange(4, dtype=torch.float32)  # a buffer diffusers drops
    dit[f"{dit_prefix}accum_iteration"] = torch.zeros(1)  # a training counter Cosmos checkpoints carry
    text = {f"model.{k}": plain(v) for k, v in pipe.text_encoder.state_dict().items()}
    text["lm_head.weight"] = plain(pipe.text_encoder.embed_tokens.weight)
    blocks = pipe.vae.config.num_res_blocks
    vae = {_wan_vae_key(k, blocks): plain(v) for k, v in pipe.vae.state_dict().items()}
    files = {"diffusion_models": (dit_name, dit), "text_encoders": ("qwen_3_06b_base.safetensors", text),
             "vae": ("qwen_image_vae.safetensors", vae)}
    for folder, (name, tensors) in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / folder / name))
    return root / "diffusion_models" / dit_name
