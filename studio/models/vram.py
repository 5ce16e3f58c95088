"""VRAM policy: how a pipeline is placed on the execution device.

An explicit enum, as in ComfyUI, so the policy in force is visible in the UI:
- HIGH: every component on the GPU.
- NORMAL: model-level CPU offload; idle components wait in RAM (diffusers' enable_model_cpu_offload).
- LOW: diffusers group offloading with CUDA streams, plus VAE tiling and slicing: SDXL on small cards.
- CPU: everything runs on the CPU.
Offload calls raise without an accelerator, so they are only made when there is one.
"""

from __future__ import annotations

from enum import Enum

from studio.models.devices import DeviceInfo

GiB = 1024**3
# Activation memory for one SDXL image at about one megapixel with the VAE decode, fp16/bf16.
WORKING_BYTES = int(3.0 * GiB)


class VramPolicy(str, Enum):
    AUTO = "auto"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    CPU = "cpu"


def choose_policy(requested: str | VramPolicy, device: DeviceInfo, model_bytes: int, largest_component_bytes: int) -> VramPolicy:
    """The policy to use for a model of `model_bytes` whose largest part is `largest_component_bytes`."""
    requested = VramPolicy(requested)
    if not device.accelerator:
        return VramPolicy.CPU
    if requested is not VramPolicy.AUTO:
        return requested
    free = device.free_bytes if device.free_bytes is not None else device.total_bytes
    if free is None:  # e.g. Apple MPS: unified memory, no budget to read
        return VramPolicy.HIGH
    if free >= model_bytes + WORKING_BYTES:
        return VramPolicy.HIGH
    if free >= largest_component_bytes + WORKING_BYTES:
        return VramPolicy.NORMAL
    return VramPolicy.LOW


def pick_dtype(device: DeviceInfo):
    """bf16 where supported (no fp16 VAE overflow), fp16 on older GPUs, fp32 on CPU (unless the
    device says bf16: ZeroGPU's main process keeps bf16 models in RAM for the GPU it gets per call)."""
    import torch

    if not device.accelerator:
        return torch.bfloat16 if device.bf16 else torch.float32
    return torch.bfloat16 if device.bf16 else torch.float16


def pipeline_bytes(pipe) -> tuple[int, int]:
    """(total, largest component) parameter+buffer bytes of a diffusers pipeline."""
    import torch

    sizes = []
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            tensors = list(component.parameters()) + list(component.buffers())
            sizes.append(sum(t.numel() * t.element_size() for t in tensors))
    return sum(sizes), max(sizes, default=0)


def place_pipeline(pipe, policy: VramPolicy, device: DeviceInfo) -> None:
    """Put a freshly loaded (RAM-resident) pipeline under `policy` on `device`."""
    if policy is VramPolicy.CPU or not device.accelerator:
        pipe.to("cpu")
    elif policy is VramPolicy.HIGH:
        pipe.to(device.execution_device)
    elif policy is VramPolicy.NORMAL:
        pipe.enable_model_cpu_offload(device=device.execution_device)
    elif policy is VramPolicy.LOW:
        pipe.enable_group_offload(**group_offload_options(device))
        enable_vae_tiling(pipe)
    else:
        raise ValueError(f"unplaceable policy {policy}")


def group_offload_options(device: DeviceInfo) -> dict:
    """The LOW policy's group offloading: leaf-level layers streamed from RAM on CUDA streams."""
    import torch

    return {"onload_device": torch.device(device.execution_device), "offload_device": torch.device("cpu"),
            "offload_type": "leaf_level", "use_stream": True}


def enable_vae_tiling(pipe) -> bool:
    """Decode in tiles and one image at a time: the first thing to try after running out of memory."""
    vae = getattr(pipe, "vae", None)
    if vae is None or getattr(vae, "use_tiling", False):
        return False
    vae.enable_tiling()
    vae.enable_slicing()
    return True


def reset_placement(pipe) -> None:
    """Undo a policy: remove offload hooks and bring every component back to RAM."""
    pipe.remove_all_hooks()
    pipe.to("cpu")


def evict_pipeline(pipe, policy: VramPolicy) -> None:
    """Move an idle pipeline off the GPU to make room. Offloaded policies already keep it in RAM."""
    if policy is VramPolicy.HIGH:
        pipe.to("cpu")


def restore_pipeline(pipe, policy: VramPolicy, device: DeviceInfo) -> None:
    """Bring an evicted pipeline back to the execution device."""
    if policy is VramPolicy.HIGH:
        pipe.to(device.execution_device)


class PipelinePlacement:
    """How the manager places a diffusers pipeline: by VRAM policy (device move or offload hooks)."""

    demotable = True

    place = staticmethod(place_pipeline)
    evict = staticmethod(evict_pipeline)
    restore = staticmethod(restore_pipeline)
    reset = staticmethod(reset_placement)


class SelfPlacedModel:
    """Models that hold their own device placement (an onnxruntime session, a transformers VLM):
    created on the execution device at load; evicting drops them, restoring creates them again."""

    demotable = False

    @staticmethod
    def place(model, policy: VramPolicy, device: DeviceInfo) -> None:
        return None

    @staticmethod
    def evict(model, policy: VramPolicy) -> None:
        model.unload()

    @staticmethod
    def restore(model, policy: VramPolicy, device: DeviceInfo) -> None:
        model.reload()

    @staticmethod
    def reset(model) -> None:
        return None


class ModularPipelinePlacement:
    """How the manager places a diffusers *modular* pipeline (Anima's AnimaModularPipeline).

    Modular pipelines have `.to()` but none of DiffusionPipeline's offload methods
    (enable_model_cpu_offload, enable_group_offload, remove_all_hooks), so the policies use
    diffusers' building blocks directly:
    - NORMAL: model-level offload by a ComponentsManager (`enable_auto_cpu_offload`): each model
      moves to the GPU when its forward runs, and others go back to RAM when room is needed.
    - LOW: group offloading of every model (`diffusers.hooks.apply_group_offloading`, leaf level,
      CUDA streams, the same call DiffusionPipeline.enable_group_offload makes per component),
      plus VAE tiling and slicing.
    The ComponentsManager is kept on the pipeline as `studio_offload` so that `reset` can undo it.
    """

    demotable = True

    @staticmethod
    def place(pipe, policy: VramPolicy, device: DeviceInfo) -> None:
        if policy is VramPolicy.CPU or not device.accelerator:
            pipe.to("cpu")
        elif policy is VramPolicy.HIGH:
            pipe.to(device.execution_device)
        elif policy is VramPolicy.NORMAL:
            from diffusers import ComponentsManager

            manager = ComponentsManager()
            for name, model in _pipeline_models(pipe):
                manager.add(name, model)
            manager.enable_auto_cpu_offload(device=device.execution_device)
            pipe.studio_offload = manager
        elif policy is VramPolicy.LOW:
            from diffusers.hooks import apply_group_offloading

            for _name, model in _pipeline_models(pipe):
                apply_group_offloading(model, **group_offload_options(device))
            enable_vae_tiling(pipe)
        else:
            raise ValueError(f"unplaceable policy {policy}")

    evict = staticmethod(evict_pipeline)
    restore = staticmethod(restore_pipeline)

    @staticmethod
    def reset(pipe) -> None:
        """Undo NORMAL's offload hooks and bring every model back to RAM. (LOW is the lowest
        policy, so demotion never has to undo group offloading.)"""
        manager = getattr(pipe, "studio_offload", None)
        if manager is not None:
            manager.disable_auto_cpu_offload()
            pipe.studio_offload = None
        pipe.to("cpu")


def _pipeline_models(pipe):
    import torch

    return [(name, c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]


PLACEMENTS = {
    "sdxl": PipelinePlacement,
    "anima": ModularPipelinePlacement,
    "tagger": SelfPlacedModel,
    "vlm": SelfPlacedModel,
}
