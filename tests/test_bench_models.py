"""The full-size SDXL used by the GPU benchmarks really has SDXL's size (checked on the meta device)."""

from bench.sdxl_full_size import SDXL_UNET, UNET_PARAMETERS


def test_full_size_unet_has_sdxl_base_parameter_count():
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMETERS
