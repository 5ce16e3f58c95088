"""The SDXL family (Animagine XL 3.1 and any SDXL checkpoint): sampling on a diffusers
StableDiffusionXLPipeline with A1111-style prompt weighting and an optional hires pass; the LoRA
stack and out-of-memory recovery come from the shared Runner."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from studio.generation.runner import Runner
from studio.generation.samplers import make_scheduler
from studio.schemas import GenerateConfig

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


class SDXLRunner(Runner):
    """Generation on one loaded SDXL pipeline. One runner per model record, kept with it."""

    def __init__(self, record: ModelRecord, manager: ModelManager | None = None):
        super().__init__(record, manager)
        self._img2img = None

    # -- prompt --------------------------------------------------------------------------------
    def encode(self, prompt: str, negative: str):
        from studio.generation.conditioning import encode_prompt_sdxl

        return encode_prompt_sdxl(self.pipe, prompt, negative, self.pipe._execution_device)

    # -- sampling ------------------------------------------------------------------------------
    def steps_per_batch(self, config: GenerateConfig) -> int:
        return config.steps + hires_pass_steps(config)[1]

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
