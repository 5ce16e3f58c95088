"""What every model family does with its trainable network once the adapters are added."""

from __future__ import annotations


def trainable(module) -> list:
    """The parameters of `module` that train (the adapter's), in order."""
    return [p for p in module.parameters() if p.requires_grad]


def finish_network(groups: list[dict], denoiser, gradient_checkpointing: bool) -> list[dict]:
    """Keep the trained weights in fp32 (the frozen base may be bf16/fp16), turn on gradient
    checkpointing if asked, and put the denoiser in training mode. Returns `groups`."""
    import torch

    for group in groups:
        for param in group["params"]:
            param.data = param.data.to(torch.float32)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return groups
