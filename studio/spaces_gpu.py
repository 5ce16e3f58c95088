"""GPU entry points for Hugging Face ZeroGPU, decorated with `spaces.GPU` when this module is
imported, so that they exist when the app starts (at launch `spaces` reports the decorated
functions to ZeroGPU; a Space with none is treated as broken).

How ZeroGPU runs them (the `spaces` package's rules): each call gets a GPU for a `duration`
computed from its arguments, inside a worker process forked from the app. Arguments, yields and
results cross that boundary pickled, so only plain values do: configs, paths, strings, lists of
results. The model manager never crosses: `bind()` records it in this module before the first call,
the fork inherits it (with the models the app loaded into RAM at startup), and the worker moves
them to its GPU (ModelManager.after_fork). Progress streams out as yields; Stop reaches the worker
when the app closes the stream (`spaces` then closes the worker's generator at its next yield).

Off ZeroGPU `spaces.GPU` returns each function unchanged and the app calls the engine directly;
nothing here is used. Import `spaces` (this module) before anything initialises CUDA.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import spaces

from studio.errors import JobStopped, StudioError

# ZeroGPU refuses a call that asks for more than this (seconds); ask for no more.
MAX_DURATION = 300
MIN_DURATION = 5
MEGAPIXEL = 1024 * 1024
# Seconds per sampling step for one ~1-megapixel image on ZeroGPU's half-H200, by model family
# (SDXL with CFG: two UNet passes), and the fixed cost of a call (moving the model in, VAE decode).
SECONDS_PER_STEP = {"sdxl": 0.12, "anima": 0.25}
CALL_OVERHEAD = 6
# Tagging: one GPU call per batch of this many images; about 40 images/s on the GPU after decoding.
TAG_BATCH = 64
SECONDS_PER_TAGGED_IMAGE = 0.1
# NL captions from a VLM held by the manager: one GPU call per batch of this many images.
DESCRIBE_BATCH = 8
SECONDS_PER_DESCRIBED_IMAGE = 6.0

_engine: dict[str, Any] = {}  # "manager": the app's ModelManager; "pid": the process it is set up for


def bind(manager) -> None:
    """Record the app's model manager for the GPU worker (call before the first GPU call)."""
    _engine.update(manager=manager, pid=os.getpid())


def _manager():
    """The manager, made ready for this process: in a freshly forked worker, once."""
    manager = _engine.get("manager")
    if manager is None:
        raise StudioError("the GPU functions were called before the app bound its model manager")
    if _engine.get("pid") != os.getpid():
        manager.after_fork()
        _engine["pid"] = os.getpid()
    return manager


def clamp_duration(seconds: float) -> int:
    return int(min(MAX_DURATION, max(MIN_DURATION, round(seconds))))


# -- generation ----------------------------------------------------------------------------------
def generation_seconds(config, family: str = "sdxl") -> float:
    """Estimated GPU seconds for one GenerateConfig: steps x images x megapixels, plus hires."""
    images = config.batch_size * config.batch_count
    per_step = SECONDS_PER_STEP.get(family, SECONDS_PER_STEP["anima"])
    pixels = config.width * config.height / MEGAPIXEL
    seconds = config.steps * images * per_step * max(pixels, 0.25)
    if config.hires is not None:
        hires_pixels = pixels * config.hires.scale**2
        seconds += config.hires.steps * images * per_step * hires_pixels**1.3  # attention grows faster
    return CALL_OVERHEAD + seconds


def generate_duration(config, outputs_dir: str, default_model: str, family: str = "sdxl") -> int:
    return clamp_duration(generation_seconds(config, family))


@spaces.GPU(duration=generate_duration)
def generate_stream(config, outputs_dir: str, default_model: str, family: str = "sdxl") -> Iterator[tuple]:
    """One generation (a GenerateConfig) on the GPU: yields ("progress", fraction, message) per step,
    then ("result", GenerateResult) or ("error", message)."""
    from studio.generation.generate import generate

    def work(report, stop):
        return generate(_manager(), config, outputs_dir=Path(outputs_dir), default_model=default_model,
                        report=report, stop=stop)

    yield from stream(work)


def generate_in_call(manager, config, *, outputs_dir: Path, default_model: str, report=None, stop=None):
    """generate()'s signature, run as one ZeroGPU call: the model is resolved and loaded into RAM
    here, outside the call (downloads must not spend GPU time), then sampled in the call."""
    report = report or (lambda fraction, message: None)
    source = manager.resolve(config.model or default_model, vae=config.vae or None)
    manager.get(source, progress=report)
    events = generate_stream(config, str(outputs_dir), default_model, source.family)
    return consume(events, report, stop)


# -- captioning ------------------------------------------------------------------------------------
def tag_duration(tagger: str, images: list[str], thresholds, batch_size: int) -> int:
    return clamp_duration(CALL_OVERHEAD + len(images) * SECONDS_PER_TAGGED_IMAGE)


@spaces.GPU(duration=tag_duration)
def tag_batch(tagger: str, images: list[str], thresholds, batch_size: int) -> list[tuple[int, Any]]:
    """Tag one batch of image files on the GPU: [(index, TagResult | TagError)]."""
    manager = _manager()
    record = manager.get(manager.resolve(tagger, family="tagger"))
    with manager.use(record) as model:
        return list(model.tag_images(images, batch_size=batch_size, thresholds=thresholds))


def describe_duration(backend: str, items: list, template: str, existing: str) -> int:
    return clamp_duration(CALL_OVERHEAD + len(items) * SECONDS_PER_DESCRIBED_IMAGE)


@spaces.GPU(duration=describe_duration)
def describe_batch(backend: str, items: list, template: str, existing: str):
    """Natural-language captions for one batch of NLItems from a VLM the manager holds; the
    caption files are written as in-process runs write them. Returns the NL caption result."""
    from studio.captioning.nl_caption import caption_images

    manager = _manager()
    record = manager.get(manager.resolve(backend, family="vlm"))
    with manager.use(record) as model:
        return caption_images(items, model, template, existing)


def caption_calls():
    """The captioning GPU work as one call per batch (studio.captioning.run.GpuCalls)."""
    from studio.captioning.run import GpuCalls

    return GpuCalls(tag=tag_batch, tag_batch=TAG_BATCH, describe=describe_batch, describe_batch=DESCRIBE_BATCH)


# -- both sides of a stream ------------------------------------------------------------------------
Work = Callable[[Callable[[float | None, str], None], threading.Event], Any]


def stream(work: Work) -> Iterator[tuple]:
    """Run `work(report, stop)` in a thread and yield its reports as they come, then its outcome.
    Closing the stream (Stop, from the other side of the process boundary) stops the work at
    its next step. Errors travel as messages: `spaces` would pass on only their class name."""
    events: queue.Queue[tuple] = queue.Queue()
    stop = threading.Event()

    def run():
        try:
            events.put(("result", work(lambda fraction, message: events.put(("progress", fraction, message)), stop)))
        except JobStopped as exc:
            events.put(("stopped", str(exc)))
        except StudioError as exc:
            events.put(("error", str(exc)))
        except Exception as exc:  # a bug: the message, not the worker's traceback, reaches the user
            events.put(("error", f"{exc.__class__.__name__}: {exc}"))

    thread = threading.Thread(target=run, name="gpu-stream", daemon=True)
    thread.start()
    try:
        while True:
            event = events.get()
            yield event
            if event[0] != "progress":
                return
    finally:
        stop.set()
        thread.join()


def consume(events: Iterator[tuple], report: Callable[[float | None, str], None],
            stop: threading.Event | None) -> Any:
    """The app's side of a stream: pass progress on, close the stream when Stop is pressed, return
    the result or raise the error as a StudioError."""
    outcome: list = []
    try:
        for kind, *payload in events:
            if kind == "progress":
                report(*payload)
                if stop is not None and stop.is_set():
                    raise JobStopped("stopped")
            elif kind == "result":
                outcome = payload  # read on to the stream's end, so the worker ends its call cleanly
            elif kind == "stopped":
                raise JobStopped(payload[0])
            else:
                raise StudioError(payload[0])
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    if not outcome:
        raise StudioError("the GPU call ended without a result")
    return outcome[0]
