"""Evaluation at each save (TrainConfig.evaluate_every_save), in the training process, on the
trainer's own model: the network in memory is the checkpoint just saved, so its images are drawn
with the model being trained (as the run's samples are); the base model's set, made once, is drawn
with the network's adapters switched off, which gives the base model exactly. The tagger is loaded
through a model manager of the training process and unloaded after each evaluation, so it holds
no memory while training goes on.

Same prompts, seeds, sizes and tagger as an evaluation started afterwards with the default
settings (`python -m studio evaluate RUN`, the Train tab), so that one finds these checkpoints done.
Stop (the run's stop event) ends it at the next denoising step; a failing evaluation is reported
in the run log and training goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from studio.evaluation.run import (
    Checkpoint,
    EvaluationConfig,
    EvaluationResult,
    Progress,
    default_tagger,
    evaluate_sets,
    image_settings,
    list_checkpoints,
    run_concepts,
    tag_with,
)


@contextmanager
def adapters_disabled(pipe) -> Iterator[None]:
    """The pipeline's peft adapters off for the block (the base model's output), then back exactly
    as they were, trainable flags included."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for component in pipe.components.values() if isinstance(component, torch.nn.Module)
              for module in component.modules() if isinstance(module, BaseTunerLayer)]
    before = [(layer, layer.disable_adapters, [(p, p.requires_grad) for p in layer.parameters()]) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled, grads in before:
            layer.enable_adapters(not disabled)
            for param, flag in grads:
                param.requires_grad_(flag)


class TrainingImages:
    """Images from the model being trained (its sample_images), one seed at a time."""

    def __init__(self, model, settings: dict):
        self.model, self.settings = model, settings

    def use(self, checkpoint: Checkpoint | None) -> AbstractContextManager:
        return adapters_disabled(self.model.pipe) if checkpoint is None else nullcontext()

    def make(self, prompt: str, negative: str, seeds: list[int], progress: Progress) -> list:
        s = self.settings
        pictures = []
        for seed in seeds:
            pictures += self.model.sample_images([prompt], negative, seed, s["steps"], (s["width"], s["height"]),
                                                 s["cfg_scale"], stop=progress.stop)
            progress.advance(s["steps"])
        return pictures


def evaluate_saved(model, source, run_dir: Path, lora: Path, models_dir: Path, *,
                   report: Callable[[float | None, str], None] | None = None,
                   stop: threading.Event | None = None) -> EvaluationResult:
    """Evaluate the checkpoint just saved at `lora` (the model's current network) with the default
    settings; the base model's set is made the first time."""
    from studio.models.manager import ModelManager

    config = EvaluationConfig()
    concepts = run_concepts(run_dir)
    tagger = default_tagger(source)
    settings = image_settings(config, source, tagger, concepts)
    checkpoint = next((c for c in list_checkpoints(run_dir) if c.file == Path(lora).name), None)
    if checkpoint is None:
        from studio.errors import StudioError

        raise StudioError(f"{Path(lora).name} is not in {run_dir / 'loras'}")
    manager = ModelManager(models_dir)
    tagger_source = manager.resolve(tagger, family="tagger")
    try:
        with manager.use(manager.get(tagger_source)) as loaded:
            return evaluate_sets(run_dir, settings, config.bounds, [checkpoint], TrainingImages(model, settings),
                                 tag_with(loaded, settings, stop), report=report, stop=stop)
    finally:
        manager.unload(tagger_source)
