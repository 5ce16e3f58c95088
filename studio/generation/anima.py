"""The Anima family: sampling on diffusers' AnimaModularPipeline (Qwen3 text encoder, LLM adapter,
Cosmos DiT, Qwen-Image VAE, flow matching).

Anima runs only as a diffusers *modular* pipeline, which differs from SDXL's in three ways that
shape this module:
- No `callback_on_step_end`. The pipeline is a tree of blocks; the denoising loop runs its leaf
  blocks once per step. The runner samples through its own view of the loaded pipeline: the same
  components, with a `StepEnd` block appended to each denoising loop that calls the
  `step_end_callback` input after the scheduler step (progress, and Stop between steps).
- CFG is a component (a ClassifierFreeGuidance guider), set per run; scale 1 turns it off and
  skips the negative prompt.
- The blocks always encode the prompt themselves, so "conditioning" here is the text; the Qwen3
  encoder runs once per batch, which is small next to the sampling steps.
Samplers: the timestep block always hands the scheduler an explicit sigma schedule, so only
flow-matching schedulers whose `set_timesteps` takes `sigmas` work: FlowMatchEulerDiscrete
("Euler") and UniPC with flow sigmas ("UniPC"). DPM++ (DPMSolverMultistep) and Heun take no
sigmas there, and the stochastic Euler draws its noise without the run's generator, so images
would not reproduce from their seed: none of these are offered.

Importing this module does no work; diffusers and torch are imported when a runner is built.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studio.errors import ConfigError
from studio.generation.runner import Runner
from studio.generation.samplers import Sampler
from studio.models.anima_compat import BLOCK_ERROR_LOGGER, GUIDER_LOGGER, quiet_logger
from studio.schemas import GenerateConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from studio.generation.generate import StepCounter
    from studio.models.manager import ModelManager, ModelRecord

SIZE_MULTIPLE = 16  # VAE downscale 8 x DiT patch 2
MAX_SEQUENCE_LENGTH = 512  # Anima's text length (tokens), as trained
ANIMA_SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("Euler", "FlowMatchEulerDiscreteScheduler"),
        Sampler("UniPC", "UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    )
}
DEFAULT_ANIMA_SAMPLER = "Euler"
# What the sampling view shares with the loaded pipeline; scheduler and guider are made per run.
SHARED_COMPONENTS = ("text_encoder", "tokenizer", "t5_tokenizer", "text_conditioner", "transformer", "vae")


@dataclass(frozen=True)
class AnimaPrompt:
    """What the pipeline's text-encoder block encodes: the final prompt and negative prompt."""

    prompt: str
    negative: str


def anima_config(config: GenerateConfig) -> GenerateConfig:
    """`config` for Anima: a sampler left at the schema's default (Animagine's "Euler a", which
    Anima cannot use) becomes Anima's default; anything the user chose is checked, not changed."""
    if "sampler" not in config.model_fields_set:
        config = config.model_copy(update={"sampler": DEFAULT_ANIMA_SAMPLER})
    check_anima_config(config)
    return config


def check_anima_config(config: GenerateConfig) -> None:
    """What Anima cannot do with a valid GenerateConfig, checked before any model loads."""
    for side, value in (("width", config.width), ("height", config.height)):
        if value % SIZE_MULTIPLE:
            lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
            raise ConfigError(
                f"Anima needs a {side} divisible by {SIZE_MULTIPLE}; {value} is not "
                f"(try {lower} or {lower + SIZE_MULTIPLE})"
            )
    if config.sampler not in ANIMA_SAMPLERS:
        raise ConfigError(
            f"the sampler {config.sampler!r} does not work with Anima (a flow-matching model); "
            f"choose one of: {', '.join(ANIMA_SAMPLERS)}"
        )
    if config.hires is not None:
        raise ConfigError("the hires fix is not available for Anima yet: turn it off, or generate at the final size")


def make_anima_scheduler(name: str, base_config: dict):
    """A fresh scheduler for sampler `name`, built on the model's own (FlowMatchEuler) config:
    another scheduler class keeps the settings it understands and takes the model's `shift` as
    its `flow_shift`."""
    import diffusers

    sampler = ANIMA_SAMPLERS[name]
    cls = getattr(diffusers, sampler.scheduler)
    if cls is diffusers.FlowMatchEulerDiscreteScheduler:
        return cls.from_config(base_config, **sampler.options)
    accepted = inspect.signature(cls.__init__).parameters
    config = {key: value for key, value in base_config.items() if key in accepted}
    return cls.from_config(config, flow_shift=base_config.get("shift", 1.0), **sampler.options)


# ---------------------------------------------------------------------------------------------
# The step hook: a leaf block in the denoising loop
# ---------------------------------------------------------------------------------------------
@functools.cache
def _step_end_block_class():
    """The block class, made on first use so that importing this module imports no diffusers."""
    from diffusers.modular_pipelines import ModularPipelineBlocks
    from diffusers.modular_pipelines.modular_pipeline_utils import InputParam

    class StepEnd(ModularPipelineBlocks):
        model_name = "anima"

        @property
        def description(self) -> str:
            return "Calls `step_end_callback(step, timestep)` after each denoising step (progress, stop)."

        @property
        def inputs(self) -> list:
            return [InputParam("step_end_callback", description="called after each denoising step")]

        def __call__(self, components, block_state, i, t):
            callback = getattr(block_state, "step_end_callback", None)
            if callback is not None:
                callback(i, t)
            return components, block_state

    return StepEnd


def _all_blocks(block) -> Iterator:
    yield block
    for child in (getattr(block, "sub_blocks", None) or {}).values():
        yield from _all_blocks(child)


def sampling_blocks():
    """AnimaAutoBlocks with the step hook at the end of each denoising loop (text-to-image and
    image-to-image), and the loops' own progress bars off (the studio reports progress)."""
    from diffusers import AnimaAutoBlocks
    from diffusers.modular_pipelines import LoopSequentialPipelineBlocks

    blocks = AnimaAutoBlocks()
    for block in _all_blocks(blocks):
        if isinstance(block, LoopSequentialPipelineBlocks):
            block.sub_blocks["step_end"] = _step_end_block_class()()
            block.set_progress_bar_config(disable=True)
    return blocks


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------
class AnimaRunner(Runner):
    """Generation on one loaded Anima pipeline. One runner per model record, kept with it.
    LoRAs go into the loaded pipeline's transformer and text conditioner: the very modules the
    sampling view runs."""

    def __init__(self, record: ModelRecord, manager: ModelManager | None = None):
        from diffusers import AnimaModularPipeline

        super().__init__(record, manager)
        # The same component objects (moved and offloaded with the loaded pipeline), run through
        # blocks that report each step.
        with quiet_logger(GUIDER_LOGGER):  # the pipeline makes a default guider
            self.sampling = AnimaModularPipeline(blocks=sampling_blocks())
        self.sampling.update_components(**{name: self.pipe.components[name] for name in SHARED_COMPONENTS})

    # -- prompt --------------------------------------------------------------------------------
    def encode(self, prompt: str, negative: str) -> AnimaPrompt:
        return AnimaPrompt(prompt, negative)

    # -- sampling ------------------------------------------------------------------------------
    def steps_per_batch(self, config: GenerateConfig) -> int:
        return config.steps

    @staticmethod
    def _callback(counter: StepCounter) -> Callable:
        def on_step_end(step, timestep):
            counter.step()  # reports progress; raises JobStopped when Stop was pressed

        return on_step_end

    def _guider(self, cfg_scale: float):
        with quiet_logger(GUIDER_LOGGER):
            return self.sampling.get_component_spec("guider").create(guidance_scale=cfg_scale)

    def txt2img(self, config: GenerateConfig, conditioning: AnimaPrompt, seeds: list[int], counter: StepCounter) -> list:
        check_anima_config(config)
        self.sampling.update_components(
            scheduler=make_anima_scheduler(config.sampler, self.base_scheduler_config),
            guider=self._guider(config.cfg_scale),
        )
        with quiet_logger(BLOCK_ERROR_LOGGER):
            return self.sampling(
                prompt=conditioning.prompt,
                negative_prompt=conditioning.negative,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                width=config.width,
                height=config.height,
                num_inference_steps=config.steps,
                num_images_per_prompt=len(seeds),
                generator=self._generators(seeds),
                step_end_callback=self._callback(counter),
                output_type="pil",
                output="images",
            )

