"""A full-size SDXL (base 1.0 configs) with random weights: the real model's speed and memory
without downloading it. For benchmarks only; tests check its shapes on the meta device."""

from __future__ import annotations

from studio.models.full_size import CLIP_G, CLIP_L, SDXL_UNET, SDXL_VAE, UNET_PARAMETERS  # noqa: F401


def build_full_size_sdxl(device="cuda", dtype=None):
    """StableDiffusionXLPipeline of real size with random weights, built directly on `device`."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models.demo import build_demo_clip_tokenizers

    dtype = dtype or torch.bfloat16
    tokenizer, tokenizer_2 = build_demo_clip_tokenizers()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    common = dict(vocab_size=49408, max_position_embeddings=77, **ids)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` directly: no float32 copy of the 10 GB UNet
    try:
        with torch.device(device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SDXL_UNET)
            vae = AutoencoderKL(**SDXL_VAE)
            te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L, **common))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **common))
    finally:
        torch.set_default_dtype(previous)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.to(dtype=dtype)
    pipe.vae.to(torch.float32)  # as force_upcast does for the real SDXL VAE
    pipe.set_progress_bar_config(disable=True)
    return pipe
