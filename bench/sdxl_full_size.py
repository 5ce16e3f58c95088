"""A full-size SDXL (base 1.0 configs) with random weights: the real model's speed and memory
without downloading it. For benchmarks only; tests check its shapes on the meta device."""

from __future__ import annotations

SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4, out_channels=4,
    layers_per_block=2, norm_num_groups=32, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
)
SDXL_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
UNET_PARAMETERS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0 unet


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
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L, **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **common))
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.to(dtype=dtype)
    pipe.vae.to(torch.float32)  # as force_upcast does for the real SDXL VAE
    pipe.set_progress_bar_config(disable=True)
    return pipe
