"""What every model family does with its trainable network once the adapters are added."""

from __future__ import annotations


def trainable(module) -> list:
    """The parameters of `module` that train (the adapter's), in order."""
    return [p for p in module.parameters() if p.requires_grad]


def finish_network(groups: list[dict], denoiser, gradient_checkpointing: bool, fp8_base: bool = False) -> list[dict]:
    """Keep the trained weights in fp32 (the frozen base may be bf16/fp16), store the frozen
    denoiser in float8 if asked (see store_in_fp8), turn on gradient checkpointing if asked, and
    put the denoiser in training mode. Returns `groups`."""
    import torch

    for group in groups:
        for param in group["params"]:
            param.data = param.data.to(torch.float32)
    if fp8_base:
        store_in_fp8(denoiser)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return groups


def _fp8_linear_forward(self, x):
    import torch.nn.functional as F

    return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _fp8_conv_forward(self, x):
    return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def store_in_fp8(model) -> int:
    """Keep the frozen Linear and Conv2d weights of `model` in float8 (e4m3) and cast each up to
    its input's dtype as the layer runs. The cast is an ordinary tensor op, so autograd keeps the
    cast copy for the backward pass (never the float8 parameter itself); the network's layers
    (peft's lora_*), and the layers diffusers keeps out of its own layerwise casting (norms,
    positional and patch embeddings, proj_in/out), stay as they are. Returns the layers stored."""
    import re
    import types

    import torch
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *(getattr(model, "_skip_layerwise_casting_patterns", None) or ()),
                *(getattr(model, "_keep_in_fp32_modules", None) or ()))
    count = 0
    for name, module in model.named_modules():
        if "lora_" in name or type(module) not in (torch.nn.Linear, torch.nn.Conv2d):
            continue
        if module.weight.requires_grad or any(re.search(pattern, name) for pattern in patterns):
            continue
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
        forward = _fp8_linear_forward if isinstance(module, torch.nn.Linear) else _fp8_conv_forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count
