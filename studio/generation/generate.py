"""Text-to-image generation: one validated GenerateConfig in, saved PNGs with infotext out.

`generate()` reads top to bottom in numbered steps, in the manner of a diffusers pipeline call.
The family-specific work lives in its own module (sdxl.py: SDXLRunner, anima.py: AnimaRunner,
chosen by the model's family); this file owns the flow: model, prompt, seeds, LoRAs, sampling with
progress and stop, out-of-memory recovery, saving.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from studio import __version__
from studio.errors import JobStopped, LoraError
from studio.generation.infotext import (
    format_infotext,
    format_lora_hashes,
    lora_tags,
    model_hash,
    write_new_png,
)
from studio.generation.prompt import builder_for
from studio.generation.samplers import SAMPLERS
from studio.models.manager import ModelManager, ModelRecord
from studio.schemas import MAX_SEED, GenerateConfig

Report = Callable[[float | None, str], None]


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    seed: int
    infotext: str


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    model: str
    prompt: str
    negative_prompt: str
    warnings: list[str] = field(default_factory=list)
    memory_plan: str = ""  # "needs ~9.1 GB of VRAM, you have 24.0 GB free"


@dataclass
class StepCounter:
    """Turns per-step callbacks into an overall fraction across batches and passes."""

    total: int
    report: Report
    stop: threading.Event | None
    done: int = 0
    label: str = ""

    def step(self) -> None:
        self.done += 1
        self.report(self.done / self.total, f"{self.label} step {self.done}/{self.total}")
        if self.stop is not None and self.stop.is_set():
            raise JobStopped("generation stopped")


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed


def image_seeds(base_seed: int, batch_count: int, batch_size: int) -> list[list[int]]:
    """A1111's convention: image i of the run gets seed + i, so each image reproduces alone."""
    return [[(base_seed + c * batch_size + b) % (MAX_SEED + 1) for b in range(batch_size)] for c in range(batch_count)]


def next_image_number(folder: Path) -> int:
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=-1) + 1


def infotext_params(config: GenerateConfig, record: ModelRecord, seed: int, lora_hashes: dict[str, str]) -> dict:
    sampler = SAMPLERS[config.sampler]
    params: dict[str, object] = {
        "Steps": config.steps,
        "Sampler": sampler.infotext_name,
        "Schedule type": sampler.schedule_type or None,
        "CFG scale": config.cfg_scale,
        "Seed": seed,
        "Size": f"{config.width}x{config.height}",
        "Model hash": model_hash(record.weights_file) if record.weights_file else None,
        "Model": record.source.name,
        "Lora hashes": format_lora_hashes(lora_hashes) if lora_hashes else None,
    }
    if config.hires is not None:
        params.update({
            "Denoising strength": config.hires.denoise,
            "Hires upscale": config.hires.scale,
            "Hires steps": config.hires.steps,
            "Hires upscaler": "Lanczos",
        })
    params["Version"] = f"anime-lora-studio {__version__}"
    return params


def config_for_family(config: GenerateConfig, family: str) -> GenerateConfig:
    """`config` checked for what the model family cannot do, before the model loads; Anima also
    takes its own sampler where the config left the (SDXL) default."""
    if family == "anima":
        from studio.generation.anima import anima_config

        return anima_config(config)
    return config


def family_prompt(config: GenerateConfig, family: str) -> tuple[str, str]:
    """The model's own prompt conventions: Anima's special tags lead, Animagine's follow."""
    return builder_for(family).build(config.prompt, config.negative_prompt, config.style)


def runner_for(record: ModelRecord, manager: ModelManager):
    """The record's runner (made once, kept with the record) for its model family."""
    if record.source.family == "anima":
        from studio.generation.anima import AnimaRunner

        return AnimaRunner.for_record(record, manager)
    from studio.generation.sdxl import SDXLRunner

    return SDXLRunner.for_record(record, manager)


def generate(
    manager: ModelManager,
    config: GenerateConfig,
    *,
    outputs_dir: Path,
    default_model: str,
    report: Report | None = None,
    stop: threading.Event | None = None,
) -> GenerateResult:
    report = report or (lambda fraction, message: None)

    # 1. The model: resolve the reference, check what its family cannot do, load it on first use.
    check_can_generate(config)
    source = manager.resolve(config.model or default_model, vae=config.vae or None)
    config = config_for_family(config, source.family)
    record = manager.get(source, progress=report)
    plan = memory_plan_for(manager, record, config)
    plan_text = plan.summary() if plan else ""
    if plan_text:
        report(0.0, f"memory plan: {plan_text}")

    # 2. The final prompt: the user's tags plus the model's special tags and negative prompt.
    prompt, negative = family_prompt(config, record.source.family)

    # 3. Seeds, one per image, recorded in each image's infotext.
    seeds = image_seeds(resolve_seed(config.seed), config.batch_count, config.batch_size)
    folder = outputs_dir / datetime.now().strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)

    images: list[GeneratedImage] = []
    with manager.gpu_lane("generation"), manager.use(record):
        runner = runner_for(record, manager)
        # 4. LoRAs: load, verify each changes the model, weight them; unused ones are removed.
        warnings = runner.apply_loras(config.loras)
        lora_hashes = runner.lora_hashes()
        tags = lora_tags((lora.name, lora.weight) for lora in runner.loras.applied())  # as A1111 records them
        # 5. Conditioning once for the whole run, then the sampling loop with progress and stop.
        counter = StepCounter(config.batch_count * runner.steps_per_batch(config), report, stop)
        conditioning = runner.encode(prompt, negative)
        for batch_index, batch_seeds in enumerate(seeds):
            counter.label = f"batch {batch_index + 1}/{config.batch_count}:"
            pictures = runner.run_with_oom_retry(
                lambda: runner.txt2img(config, conditioning, batch_seeds, counter), warnings
            )
            # 6. Save every image with A1111 infotext, as soon as its batch is done.
            for picture, seed in zip(pictures, batch_seeds):
                text = format_infotext(prompt + tags, negative, infotext_params(config, record, seed, lora_hashes))
                path = write_new_png(picture, folder, lambda n, seed=seed: f"{n:05d}-{seed}.png", text,
                                     start=next_image_number(folder))
                images.append(GeneratedImage(path, seed, text))
    report(1.0, f"done: {len(images)} image(s)")
    if plan is not None and plan.fits is False:
        warnings.insert(0, f"This generation {plan_text}.")
    return GenerateResult(images, record.source.name, prompt, negative, warnings, plan_text)


def memory_plan_for(manager: ModelManager, record, config: GenerateConfig):
    """The memory this generation needs on the manager's device (a MemoryPlan), estimated from the
    loaded pipeline under its VRAM policy at the largest size it will run (hires fix included);
    None for a model family without a plan."""
    from studio.training.memory_plan import plan_loaded_generation

    family = record.source.family
    if family not in ("sdxl", "anima"):
        return None
    width, height = config.width, config.height
    if config.hires is not None:
        width, height = (int(side * config.hires.scale) // 8 * 8 for side in (width, height))
    device = manager.device
    return plan_loaded_generation(record.model, family, width, height, config.batch_size,
                                  policy=record.policy.value, device="cuda" if device.accelerator else "cpu",
                                  free_bytes=manager.room_for(record))


def config_from_form(form: dict, manager: ModelManager, default_model: str) -> GenerateConfig:
    """Validate a form (UI or CLI), filling what it leaves out from the model's recommended
    defaults in the catalog (e.g. Animagine's 28 steps, CFG 6, 832x1216)."""
    from studio.schemas import validate

    model = form.get("model") or default_model
    entry = manager.catalog.get(model)
    values = {**(entry.defaults if entry else {}), **{k: v for k, v in form.items() if v is not None}}
    return validate(GenerateConfig, values)


def check_can_generate(config: GenerateConfig) -> None:
    """Cheap checks before any model loads, so bad input fails in milliseconds."""
    for spec in config.loras:
        if not Path(spec.path).is_file():
            raise LoraError(f"LoRA file not found: {spec.path}")
