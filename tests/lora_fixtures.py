"""LoRA files for tests: 'trained-like' peft adapters on the demo SDXL, written in kohya format."""

from pathlib import Path

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def add_random_lora(pipe, components: dict[str, dict], seed: int, b_std: float = 0.02) -> dict[str, dict]:
    """Add a peft LoRA to each named component with random non-zero lora_B (an untrained LoRA
    changes nothing); returns each component's peft state dict."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    state_dicts = {}
    for component, options in components.items():
        model = getattr(pipe, component)
        model.add_adapter(LoraConfig(init_lora_weights="gaussian", **options), adapter_name="trained")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, b_std)
                if "lora_magnitude_vector" in name:
                    param.mul_(1.2)
        state_dicts[component] = get_peft_model_state_dict(model, adapter_name="trained")
    return state_dicts


def write_demo_kohya_lora(path: Path, seed: int, rank: int = 4, alpha: float = 8, b_std: float = 0.05) -> Path:
    """A kohya LoRA (UNet attention) for demo-sdxl that visibly changes its images."""
    from studio.models import lora_format
    from studio.models.demo import build_demo_sdxl_pipeline

    pipe = build_demo_sdxl_pipeline(0)
    sds = add_random_lora(pipe, {"unet": {"r": rank, "lora_alpha": alpha, "target_modules": ATTENTION}}, seed, b_std)
    metadata = lora_format.kohya_metadata(output_name=Path(path).stem, network_dim=rank, network_alpha=alpha)
    return lora_format.save_kohya_lora(path, unet=sds["unet"], alpha=alpha, metadata=metadata)
