"""Captioning a dataset: tags from a WD tagger under the dataset's tag rules, then optional
natural-language captions grounded on those tags. One validated CaptionConfig in, a report out;
the Caption tab and `python -m studio caption` both call `caption_dataset`."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.captioning.nl_caption import DEFAULT_NL_TEMPLATE
from studio.captioning.tag_rules import TagRules
from studio.captioning.tagger import DEFAULT_TAGGER
from studio.errors import DatasetError, JobStopped
from studio.models.manager import ModelManager

Report = Callable[[float | None, str], None]
OPENAI_PREFIX = "openai:"


class NLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = "none"  # "none", a transformers VLM (hub id or folder), or "openai:URL#MODEL"
    template: str = DEFAULT_NL_TEMPLATE
    existing: Literal["skip", "overwrite"] = "skip"
    concurrency: int = Field(4, ge=1, le=64)
    api_key: str = ""

    @field_validator("backend")
    @classmethod
    def _backend_form(cls, value: str) -> str:
        value = value.strip() or "none"
        if value.startswith(OPENAI_PREFIX) and "#" not in value:
            raise ValueError("an OpenAI-compatible backend is written openai:URL#MODEL, e.g. "
                             "openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct")
        return value


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1)
    tags: bool = True  # run the tagger; False = NL captions only, grounded on the existing tags
    tagger: str = DEFAULT_TAGGER
    general_threshold: float = Field(0.35, gt=0.0, lt=1.0)
    character_threshold: float = Field(0.85, gt=0.0, lt=1.0)
    mcut: bool = False
    batch_size: int = Field(8, ge=1, le=256)
    existing: Literal["skip", "append", "prepend", "overwrite"] = "skip"
    rules: TagRules = TagRules()
    nl: NLSettings = NLSettings()


@dataclass
class CaptionRunReport:
    images: int = 0
    tagged: list[str] = field(default_factory=list)  # rel paths whose tag file was written
    kept: list[str] = field(default_factory=list)  # rel paths left alone (already captioned)
    nl_written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.images} images", f"{len(self.tagged)} tagged", f"{len(self.kept)} already captioned"]
        if self.nl_written:
            parts.append(f"{len(self.nl_written)} NL captions")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts) + (" (stopped)" if self.stopped else "") + f" in {self.seconds:.1f}s"


class Rate:
    """n/N, images/s and ETA for progress lines."""

    def __init__(self, total: int):
        self.total, self.start = total, time.monotonic()

    def line(self, done: int, what: str) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        return f"{what} {done}/{self.total} · {rate:.1f} images/s · ETA {eta:.0f}s"


def caption_dataset(
    manager: ModelManager,
    config: CaptionConfig,
    *,
    report: Report | None = None,
    stop: threading.Event | None = None,
    dataset=None,
    gpu_calls: GpuCalls | None = None,
) -> CaptionRunReport:
    """Caption `config.dataset`. Pass the app's shared Dataset object of that folder as `dataset` so
    the job's writes share its lock and undo history with the editor. With `gpu_calls` (ZeroGPU),
    the GPU work runs as one call per batch of images, and everything else here."""
    from studio.dataset.dataset import Dataset

    report = report or (lambda fraction, message: None)
    started = time.monotonic()

    # 1. The dataset: every problem file is reported, the good ones are captioned.
    if dataset is None:
        dataset = Dataset.open(Path(config.dataset))
    else:
        dataset.scan()
    scan = dataset.report
    run = CaptionRunReport(images=len(dataset.items))
    run.skipped += [(p.path.name, p.reason) for p in scan.problems if p.severity == "skip"]
    run.warnings += [(p.path.name, p.reason) for p in scan.problems if p.severity != "skip"]
    if not dataset.items:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in run.skipped[:5])
        raise DatasetError(f"{config.dataset} holds no usable images" + (f" ({reasons})" if reasons else ""))
    weight = 0.5 if config.tags and config.nl.backend != "none" else 1.0
    groundings: dict[str, object] = {}
    try:
        # 2. Tags, written batch by batch (each batch one undoable edit).
        if config.tags:
            groundings = tag_dataset(manager, dataset, config, run, _scaled(report, 0.0, weight), stop, gpu_calls)
        # 3. Natural-language captions grounded on the tags.
        if config.nl.backend != "none" and not run.stopped:
            describe_dataset(manager, dataset, config, run, groundings, _scaled(report, 1 - weight, weight), stop,
                             gpu_calls)
    finally:
        run.seconds = time.monotonic() - started
    report(1.0, run.summary())
    return run


def _scaled(report: Report, start: float, span: float) -> Report:
    """A stage's progress (0..1) mapped onto its share of the whole run; None stays None."""
    return lambda fraction, message: report(None if fraction is None else start + fraction * span, message)


def _thresholds(config: CaptionConfig):
    from studio.captioning.tagger import TagThresholds

    return TagThresholds(general=config.general_threshold, character=config.character_threshold,
                         general_mcut=config.mcut, character_mcut=config.mcut)


@dataclass(frozen=True)
class GpuCalls:
    """GPU work as separate calls, each over one batch of images (ZeroGPU: studio.spaces_gpu).
    `tag(tagger, image paths, thresholds, batch_size)` -> [(index in the batch, TagResult | TagError)];
    `describe(backend, NLItems, template, existing)` -> the NL caption result of that batch."""

    tag: Callable[..., list]
    tag_batch: int
    describe: Callable[..., Any]
    describe_batch: int


def _tag_in_calls(calls: GpuCalls, tagger: str, images: list, config: CaptionConfig,
                  stop: threading.Event | None) -> Iterator[tuple[int, Any]]:
    """tag_images' (index, result) stream, made of one GPU call per batch; Stop between batches."""
    for start in range(0, len(images), calls.tag_batch):
        if stop is not None and stop.is_set():
            return
        batch = [str(image) for image in images[start:start + calls.tag_batch]]
        for index, result in calls.tag(tagger, batch, _thresholds(config), config.batch_size):
            yield start + index, result


def tag_dataset(manager, dataset, config: CaptionConfig, run: CaptionRunReport, report: Report,
                stop: threading.Event | None, gpu_calls: GpuCalls | None = None) -> dict:
    """Tag the images that need it; returns each tagged image's grounding for NL captions."""
    from studio.captioning.nl_caption import Grounding
    from studio.captioning.tag_rules import build_caption, caption_parts, merge_existing
    from studio.captioning.tagger import TagError

    items = dataset.items
    todo = [item for item in items if config.existing != "skip" or not item.has_tags]
    run.kept += [item.rel for item in items if config.existing == "skip" and item.has_tags]
    groundings = {}
    if not todo:
        return groundings
    rate = Rate(len(todo))
    source = manager.resolve(config.tagger, family="tagger")
    record = manager.get(source, progress=report)  # on ZeroGPU too: downloads happen outside GPU calls
    pending: dict[str, list[str]] = {}
    images = [item.image for item in todo]
    try:
        # with GPU calls the tagger runs in them, not here: this process only downloads it
        in_process = manager.use(record) if gpu_calls is None else nullcontext()
        with manager.gpu_lane("captioning"), in_process as tagger:
            if gpu_calls is not None:
                results = _tag_in_calls(gpu_calls, config.tagger, images, config, stop)
            else:
                results = tagger.tag_images(images, batch_size=config.batch_size, thresholds=_thresholds(config),
                                            stop=stop)
            for index, result in results:
                item = todo[index]
                if isinstance(result, TagError):
                    run.skipped.append((item.rel, result.reason))
                    continue
                tags = build_caption(result, config.rules)
                merged = merge_existing(dataset.read_tags(item) if item.has_tags else [], tags, config.existing,
                                        trigger=config.rules.trigger)
                groundings[item.rel] = Grounding.from_parts(caption_parts(result, config.rules))
                if merged is not None:
                    pending[item.rel] = merged
                if len(pending) >= config.batch_size:
                    _flush(dataset, pending, run)
                report((index + 1) / len(todo), rate.line(index + 1, "tagging"))
            _flush(dataset, pending, run)
            run.stopped = bool(stop and stop.is_set())
    finally:
        manager.unload(source)  # free the GPU for what comes next (training, generation)
    return groundings


def _flush(dataset, pending: dict[str, list[str]], run: CaptionRunReport) -> None:
    if pending:
        dataset.write_many_tags(dict(pending), f"tagger captions for {len(pending)} images")
        run.tagged += list(pending)
        pending.clear()


def nl_backend(manager: ModelManager, settings: NLSettings, report: Report):
    """The NL captioner: an OpenAI-compatible server, or a VLM held by the model manager."""
    from studio.captioning.nl_caption import OpenAICompatibleBackend

    if settings.backend.startswith(OPENAI_PREFIX):
        url, _, model = settings.backend.removeprefix(OPENAI_PREFIX).rpartition("#")
        return OpenAICompatibleBackend(url, model, api_key=settings.api_key, concurrency=settings.concurrency), None
    source = manager.resolve(settings.backend, family="vlm")
    return manager.get(source, progress=report).model, source


def _describe_in_calls(calls: GpuCalls, backend: str, items: list, config: CaptionConfig, stop, progress):
    """caption_images over one GPU call per batch of images; Stop between batches."""
    from studio.captioning.nl_caption import NLReport

    total = NLReport()
    for start in range(0, len(items), calls.describe_batch):
        if stop is not None and stop.is_set():
            total.stopped = True
            break
        part = calls.describe(backend, items[start:start + calls.describe_batch], config.nl.template,
                              config.nl.existing)
        total.merge(part)
        progress(min(start + calls.describe_batch, len(items)), len(items))
    return total


def describe_dataset(manager, dataset, config: CaptionConfig, run: CaptionRunReport, groundings: dict,
                     report: Report, stop: threading.Event | None, gpu_calls: GpuCalls | None = None) -> None:
    from studio.captioning.nl_caption import Grounding, NLItem, caption_images

    rules = config.rules
    ignore = [rules.trigger, *rules.quality] if rules.trigger else list(rules.quality)
    items = []
    for item in dataset.items:
        grounding = groundings.get(item.rel) or Grounding.from_tags(
            dataset.read_tags(item), characters=rules.character_series, series=rules.series, ignore=ignore)
        items.append(NLItem(item.image, grounding))
    rate = Rate(len(items))
    backend, source = nl_backend(manager, config.nl, report)
    try:
        progress = lambda done, total: report(done / max(total, 1), rate.line(done, "describing"))  # noqa: E731
        with manager.gpu_lane("captioning"):
            if gpu_calls is not None and source is not None:  # a VLM on the GPU, not a server
                result = _describe_in_calls(gpu_calls, config.nl.backend, items, config, stop, progress)
            else:
                result = caption_images(items, backend, config.nl.template, config.nl.existing, stop=stop,
                                        progress=progress)
    finally:
        if source is not None:
            manager.unload(source)
    root = dataset.root
    run.nl_written += [path.relative_to(root).as_posix() for path in result.written]
    run.skipped += [(Path(image).relative_to(root).as_posix(), reason) for image, reason in result.errors.items()]
    run.stopped = run.stopped or result.stopped


def raise_if_stopped(run: CaptionRunReport) -> CaptionRunReport:
    """For job runners: a stopped run shows as stopped (what was written is kept)."""
    if run.stopped:
        raise JobStopped(f"captioning stopped: {run.summary()}")
    return run
