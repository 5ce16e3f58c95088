"""The SDXL family (Animagine XL 3.1 and any SDXL checkpoint): sampling on a diffusers
StableDiffusionXLPipeline with A1111-style prompt weighting, a LoRA stack, an optional hires pass
and out-of-memory recovery."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from studio.errors import StudioError
from studio.generation.samplers import make_scheduler
from studio.models.devices import free_accelerator_memory, is_out_of_memory
from studio.models.vram import enable_vae_tiling
from studio.schemas import GenerateConfig, LoraSpec

if TYPE_CHECKING:
    from studio.generation.generate import StepCounter
    from studio.models.manager import ModelManager, ModelRecord


def hires_pass_steps(config: GenerateConfig) -> tuple[int, int]:
    """(num_inference_steps to ask img2img for, steps it will actually run) so that the executed
    count equals the requested hires steps, as in A1111."""
    if config.hires is None:
        return 0, 0
    asked = math.ceil(config.hires.steps / config.hires.denoise)
    return asked, min(int(asked * config.hires.denoise), asked)


def hires_size(config: GenerateConfig) -> tuple[int, int]:
    scale = config.hires.scale if config.hires else 1.0
    return (int(config.width * scale) // 8 * 8, int(config.height * scale) // 8 * 8)


class SDXLRunner:
    """Generation on one loaded SDXL pipeline. One runner per model record, kept with it."""

    def __init__(self, record: ModelRecord, manager: ModelManager | None = None):
        from studio.generation.lora import LoraStack

        self.record = record
        self.manager = manager
        self.pipe = record.model
        self.base_scheduler_config = dict(self.pipe.scheduler.config)
        self.loras = LoraStack(self.pipe, family=record.source.family)
        self._img2img = None

    @classmethod
    def for_record(cls, record: ModelRecord, manager: ModelManager | None = None) -> SDXLRunner:
        runner = record.attachments.get("runner")
        if runner is None:
            runner = record.attachments["runner"] = cls(record, manager)
        return runner

    # -- LoRAs ---------------------------------------------------------------------------------
    def apply_loras(self, specs: list[LoraSpec]) -> list[str]:
        return self.loras.apply(specs)

    def lora_hashes(self) -> dict[str, str]:
        return {lora.name: lora.hash for lora in self.loras.applied()}

    # -- prompt --------------------------------------------------------------------------------
    def encode(self, prompt: str, negative: str):
        from studio.generation.conditioning import encode_prompt_sdxl

        return encode_prompt_sdxl(self.pipe, prompt, negative, self.pipe._execution_device)

    # -- sampling ------------------------------------------------------------------------------
    def steps_per_batch(self, config: GenerateConfig) -> int:
        return config.steps + hires_pass_steps(config)[1]

    def _generators(self, seeds: list[int]):
        import torch

        # CPU generators: the same seed gives the same noise on any GPU or on the CPU.
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    @staticmethod
    def _callback(counter: StepCounter) -> Callable:
        def on_step_end(pipe, step, timestep, callback_kwargs):
            counter.step()  # reports progress; raises JobStopped when Stop was pressed
            return callback_kwargs

        return on_step_end

    def txt2img(self, config: GenerateConfig, conditioning, seeds: list[int], counter: StepCounter) -> list:
        self.pipe.scheduler = make_scheduler(config.sampler, self.base_scheduler_config)
        images = self.pipe(
            **conditioning.repeat(len(seeds)).pipeline_kwargs(),
            width=config.width,
            height=config.height,
            num_inference_steps=config.steps,
            guidance_scale=config.cfg_scale,
            generator=self._generators(seeds),
            callback_on_step_end=self._callback(counter),
        ).images
        if config.hires is not None:
            images = self.hires(config, conditioning, seeds, images, counter)
        return images

    def hires(self, config: GenerateConfig, conditioning, seeds: list[int], images: list, counter: StepCounter) -> list:
        """A1111's hires fix: Lanczos upscale, then img2img at the denoising strength."""
        from diffusers import StableDiffusionXLImg2ImgPipeline
        from PIL import Image

        if self._img2img is None:
            self._img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        img2img = self._img2img
        img2img.scheduler = make_scheduler(config.sampler, self.base_scheduler_config)
        size = hires_size(config)
        upscaled = [image.resize(size, Image.LANCZOS) for image in images]
        asked_steps, _ = hires_pass_steps(config)
        return img2img(
            **conditioning.repeat(len(seeds)).pipeline_kwargs(),
            image=upscaled,
            strength=config.hires.denoise,
            num_inference_steps=asked_steps,
            guidance_scale=config.cfg_scale,
            generator=self._generators(seeds),
            callback_on_step_end=self._callback(counter),
        ).images

    # -- out of memory -------------------------------------------------------------------------
    def _lower_memory(self) -> str | None:
        """One step down in memory use: tiled VAE first, then a lower VRAM policy."""
        if enable_vae_tiling(self.pipe):
            return "tiled VAE decoding"
        if self.manager is not None:
            policy = self.manager.demote(self.record)
            if policy is not None:
                return f"the '{policy.value}' VRAM policy"
        return None

    def run_with_oom_retry(self, fn: Callable[[], list], warnings: list[str]) -> list:
        """Run `fn`; on CUDA out-of-memory free memory, lower the memory use once and retry."""
        advice = "lower the size, batch size or hires scale, or restart with --vram low"
        result, out_of_memory = _attempt(fn)
        if not out_of_memory:
            return result
        free_accelerator_memory()
        change = self._lower_memory()
        if change is None:
            raise StudioError(f"out of GPU memory: {advice}")
        warnings.append(f"ran out of GPU memory; retried with {change}")
        result, out_of_memory = _attempt(fn)
        if not out_of_memory:
            return result
        free_accelerator_memory()
        raise StudioError(f"out of GPU memory even with {change}: {advice}")


def _attempt(fn: Callable[[], list]) -> tuple[list | None, bool]:
    """(result, False), or (None, True) after a CUDA out-of-memory error. Returning from the except
    block lets the failed attempt's frames (and their tensors) be freed before a retry."""
    try:
        return fn(), False
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    return None, True
