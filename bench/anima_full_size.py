"""A full-size Anima (real configs) with random weights: the real model's speed and memory without
downloading it. For benchmarks only; `python bench/anima.py` checks the sizes on the meta device.

Configs:
- DiT: diffusers' `CosmosTransformer3DModel` as `scripts/convert_cosmos_to_diffusers.py` converts
  "Cosmos-2.0-Diffusion-2B-Text2Image" (Cosmos-Predict2 2B text-to-image, the DiT Anima is built on):
  16 heads x 128, 28 layers, mlp_ratio 4, text_embed_dim 1024, adaln_lora_dim 256, patch (1, 2, 2),
  rope_scale (1, 4, 4), padding-mask channel, no extra positional embedding.
- Text encoder: Qwen3-0.6B (hidden 1024, 28 layers, 16 query / 8 key-value heads of 128, MLP 3072,
  vocabulary 151,936), as its published config.
- LLM adapter: `AnimaTextConditioner`'s defaults (1024 wide, 6 blocks, 16 heads, T5 vocabulary 32,128).
- VAE: `AutoencoderKLQwenImage`'s defaults, which are Qwen-Image's VAE (base_dim 96, z_dim 16).
The tokenizers are the demo's (their ids fall inside the real vocabularies); only speed matters here.
"""

from __future__ import annotations

from studio.models.full_size import ANIMA_CONDITIONER, ANIMA_TRANSFORMER, QWEN3_0_6B, QWEN_IMAGE_VAE


def build_models(device="meta"):
    """The four weighted components (float32, random) on `device`: {name: module}."""
    import torch
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device(device):
        torch.manual_seed(0)
        return {
            "transformer": CosmosTransformer3DModel(**ANIMA_TRANSFORMER),
            "text_encoder": Qwen3Model(Qwen3Config(**QWEN3_0_6B)),
            "text_conditioner": AnimaTextConditioner(**ANIMA_CONDITIONER),
            "vae": AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
        }


def parameter_counts() -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no time)."""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in build_models("meta").items()}


def build_full_size_anima(device="cuda", dtype=None):
    """AnimaModularPipeline of real size with random weights, built directly on `device`."""
    import torch
    from diffusers import AnimaModularPipeline, FlowMatchEulerDiscreteScheduler

    from studio.models.anima_compat import GUIDER_LOGGER, ensure_cosmos_resize, quiet_logger
    from studio.models.demo_anima import build_demo_qwen_tokenizer, build_demo_t5_tokenizer

    dtype = dtype or torch.bfloat16
    ensure_cosmos_resize()
    tokenizer = build_demo_qwen_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` directly: no float32 copy (8 GB for the DiT alone)
    try:
        models = build_models(device)
    finally:
        torch.set_default_dtype(previous)
    models["text_encoder"].config.pad_token_id = tokenizer.pad_token_id
    for module in models.values():
        module.to(dtype).eval()
    with quiet_logger(GUIDER_LOGGER):
        pipe = AnimaModularPipeline()
    pipe.update_components(tokenizer=tokenizer, t5_tokenizer=build_demo_t5_tokenizer(),
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), **models)
    return pipe
