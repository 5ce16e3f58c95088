"""The real models' configs (SDXL base 1.0, which Animagine XL 3.1 shares; Anima: Cosmos-Predict2 2B
DiT, Qwen3 0.6B, its LLM adapter, the Qwen-Image VAE) and their modules built on the meta device:
shapes and parameter counts without memory or time, for the memory plan (and, with random
weights, the benchmarks and full-size tests in bench/ and tests/).

`meta_components(family, folder)` builds a pipeline's weighted components on the meta device from
a diffusers folder's configs, or from these configs when there is no folder (a catalog model not
downloaded yet).
"""

from __future__ import annotations

import json
from pathlib import Path

# -- SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's configs) ------------------------------
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

# -- Anima (see bench/anima_full_size.py for where each config comes from) -----------------------------
ANIMA_TRANSFORMER = dict(
    in_channels=16, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28, mlp_ratio=4.0,
    text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None,
)
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)
ANIMA_CONDITIONER = dict(source_dim=1024, target_dim=1024, model_dim=1024, num_layers=6, num_attention_heads=16,
                         target_vocab_size=32128, min_sequence_length=512)
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True])

CLIP_VOCAB = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407)


def _config(folder: Path | None, name: str, default: dict) -> dict:
    if folder is None:
        return dict(default)
    path = folder / name / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def meta_components(family: str, folder: Path | None = None) -> dict:
    """{component: module on the meta device} for `family` ("sdxl" or "anima"), from `folder`'s
    configs or the real model's."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if family == "sdxl":
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            def clip(name: str, default: dict):
                if folder is not None:
                    return CLIPTextConfig.from_pretrained(str(folder / name))
                return CLIPTextConfig(**default, **CLIP_VOCAB)

            return {
                "unet": UNet2DConditionModel.from_config(_config(folder, "unet", SDXL_UNET)),
                "vae": AutoencoderKL.from_config(_config(folder, "vae", SDXL_VAE)),
                "text_encoder": CLIPTextModel(clip("text_encoder", CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(clip("text_encoder_2", CLIP_G)),
            }
        from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
        from transformers import Qwen3Config, Qwen3Model

        text = Qwen3Config.from_pretrained(str(folder / "text_encoder")) if folder else Qwen3Config(**QWEN3_0_6B)
        return {
            "transformer": CosmosTransformer3DModel.from_config(_config(folder, "transformer", ANIMA_TRANSFORMER)),
            "text_conditioner": AnimaTextConditioner.from_config(_config(folder, "text_conditioner", ANIMA_CONDITIONER)),
            "text_encoder": Qwen3Model(text),
            "vae": AutoencoderKLQwenImage.from_config(_config(folder, "vae", QWEN_IMAGE_VAE)),
        }
