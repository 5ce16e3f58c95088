"""What every model family does with its trainable network once the adapters are added."""

from __future__ import annotations


def trainable(module) -> list:
    """The parameters of `module` that train (the adapter's), in order."""
    return [p for p in module.parameters() if p.requires_grad]


def finish_network(groups: list[dict], denoiser, gradient_checkpointing: bool, fp8_base: bool = False,
                   compute_dtype=None) -> list[dict]:
    """Keep the trained weights in fp32 (the frozen base may be bf16/fp16), store the frozen
    denoiser in float8 if asked (each layer cast to `compute_dtype` as it runs; the network's
    layers are left alone), turn on gradient checkpointing if asked, and put the denoiser in
    training mode. Returns `groups`."""
    import torch

    for group in groups:
        for param in group["params"]:
            param.data = param.data.to(torch.float32)
    if fp8_base:
        denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                          compute_dtype=compute_dtype or torch.bfloat16)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return groups
