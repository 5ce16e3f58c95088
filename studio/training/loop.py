"""The training loop: one function that reads top to bottom, on accelerate's Accelerator.

Every random draw of a step (caption variant, flip, latent sample, noise, timestep) comes from a
generator seeded by (seed, micro-batch, position in the global batch). Nothing depends on how
many steps ran before in this process, so a resumed run draws exactly what an uninterrupted one
would, and a data-parallel run draws what a single process with the same global batch draws.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import ConfigError
from studio.fileio import atomic_write_text, read_jsonl
from studio.training.config import TrainConfig
from studio.training.data import TrainSample, crop_for

SMOOTHING_WINDOW = 20
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class TrainEvent:
    kind: str  # "step", "validation", "sample", "checkpoint", "message"
    step: int
    epoch: int
    data: dict = field(default_factory=dict)


@dataclass
class RunResult:
    status: str  # "done", "stopped", "failed"
    step: int
    run_dir: Path
    loras: list[Path]
    message: str = ""


@dataclass
class Plan:
    total_steps: int
    micro_per_step: int
    batches_per_epoch: int

    @property
    def steps_per_epoch(self) -> float:
        return self.batches_per_epoch / self.micro_per_step


def make_plan(config: TrainConfig, batches_per_epoch: int) -> Plan:
    accumulation = config.gradient_accumulation_steps
    if config.max_train_epochs is not None:
        total = (config.max_train_epochs * batches_per_epoch) // accumulation
    else:
        total = config.max_train_steps
    if total < 1:
        raise ConfigError(f"the run has no optimizer step: {batches_per_epoch} batches per epoch with "
                          f"gradient_accumulation_steps={accumulation}")
    return Plan(total, accumulation, batches_per_epoch)


def seed_for(seed: int, *parts: int) -> int:
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


class EventLog:
    """events.jsonl in the run folder (the UI re-plots from it after a page reload) plus the
    caller's callback and TensorBoard scalars."""

    def __init__(self, run_dir: Path, on_event: Callable[[TrainEvent], None] | None, tensorboard: bool,
                 main_process: bool):
        self.path = run_dir / "events.jsonl"
        self.on_event, self.main = on_event, main_process
        self.writer = _tensorboard_writer(run_dir / "tensorboard") if tensorboard and main_process else None

    def truncate_after(self, step: int) -> None:
        """On resume: forget events past the resumed step, so the curve continues without a fork."""
        if not self.main or not self.path.is_file():
            return
        kept = [event for event in read_jsonl(self.path) if event.get("step", 0) <= step]  # torn lines go too
        atomic_write_text(self.path, "".join(json.dumps(event, default=str) + "\n" for event in kept))

    def emit(self, kind: str, step: int, epoch: int, **data) -> None:
        event = TrainEvent(kind, step, epoch, data)
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"kind": kind, "step": step, "epoch": epoch, **data}, default=str) + "\n")
            if self.writer is not None:
                for key, value in data.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.writer.add_scalar(f"{kind}/{key}", value, step)
        if self.on_event is not None:
            self.on_event(event)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return read_jsonl(path) if path.is_file() else []


# -- one micro-batch ------------------------------------------------------------------------------
class BatchBuilder:
    """Turns a micro-batch of samples into model inputs, drawing its randomness per sample."""

    def __init__(self, model, config: TrainConfig, sampler, latent_cache, text_cache):
        self.model, self.config, self.sampler = model, config, sampler
        self.latent_cache, self.text_cache = latent_cache, text_cache

    def latents(self, sample: TrainSample, flip: bool, generator):
        import torch

        from studio.training.data import load_pixels

        if self.latent_cache is not None:
            mean, std = self.latent_cache.get(sample, flip)
        else:
            mean, std = (t[0].float().cpu() for t in self.model.encode_images(load_pixels(sample, flip)[None]))
        draw = torch.randn(mean.shape, generator=generator)
        return self.model.scale_latents(mean + std * draw)

    def build(self, samples: list[TrainSample], seeds: list[int]):
        import torch

        captions, latents, flips, noise, timesteps = [], [], [], [], []
        for sample, seed in zip(samples, seeds):
            rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
            flip = self.config.flip_aug and rng.random() < 0.5
            captions.append(self.sampler.sample(list(sample.tags), sample.nl, rng))
            latent = self.latents(sample, flip, generator)
            eps = torch.randn(latent.shape, generator=generator)
            if self.config.noise_offset:
                offset_shape = (latent.shape[0],) + (1,) * (latent.ndim - 1)
                eps = eps + self.config.noise_offset * torch.randn(offset_shape, generator=generator)
            latents.append(latent)
            noise.append(eps)
            flips.append(flip)
            timesteps.append(self.model.draw_timestep(generator))  # the family's timestep distribution
        device = self.model.device
        latents = torch.stack(latents).to(device)
        noise = torch.stack(noise).to(device)
        timesteps = self.model.timestep_tensor(timesteps, device)
        text, pooled = self.text(captions)
        time_ids = self.model.time_ids([s.original for s in samples],
                                       [crop_for(s, f) for s, f in zip(samples, flips)],
                                       [s.bucket for s in samples])
        return latents, noise, timesteps, text, pooled, time_ids

    def text(self, captions: list[str]):
        import torch

        if self.text_cache is None:
            return self.model.encode_text(captions)
        pairs = [self.text_cache.get(caption) for caption in captions]
        device = self.model.device
        return (torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device))


def diffusion_loss(model, config: TrainConfig, inputs, unet=None):
    """The family's training loss on one micro-batch (SDXL: epsilon/v MSE, min-SNR weighted if asked;
    Anima: flow matching). `unet` is the denoiser as accelerate prepared it."""
    return model.loss(inputs, unet=unet)


def validation_loss(model, config: TrainConfig, samples: list[TrainSample], builder: BatchBuilder) -> float:
    """The loss on held-out images at fixed timesteps with fixed noise: comparable across steps and runs."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for index, sample in enumerate(samples):
            for timestep in getattr(model, "validation_timesteps", VALIDATION_TIMESTEPS):
                generator = torch.Generator().manual_seed(seed_for(config.seed, 7_777_777, index, timestep))
                if builder.latent_cache is not None:
                    mean, _ = builder.latent_cache.get(sample, False)
                else:
                    from studio.training.data import load_pixels

                    mean = model.encode_images(load_pixels(sample, False)[None])[0][0].float().cpu()
                latents = model.scale_latents(mean)[None].to(model.device)
                noise = torch.randn(mean.shape, generator=generator)[None].to(model.device)
                text, pooled = builder.text([_validation_caption(builder.sampler, sample, config.seed, index)])
                time_ids = model.time_ids([sample.original], [sample.crop], [sample.bucket])
                steps = model.validation_timestep(timestep)
                total += float(diffusion_loss(model, config, (latents, noise, steps, text, pooled, time_ids)))
                count += 1
    return total / max(count, 1)


def _validation_caption(sampler, sample: TrainSample, seed: int, index: int) -> str:
    """The held-out image's caption: its static caption, or, where captions vary per step (mixed
    captions, shuffling, dropout), one draw from a generator fixed per image, so every
    validation pass sees the same caption."""
    if not sampler.varies_per_step:
        return sampler.static_caption(list(sample.tags), sample.nl)
    return sampler.sample(list(sample.tags), sample.nl, random.Random(seed_for(seed, 7_777_778, index)), epoch=1)
