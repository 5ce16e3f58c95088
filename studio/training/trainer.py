"""`train()`: a LoRA training run from a validated TrainConfig, in numbered steps. The Train tab,
`python -m studio train` and `accelerate launch` all come here."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from studio.errors import ConfigError, JobStopped, StudioError
from studio.training.checkpoint import (
    TrainingState,
    check_resumable,
    list_states,
    load_state,
    prune_states,
    save_state,
)
from studio.training.config import TrainConfig
from studio.training.data import BatchPlan, collect_samples
from studio.training.loop import (
    SMOOTHING_WINDOW,
    BatchBuilder,
    EventLog,
    Plan,
    RunResult,
    TrainEvent,
    diffusion_loss,
    make_plan,
    seed_for,
    validation_loss,
)
from studio.wording import a


def cpu_precision(requested: str) -> str:
    """What a CPU can train in: bf16 where it computes it natively (AVX512-BF16 or AMX: half the
    memory of fp32, so full-size models fit in RAM), otherwise fp32; never fp16."""
    import torch

    if requested == "bf16" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16"
    return "no"


def _accelerator(config: TrainConfig):
    """One Accelerator per run. Without CUDA it runs on the CPU (bf16 where the CPU has it, else
    fp32), and several processes (accelerate launch / torchrun) train data-parallel over gloo."""
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if cuda:
        from studio.models.devices import enable_tf32

        enable_tf32()
    precision = config.mixed_precision if cuda else cpu_precision(config.mixed_precision)
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        # accelerate keeps one precision per process; the app trains run after run in one process.
        # Only the precision state is dropped: the process group (PartialState) stays as it is.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    return accelerator, precision


def _emit_memory_plan(config: TrainConfig, precision: str, device, models_dir: Path, log: EventLog) -> None:
    """The run's memory plan as its first message (and in the event, for benchmarks to compare
    with the measured peak). A model the plan cannot read never stops the run."""
    from studio.training.memory_plan import GB, config_folder_for, device_memory, plan_training

    try:
        family, folder = config_folder_for(config, models_dir)
        kind, free = device_memory()
        plan = plan_training(config.model_copy(update={"mixed_precision": precision}), family, folder,
                             device=kind if device.type != "cpu" else "cpu", free_bytes=free)
    except Exception as exc:  # noqa: BLE001 - an estimate; the run goes on without it
        log.emit("message", 0, 0, text=f"memory plan unavailable: {str(exc).splitlines()[0][:200]}")
        return
    log.emit("message", 0, 0, text=f"memory plan: {plan.summary()} ({plan.details()})",
             memory_plan_gb={name: round(size / GB, 3) for name, size in plan.parts.items()})


def _weight_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _load_model(config: TrainConfig, models_dir: Path, device, weight_dtype, report):
    from studio.models.catalog import load_catalog, resolve_reference
    from studio.models.loaders import load_model

    source = resolve_reference(config.pretrained_model, load_catalog(), vae=config.vae or None)
    if source.family not in ("sdxl", "anima"):
        raise ConfigError(f"{config.pretrained_model} is {a(source.family)} model; this trainer handles SDXL and Anima")
    loaded = load_model(source, models_dir, weight_dtype, str(device), report)
    if source.family == "anima":
        from studio.training.anima import AnimaTrainingModel

        return AnimaTrainingModel(loaded.model, config, device, weight_dtype), source
    from studio.training.sdxl import SDXLTrainingModel

    return SDXLTrainingModel(loaded.model, config, device, weight_dtype), source


def _caption_sampler(config: TrainConfig, concept_tags: Sequence[str] = ()):
    """The run's caption sampler; with mixed captions' protect_concepts, `concept_tags` (the
    concepts' triggers and the dataset's character tags) are never dropped."""
    from studio.training.captions import CaptionSampler, MixedCaptionConfig

    caption = config.caption_config()
    if isinstance(caption, MixedCaptionConfig) and caption.protect_concepts and concept_tags:
        caption = caption.model_copy(update={"protected_tags": [*caption.protected_tags, *concept_tags]})
    return CaptionSampler.from_config(caption)


def _concept_tags(concepts: list[dict], data, character_tags: frozenset[str]) -> list[str]:
    """The triggers of the run's concepts and every character tag its captions use."""
    from studio.captioning.tag_rules import tag_key
    from studio.dataset.concepts import looks_like_character

    characters = {tag_key(t) for t in character_tags}
    used = {tag for counts in data.tag_frequency.values() for tag in counts}
    found = [t for c in concepts for t in c.get("triggers", [])]
    found += sorted(t for t in used if tag_key(t) in characters or looks_like_character(t))
    return list(dict.fromkeys(found))


def _caches(config: TrainConfig, model, sampler, cache_dir: Path):
    from studio.training.cache import LatentCache, TextCache

    latent = LatentCache(cache_dir, model.vae_identity(), model.encode_images) if config.cache_latents else None
    text, note = None, None
    if config.cache_text_encoder_outputs:
        reason = sampler.cache_refusal_reason()
        if reason:
            note = reason
        else:
            text = TextCache(cache_dir, model.text_identity(), model.encode_text)
    return latent, text, note


def _fill_caches(samples, latent_cache, text_cache, sampler, config, log: EventLog, stop, main: bool):
    """Encode every latent (both flips if flip_aug) and static caption up front, with progress."""
    if latent_cache is None and text_cache is None:
        return
    flips = (False, True) if config.flip_aug else (False,)
    work = [(s, f) for s in samples for f in flips] if latent_cache is not None else []
    captions = sorted({sampler.static_caption(list(s.tags), s.nl) for s in samples}) if text_cache else []
    total = len(work) + len(captions)
    for done, (sample, flip) in enumerate(work, 1):
        if stop is not None and stop.is_set():
            raise _Stopped()
        latent_cache.get(sample, flip)
        if done % 8 == 0 or done == len(work):
            log.emit("message", 0, 0, text=f"caching latents {done}/{total}", fraction=done / total)
    for done, caption in enumerate(captions, len(work) + 1):
        if stop is not None and stop.is_set():
            raise _Stopped()
        text_cache.get(caption)
    if captions:
        log.emit("message", 0, 0, text=f"cached {len(captions)} text-encoder outputs", fraction=1.0)


class _Stopped(Exception):
    pass


def _optimizer_and_schedule(config: TrainConfig, groups: list[dict], plan: Plan):
    from studio.training.optim import make_optimizer
    from studio.training.schedules import LRSchedule, make_lr_scheduler

    optimizer = make_optimizer(config.optimizer_type, groups, lr=config.learning_rate,
                               weight_decay=config.weight_decay, extra_args=dict(config.optimizer_args))
    decaying = config.lr_scheduler not in ("constant", "constant_with_warmup")
    schedule = LRSchedule(config.lr_scheduler, plan.total_steps, warmup_steps=config.lr_warmup_steps,
                          num_cycles=config.lr_scheduler_num_cycles if config.lr_scheduler == "cosine_with_restarts" else 1,
                          cycle_decay=config.lr_cycle_decay if config.lr_scheduler == "cosine_with_restarts" else 1.0,
                          min_lr_ratio=config.min_lr_ratio if decaying else 0.0)
    return optimizer, make_lr_scheduler(optimizer, schedule)


def train(
    config: TrainConfig,
    *,
    run_dir: Path,
    models_dir: Path,
    cache_dir: Path,
    resume: bool = False,
    stop: threading.Event | None = None,
    stop_after: int | None = None,
    on_event: Callable[[TrainEvent], None] | None = None,
) -> RunResult:
    # 1. The accelerator: device, mixed precision, gradient accumulation, processes.
    accelerator, precision = _accelerator(config)
    main, world = accelerator.is_main_process, accelerator.num_processes
    run_dir.mkdir(parents=True, exist_ok=True)
    log = EventLog(run_dir, on_event, config.tensorboard, main)
    if precision != config.mixed_precision:
        log.emit("message", 0, 0, text=f"mixed_precision {config.mixed_precision} needs a CUDA GPU (bf16: or a CPU "
                 "with AVX512-BF16); training in fp32")

    # 2. Data: samples with buckets, the batch plan (global batch = per-device batch x processes).
    data, concept_tags, plan_batches, plan = _data(config, models_dir, run_dir, world, main, log)
    if main:
        _emit_memory_plan(config, precision, accelerator.device, models_dir, log)

    # 3. The model, its network, the caption sampler and the caches.
    model, source = _load_model(config, models_dir, accelerator.device, _weight_dtype(precision),
                                lambda f, m: log.emit("message", 0, 0, text=m))
    if stop is not None and stop.is_set():  # pressed while the model loaded
        return RunResult("stopped", 0, run_dir, [], "stopped while loading the model; nothing trained yet")
    groups = model.add_network()
    sampler = _caption_sampler(config, concept_tags)
    latent_cache, text_cache, note = _caches(config, model, sampler, cache_dir)
    if note:
        log.emit("message", 0, 0, text=note)

    # 4. Optimizer and LR schedule; the trained modules go through accelerate (DDP when distributed).
    optimizer, scheduler = _optimizer_and_schedule(config, groups, plan)
    prepared = accelerator.prepare(*model.trainable_modules(), optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    if config.torch_compile:
        import torch

        unet = torch.compile(unet)  # compiled at the first step; the run log says how long it took
    model.use_prepared(list(prepared[1:-1]))
    trainable = [p for g in groups for p in g["params"]]

    # 5. Resume exactly where a saved state left off, or start fresh; the caches filled.
    step, losses = _resume(run_dir, config, model, optimizer, scheduler, log) if resume else (
        0, deque(maxlen=SMOOTHING_WINDOW))
    builder = BatchBuilder(model, config, sampler, latent_cache, text_cache)
    try:
        _fill_caches(data.train + data.validation, latent_cache, text_cache, sampler, config, log, stop, main)
    except _Stopped:
        return RunResult("stopped", step, run_dir, [], "stopped while caching; nothing trained yet")
    model.park_frozen(text=text_cache is not None, vae=latent_cache is not None)
    saver = Saver(config, model, run_dir, data, plan, source, optimizer, scheduler, main)
    if data.validation and step == 0 and config.validate_every_n_steps:
        log.emit("validation", 0, 0, loss=validation_loss(model, config, data.validation, builder))

    # 6. The loop: one optimizer step = gradient_accumulation_steps micro-batches.
    one_step = OptimizerStep(config, model, data, plan, plan_batches, builder, accelerator, unet, optimizer, trainable)
    clock = StepClock(step, config.torch_compile)
    status, message = "done", ""
    while step < plan.total_steps:
        loss_value = one_step(step)
        scheduler.step()
        step += 1
        epoch = (step * plan.micro_per_step - 1) // plan.batches_per_epoch
        if not math.isfinite(loss_value):
            status, message = "failed", _nonfinite_message(loss_value, step, saver.last_step)
            log.emit("message", step, epoch, text=message)
            break
        losses.append(loss_value)
        rate = clock.tick(step, plan.total_steps, log, epoch)
        if step % config.log_every_n_steps == 0 or step == plan.total_steps:
            log.emit("step", step, epoch, loss=loss_value, smoothed=sum(losses) / len(losses),
                     lr=scheduler.get_last_lr()[0], it_s=rate,
                     eta_s=(plan.total_steps - step) / rate if rate else None, peak_vram_gb=_peak_vram())
        if data.validation and config.validate_every_n_steps and step % config.validate_every_n_steps == 0:
            log.emit("validation", step, epoch, loss=validation_loss(model, config, data.validation, builder))
        if config.sample_prompts and config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
            saver.samples(step, epoch, log, stop)
        epoch_end = (step * plan.micro_per_step) % plan.batches_per_epoch < plan.micro_per_step
        stopping = (stop is not None and stop.is_set()) or (stop_after is not None and step >= stop_after)
        if stopping or saver.due(step, epoch_end) or step == plan.total_steps:
            saver.save(step, epoch, losses, log, final=step == plan.total_steps)
            if config.evaluate_every_save and not stopping:
                saver.evaluate(step, epoch, log, models_dir, stop, world)
        if stopping and step < plan.total_steps:
            status, message = "stopped", f"stopped at step {step}; resume continues from here"
            break

    # 7. The end: the final samples, every process's network checksum, what was saved.
    if status == "done":
        if config.sample_prompts and saver.sampled_at != step:  # not twice for the last step
            saver.samples(step, epoch, log, stop)
        message = f"done: {step} steps"
    if world > 1:
        _log_checksums(accelerator, trainable, step, log)
    log.emit("message", step, 0, text=message, status=status)
    log.close()
    accelerator.wait_for_everyone()
    return RunResult(status, step, run_dir, saver.loras(), message)


def _data(config: TrainConfig, models_dir: Path, run_dir: Path, world: int, main: bool, log: EventLog):
    """The run's samples (buckets, repeats, held-out images), its concepts (written to
    RUN/concepts.json) and their tags that the caption sampler keeps, and the batch plan."""
    from studio.dataset.concepts import known_character_tags, run_concepts, write_run_concepts

    character_tags = frozenset(known_character_tags(models_dir))
    data = collect_samples(config, character_tags)
    concepts = run_concepts(config, character_tags)
    if main:
        write_run_concepts(run_dir, concepts)
    for warning in data.warnings:
        log.emit("message", 0, 0, text=warning)
    plan_batches = BatchPlan(data.train, config.train_batch_size * world, config.seed, keep_partial=world == 1)
    plan = make_plan(config, plan_batches.batches_per_epoch)
    log.emit("message", 0, 0, text=f"{data.images} images, {len(data.train)} samples with repeats and resolutions, "
             f"{plan.batches_per_epoch} batches per epoch, {plan.total_steps} steps", plan=plan.__dict__)
    return data, _concept_tags(concepts, data, character_tags), plan_batches, plan


def _resume(run_dir: Path, config: TrainConfig, model, optimizer, scheduler, log: EventLog):
    """The step and recent losses of the last saved state, its network, optimizer and schedule
    loaded; the run log cut back to that step."""
    states = list_states(run_dir)
    if not states:
        raise StudioError(f"{run_dir} has no saved training state to resume from")
    check_resumable(states[-1], config.resume_fingerprint())
    state, network = load_state(states[-1], optimizer, scheduler)
    model.load_network_state(network)
    log.truncate_after(state.step)
    log.emit("message", state.step, state.epoch, text=f"resumed at step {state.step}")
    return state.step, deque(state.losses, maxlen=SMOOTHING_WINDOW)


class OptimizerStep:
    """One optimizer step: `gradient_accumulation_steps` micro-batches of the global batch (this
    process's share of each when distributed). Returns the step's loss, averaged over processes."""

    def __init__(self, config, model, data, plan, plan_batches, builder, accelerator, unet, optimizer, trainable):
        self.config, self.model, self.data, self.plan, self.plan_batches = config, model, data, plan, plan_batches
        self.builder, self.accelerator, self.unet, self.optimizer = builder, accelerator, unet, optimizer
        self.trainable = trainable

    def __call__(self, step: int) -> float:
        config, plan, accelerator = self.config, self.plan, self.accelerator
        batch, world, rank = config.train_batch_size, accelerator.num_processes, accelerator.process_index
        losses = []
        for micro in range(step * plan.micro_per_step, (step + 1) * plan.micro_per_step):
            epoch, index = divmod(micro, plan.batches_per_epoch)
            global_batch = self.plan_batches.epoch(epoch)[index]
            local = global_batch[rank * batch:(rank + 1) * batch] if world > 1 else global_batch
            positions = range(rank * batch, rank * batch + len(local)) if world > 1 else range(len(local))
            samples = [self.data.train[i] for i in local]
            inputs = self.builder.build(samples, [seed_for(config.seed, micro, p) for p in positions])
            with accelerator.accumulate(self.unet):
                loss = diffusion_loss(self.model, config, inputs, unet=self.unet)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            # the loss of the whole global batch, averaged over processes
            losses.append(float(accelerator.reduce(loss.detach(), "mean") if world > 1 else loss.detach()))
        return sum(losses) / len(losses)


class StepClock:
    """Steps per second since the run (or the resume) began, and with torch.compile the seconds of
    the first two steps (the compile, then an ordinary step) in the run log once."""

    def __init__(self, start_step: int, compiling: bool):
        self.started, self.start_step, self.compiling = time.monotonic(), start_step, compiling
        self.compile_times: list[float] = []

    def tick(self, step: int, total_steps: int, log: EventLog, epoch: int) -> float:
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        if self.compiling and done in (1, 2):
            times = self.compile_times
            times.append(elapsed - sum(times))
            if len(times) == 2 or step == total_steps:
                after = f"; the next step took {times[1]:.1f} s" if len(times) == 2 else ""
                log.emit("message", step, epoch, text=f"torch.compile warm-up: the first step took "
                         f"{times[0]:.1f} s (compiling){after}", compile_seconds=times[0])
        return done / elapsed if elapsed > 0 else 0.0


def _nonfinite_message(loss_value: float, step: int, last_saved: int) -> str:
    if last_saved:
        return (f"the loss became {loss_value} at step {step}; stopped. The last good checkpoint "
                f"(step {last_saved}) is kept. Lower the learning rate or use fp32/bf16.")
    return (f"the loss became {loss_value} at step {step}; stopped before any checkpoint was saved. "
            "Lower the learning rate or use fp32/bf16.")


def _log_checksums(accelerator, trainable, step: int, log: EventLog) -> None:
    """Every process must hold the same network: each one's checksum, in the run log."""
    import torch

    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in trainable)], device=accelerator.device)
    sums = [float(v) for v in accelerator.gather(checksum).tolist()]
    log.emit("message", step, 0, text=f"network checksum per process: {sums}", checksums=sums)


def _peak_vram() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None


LYCORIS_PRESETS = {"attention": "attn-only", "attention_ff": "attn-mlp", "all": "full"}  # LyCORIS' preset names


class Saver:
    """Checkpoints (LoRA files + full training state), samples, and keeping the last K."""

    def __init__(self, config, model, run_dir, data, plan, source, optimizer, scheduler, main):
        self.config, self.model, self.run_dir, self.data, self.plan = config, model, run_dir, data, plan
        self.source, self.optimizer, self.scheduler, self.main = source, optimizer, scheduler, main
        self.last_step = 0
        self.sampled_at: int | None = None  # the step whose samples were made last

    def due(self, step: int, epoch_end: bool) -> bool:
        config = self.config
        return bool((config.save_every_n_steps and step % config.save_every_n_steps == 0)
                    or (config.save_every_n_epochs and epoch_end
                        and ((step * self.plan.micro_per_step) // self.plan.batches_per_epoch)
                        % config.save_every_n_epochs == 0))

    def lora_name(self, step: int, final: bool) -> str:
        return self.config.output_name if final else f"{self.config.output_name}-step{step:08d}"

    def save(self, step: int, epoch: int, losses, log: EventLog, final: bool) -> None:
        if not self.main:
            return
        name = self.lora_name(step, final)
        folder = self.run_dir / "loras"
        path = self.model.export_kohya(folder / f"{name}.safetensors", self.metadata(step, epoch, name))
        if self.config.save_diffusers_format or path is None:
            self.model.export_diffusers(self.run_dir / "diffusers", name)
        state = TrainingState(step, step * self.plan.micro_per_step, epoch, self.config.resume_fingerprint(),
                              list(losses))
        save_state(self.run_dir, state, self.model.network_state(), self.optimizer, self.scheduler)
        prune_states(self.run_dir, self.config.save_last_n)
        self._prune_loras(folder)
        self.last_step = step
        log.emit("checkpoint", step, epoch, path=str(path) if path else "", state_step=step)

    def _prune_loras(self, folder: Path) -> None:
        steps = sorted(folder.glob(f"{self.config.output_name}-step*.safetensors"))
        for old in steps[:-self.config.save_last_n]:
            old.unlink(missing_ok=True)

    def evaluate(self, step: int, epoch: int, log: EventLog, models_dir: Path, stop: threading.Event | None,
                 world: int) -> None:
        """evaluate_every_save: the checkpoint just saved, on this model (studio.evaluation.in_training).
        A failed evaluation is reported and training goes on; Stop ends it and the run stops as usual."""
        if not self.main:
            return
        name = f"{self.lora_name(step, step == self.plan.total_steps)}.safetensors"
        path = self.run_dir / "loras" / name
        if world > 1 or not path.is_file():
            why = ("it runs in one process: evaluate after training (python -m studio evaluate RUN)" if world > 1
                   else f"it needs a kohya LoRA file, and {self.config.network_type} is saved in peft's layout")
            log.emit("message", step, epoch, text=f"no evaluation at step {step}: {why}")
            return
        from studio.evaluation.in_training import evaluate_saved
        from studio.evaluation.report import verdict_lines

        shown = []

        def report(fraction, message):  # each image set once, for the job's status; not in events.jsonl
            stage = (message or "").split(" · ")[0]
            if log.on_event is not None and stage and stage not in shown:
                shown.append(stage)
                log.on_event(TrainEvent("message", step, epoch, {"text": f"evaluating {stage}"}))

        try:
            result = evaluate_saved(self.model, self.source, self.run_dir, path, models_dir, report=report, stop=stop)
        except StudioError as exc:
            log.emit("message", step, epoch, text=f"evaluation of {name} failed: {exc}")
            return
        if result.stopped:
            log.emit("message", step, epoch, text=f"evaluation of {name} stopped")
            return
        entry = next(c for c in result.data["checkpoints"] if c["file"] == name)
        log.emit("message", step, epoch, text=f"evaluated {name}: " + "; ".join(verdict_lines(result.data)[:2]),
                 evaluation={"file": name, "scores": {concept: {k: v[k] for k in ("fidelity", "bleed", "flexibility")}
                                                      for concept, v in entry["scores"].items()}})

    def loras(self) -> list[Path]:
        folder = self.run_dir / "loras"
        return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []

    def metadata(self, step: int, epoch: int, name: str) -> dict[str, str]:
        from studio.models.lora_format import kohya_metadata

        config = self.config
        args = {"algo": config.network_type, "target": config.network_target}
        module = self.model.metadata_kwargs()
        if config.network_type == "dora":  # labelled as LyCORIS labels DoRA: sd-scripts' networks.lora drops dora_scale
            module["network_module"] = "lycoris.kohya"
            args = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True",  # per output row, as peft
                    "preset": LYCORIS_PRESETS[config.network_target]}
        width = config.resolutions[0]
        return kohya_metadata(
            output_name=name, network_dim=config.network_dim, network_alpha=config.network_alpha,
            network_args=args, base_model_name=config.pretrained_model, learning_rate=config.learning_rate,
            unet_lr=config.unet_lr, text_encoder_lr=config.text_encoder_lr if config.train_text_encoder else None,
            optimizer=config.optimizer_type, lr_scheduler=config.lr_scheduler, max_train_steps=self.plan.total_steps,
            steps=step, epoch=epoch + 1, num_epochs=math.ceil(self.plan.total_steps / self.plan.steps_per_epoch),
            resolution=(width, width), tag_frequency=self.data.tag_frequency, **module,
        )

    def samples(self, step: int, epoch: int, log: EventLog, stop: threading.Event | None = None) -> None:
        """Sample images from the model being trained; Stop ends the sampling at its next step
        (no samples are kept for that step) and the run then stops as usual."""
        if not self.main:
            return
        from studio.generation.infotext import format_infotext, write_png

        self.sampled_at = step
        config = self.config
        try:
            images = self.model.sample_images(config.sample_prompts, "", config.sample_seed, config.sample_steps,
                                              tuple(config.sample_size), config.sample_cfg, stop=stop)
        except JobStopped:
            log.emit("message", step, epoch, text=f"sampling at step {step} stopped")
            return
        paths = []
        for i, (prompt, image) in enumerate(zip(config.sample_prompts, images)):
            text = format_infotext(prompt, "", {"Steps": config.sample_steps, "Sampler": self.model.SAMPLE_SAMPLER,
                                                "CFG scale": config.sample_cfg, "Seed": config.sample_seed + i,
                                                "Size": f"{image.width}x{image.height}",
                                                "Model": self.source.name, "Training step": step})
            paths.append(str(write_png(image, self.run_dir / "samples" / f"step{step:06d}-{i}.png", text)))
        log.emit("sample", step, epoch, paths=paths)
