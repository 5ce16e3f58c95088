"""The checkpoint evaluation of a training run: the fixed prompt set (prompts.py) with fixed seeds on
the base model and on each checkpoint in RUN/loras, every image tagged with the WD tagger and
scored (scoring.py). What it writes, in RUN/evaluation/:

- `evaluation.json` (atomically, after each finished image set, so a stopped evaluation keeps every
  set it finished): {"config" (what made the images), "bounds", "base" {"scores", "images"},
  "checkpoints" [{"file", "step", "version", "scores", "images"}], "recommended", "not_learned",
  "notes"}; each image record names its prompt, seed, PNG file and tags;
- `images/base/`, `images/<checkpoint>/`: the PNGs, with A1111 infotext (they reproduce in Generate).

An evaluation made with the same config continues: the base model's set and the checkpoints done
(same file size and time) are skipped; other bounds only re-score. Another config starts over, and
the earlier evaluation is moved to RUN/evaluation-previous/ (one generation is kept).

`evaluate()` runs it in the app or the CLI: it holds the manager's GPU lane, loads the run's base
model and the tagger through the manager and applies each checkpoint as a LoRA (its file, as
Generate would). During training (studio.evaluation.in_training) the same loop runs on the
trainer's own model. Stop ends it at the next denoising step.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.errors import ConfigError, JobStopped, StudioError
from studio.evaluation.prompts import PROMPT_SET_VERSION, EvalPrompt, prompt_set
from studio.evaluation.scoring import Bounds, against_base, base_scores, concept_scores, verdict
from studio.fileio import atomic_write_text

Report = Callable[[float | None, str], None]

EVALUATION_DIR = "evaluation"
EVALUATION_FILE = "evaluation.json"
PREVIOUS_DIR = "evaluation-previous"  # an evaluation made with other settings, moved aside by a new one
FORMAT_VERSION = 1
BASE = "base"
MAX_CHECKPOINTS = 64
MAX_IMAGES_PER_SET = 1300  # prompts x seeds on one model: one seed always fits (200 concepts, 1203 prompts)
MAX_SEEDS = 8
# Image settings when the config leaves them out: the model's own recommended ones (the catalog's),
# else its family's; the demo models' tiny random weights make noise at any size, so the smallest.
FAMILY_SETTINGS = {
    "sdxl": {"width": 832, "height": 1216, "steps": 28, "cfg_scale": 6.0, "sampler": "Euler a"},
    "anima": {"width": 1024, "height": 1024, "steps": 30, "cfg_scale": 4.5, "sampler": "Euler"},
}
DEMO_SETTINGS = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0}
_STEP_IN_NAME = re.compile(r"-step(\d+)$")


class EvaluationConfig(BaseModel):
    """What to evaluate and how. Sizes, steps and CFG left out come from the run's base model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoints: list[str] = Field([], max_length=MAX_CHECKPOINTS)  # file names in RUN/loras; [] = all
    seeds: int = Field(2, ge=1, le=MAX_SEEDS)  # images per prompt
    seed: int = Field(1000, ge=0, le=2**32 - 1 - MAX_SEEDS)  # the first; the others follow it
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    steps: int | None = Field(None, ge=1, le=100)
    cfg_scale: float | None = Field(None, ge=0.0, le=30.0)
    lora_weight: float = Field(1.0, gt=0.0, le=2.0)
    tagger: str = ""  # "" = the app's tagger (the demo tagger for demo models)
    general_threshold: float = Field(0.35, gt=0.0, lt=1.0)
    character_threshold: float = Field(0.85, gt=0.0, lt=1.0)
    max_bleed: float = Field(0.25, ge=0.0, le=1.0)
    min_flexibility: float = Field(0.5, ge=0.0, le=1.0)
    min_fidelity: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (try {round(value / 8) * 8})")
        return value

    @field_validator("checkpoints")
    @classmethod
    def _file_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name \
                    or name.startswith(".") or len(name) > 255:
                raise ValueError(f"{str(name)[:80]!r} is not a checkpoint's file name: name a .safetensors file of "
                                 "the run's loras/ folder, without a path")
        return list(dict.fromkeys(value))

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.max_bleed, self.min_flexibility, self.min_fidelity)


# -- the run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    file: str
    path: Path
    step: int
    version: tuple[int, int]  # (size, mtime_ns): a file saved again is evaluated again


def checkpoint_step(path: Path) -> int:
    """The training step a LoRA file was saved at: in its name (`-step00000100`), else its metadata."""
    match = _STEP_IN_NAME.search(path.stem)
    if match:
        return int(match.group(1))
    from studio.models.lora_format import read_safetensors_header

    try:
        return int(read_safetensors_header(path).get("__metadata__", {}).get("ss_steps", 0))
    except (StudioError, ValueError, TypeError):
        return 0


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The run's LoRA files in RUN/loras, by step (the final file, at the last step, last)."""
    folder = Path(run_dir) / "loras"
    found = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()
        found.append(Checkpoint(path.name, path, checkpoint_step(path), (stat.st_size, stat.st_mtime_ns)))
    return sorted(found, key=lambda c: (c.step, "-step" not in c.path.stem, c.file))


def chosen_checkpoints(run_dir: Path, names: Sequence[str], allowed: Callable[[Path], bool]) -> list[Checkpoint]:
    """The checkpoints asked for (all when none is named), each a file inside what `allowed` admits."""
    available = list_checkpoints(run_dir)
    if not available:
        raise ConfigError(f"{Path(run_dir).name} has no checkpoint in loras/ yet: train until it saves one")
    by_name = {c.file: c for c in available}
    missing = [n for n in names if n not in by_name]
    if missing:
        listed = ", ".join(list(by_name)[:8])
        raise ConfigError(f"{Path(run_dir).name} has no checkpoint {missing[0]!r} in loras/ (it has: {listed})")
    chosen = [by_name[n] for n in names] if names else available
    for checkpoint in chosen:
        if not allowed(checkpoint.path):
            raise ConfigError(f"{checkpoint.file} is not usable: a checkpoint must be a file of the run's loras/ "
                              "folder, not a link out of the workspace")
    return sorted(chosen, key=lambda c: (c.step, c.file))


def run_concepts(run_dir: Path) -> list[dict]:
    """The concepts the run trained (RUN/concepts.json), as the evaluation names them."""
    from studio.dataset.concepts import read_run_concepts

    rows = read_run_concepts(Path(run_dir))
    if not rows:
        raise ConfigError(f"{Path(run_dir).name} has no concepts.json (a run made before concepts existed): "
                          "train it again, or evaluate a newer run")
    return [{"name": str(r["name"]), "triggers": [str(t) for t in r.get("triggers") or []],
             "core_tags": [str(t) for t in r.get("core_tags") or []]} for r in rows]


def evaluation_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVALUATION_DIR


def read_evaluation(run_dir: Path) -> dict | None:
    """RUN/evaluation/evaluation.json, or None when the run was never evaluated."""
    path = evaluation_dir(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudioError(f"{path} is not readable JSON ({exc}); delete it to evaluate again") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise StudioError(f"{path} is not an evaluation the studio wrote; delete it to evaluate again")
    return data


# -- what makes the images ----------------------------------------------------------------------------
def image_settings(config: EvaluationConfig, source, tagger: str, concepts: list[dict]) -> dict:
    """Everything that decides the images and their tags: an evaluation with equal settings continues."""
    defaults = {**FAMILY_SETTINGS.get(source.family, FAMILY_SETTINGS["sdxl"]),
                **{k: v for k, v in (source.defaults or {}).items() if k in ("width", "height", "steps", "cfg_scale")},
                **(DEMO_SETTINGS if source.demo else {})}
    chosen = {k: getattr(config, k) if getattr(config, k) is not None else defaults[k]
              for k in ("width", "height", "steps", "cfg_scale")}
    if source.family == "anima" and (chosen["width"] % 16 or chosen["height"] % 16):
        raise ConfigError(f"Anima needs sides divisible by 16; {chosen['width']}x{chosen['height']} is not")
    settings = {
        "format": FORMAT_VERSION, "prompt_set": PROMPT_SET_VERSION, "model": source.name, "family": source.family,
        **chosen, "sampler": defaults["sampler"], "seeds": [config.seed + i for i in range(config.seeds)],
        "lora_weight": config.lora_weight, "tagger": tagger, "general_threshold": config.general_threshold,
        "character_threshold": config.character_threshold, "concepts": concepts,
    }
    images = len(prompt_set(concepts)) * config.seeds
    if images > MAX_IMAGES_PER_SET:
        raise ConfigError(f"{len(concepts)} concept(s) x their prompts x {config.seeds} seed(s) make {images} images "
                          f"per checkpoint; the limit is {MAX_IMAGES_PER_SET}: use fewer seeds")
    return settings


def default_tagger(source, app_demo: bool = False) -> str:
    """The tagger the app captions with: the demo tagger in demo mode or for a demo model."""
    from studio.captioning.tagger import DEFAULT_TAGGER, DEMO_TAGGER

    return DEMO_TAGGER if app_demo or source.demo else DEFAULT_TAGGER


class ImageMaker(Protocol):
    """Makes a set's images: `use(checkpoint)` applies a checkpoint (None: the base model) for the
    block; `make` draws one prompt at each seed, calling `progress.step()` per denoising step
    (or `progress.advance(n)` per image)."""

    def use(self, checkpoint: Checkpoint | None) -> AbstractContextManager: ...

    def make(self, prompt: str, negative: str, seeds: list[int], progress: Progress) -> list: ...


Tag = Callable[[list[Path]], list[list[str]]]  # image files -> the tags of each (caption form)


class Progress:
    """Denoising steps over the whole evaluation as one fraction; raises JobStopped once Stop is set
    (the runners call `step()` after every denoising step)."""

    def __init__(self, total: int, report: Report, stop: threading.Event | None):
        self.total, self.report, self.stop = max(total, 1), report, stop
        self.done, self.label = 0, ""

    def step(self) -> None:
        self.advance(1)

    def advance(self, steps: int) -> None:
        self.done += steps
        self.report(min(self.done / self.total, 1.0), self.label)
        self.check()

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobStopped("evaluation stopped")


@dataclass
class EvaluationResult:
    path: Path  # evaluation.json
    data: dict
    evaluated: list[str] = field(default_factory=list)  # checkpoints evaluated by this call
    skipped: list[str] = field(default_factory=list)  # already evaluated with the same settings
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)


# -- the loop -----------------------------------------------------------------------------------------
def evaluate_sets(run_dir: Path, settings: dict, bounds: Bounds, checkpoints: Sequence[Checkpoint],
                  maker: ImageMaker, tag: Tag, *, report: Report | None = None,
                  stop: threading.Event | None = None) -> EvaluationResult:
    """The base model's set (once per settings) and each checkpoint's that is not done yet: images,
    tags, scores, and evaluation.json rewritten after each set. Stop keeps the finished sets."""
    from studio.generation.prompt import builder_for
    from studio.schemas import PromptStyle

    report = report or (lambda fraction, message: None)
    folder = evaluation_dir(run_dir)
    data = _continued(folder, settings)
    result = EvaluationResult(folder / EVALUATION_FILE, data)
    done = {(c["file"], tuple(c.get("version") or ())) for c in data["checkpoints"]}
    todo = [c for c in checkpoints if (c.file, c.version) not in done]
    result.skipped = [c.file for c in checkpoints if (c.file, c.version) in done]
    sets: list[Checkpoint | None] = ([None] if data.get("base") is None else []) + todo
    prompts = prompt_set(settings["concepts"])
    builder = builder_for(settings["family"])
    built = {p.text: builder.build(p.text, "", PromptStyle()) for p in prompts}
    progress = Progress(len(sets) * len(prompts) * len(settings["seeds"]) * settings["steps"], report, stop)
    try:
        for number, checkpoint in enumerate(sets, 1):
            name = BASE if checkpoint is None else checkpoint.file
            progress.check()
            images = _make_set(folder, name, checkpoint, prompts, built, settings, maker, progress,
                               f"{number}/{len(sets)} {name}")
            report(None, f"tagging the images of {name}")
            for record, tags in zip(images, tag([folder / r["file"] for r in images])):
                record["tags"] = tags
            _add_set(data, settings, checkpoint, images)
            data["bounds"] = bounds.to_json()
            _write(result.path, _with_verdict(data, bounds, run_dir))
            if checkpoint is not None:
                result.evaluated.append(checkpoint.file)
    except JobStopped:
        result.stopped = True
    result.data = _with_verdict(data, bounds, run_dir)
    if not result.stopped or result.path.is_file():
        _write(result.path, result.data)
    return result


def _continued(folder: Path, settings: dict) -> dict:
    """The evaluation so far when it was made with these settings, else a fresh one."""
    import shutil

    previous = read_evaluation(folder.parent) if (folder / EVALUATION_FILE).is_file() else None
    if previous is not None and previous.get("config") == settings:
        return previous
    if previous is not None:  # made with other settings: kept aside (one generation), not mixed in
        aside = folder.with_name(PREVIOUS_DIR)
        if aside.is_symlink() or aside.is_file():
            aside.unlink()
        elif aside.is_dir():
            shutil.rmtree(aside)
        folder.rename(aside)
    images = folder / "images"
    if images.is_symlink():
        images.unlink()
    elif images.is_dir():  # what an attempt stopped before its first set left
        shutil.rmtree(images)
    return {"config": settings, "bounds": None, "base": None, "checkpoints": [], "recommended": None,
            "not_learned": [], "notes": []}


def _slug(text: str | None) -> str:
    return re.sub(r"[^\w.-]+", "_", text or "free").strip("_")[:40] or "concept"


def _make_set(folder: Path, name: str, checkpoint: Checkpoint | None, prompts: list[EvalPrompt], built: dict,
              settings: dict, maker: ImageMaker, progress: Progress, label: str) -> list[dict]:
    """One model's images (the base model's, or a checkpoint's), written as PNGs with infotext."""
    from studio.generation.infotext import format_infotext, lora_tags, write_png

    target = folder / "images" / (BASE if checkpoint is None else Path(name).stem)
    if target.is_symlink():  # only ever a real folder of the run
        target.unlink()
    for old in target.glob("*.png") if target.is_dir() else []:  # an unfinished earlier attempt
        old.unlink()
    lora = lora_tags([(checkpoint.path.stem, settings["lora_weight"])]) if checkpoint is not None else ""
    records = []
    with maker.use(checkpoint):
        for index, prompt in enumerate(prompts):
            full, negative = built[prompt.text]
            progress.label = f"{label} · prompt {index + 1}/{len(prompts)}"
            pictures = maker.make(full, negative, list(settings["seeds"]), progress)
            for seed, picture in zip(settings["seeds"], pictures):
                text = format_infotext(full + lora, negative, {
                    "Steps": settings["steps"], "Sampler": settings["sampler"], "CFG scale": settings["cfg_scale"],
                    "Seed": seed, "Size": f"{settings['width']}x{settings['height']}", "Model": settings["model"]})
                path = write_png(picture, target / f"{index:03d}-{_slug(prompt.concept)}-{prompt.kind}-s{seed}.png",
                                 text)
                records.append({**prompt.to_json(), "seed": seed, "file": path.relative_to(folder).as_posix()})
    return records


def _add_set(data: dict, settings: dict, checkpoint: Checkpoint | None, images: list[dict]) -> None:
    concepts = settings["concepts"]
    if checkpoint is None:
        data["base"] = {"scores": base_scores(concepts, images), "images": images}
        for entry in data["checkpoints"]:  # the reference changed: bleed against it again
            entry["scores"] = against_base(concept_scores(concepts, entry["images"]), data["base"]["scores"])
        return
    scores = against_base(concept_scores(concepts, images), data["base"]["scores"])
    entry = {"file": checkpoint.file, "step": checkpoint.step, "version": list(checkpoint.version),
             "scores": scores, "images": images}
    data["checkpoints"] = sorted([c for c in data["checkpoints"] if c["file"] != checkpoint.file] + [entry],
                                 key=lambda c: (c["step"], c["file"]))


def _with_verdict(data: dict, bounds: Bounds, run_dir: Path) -> dict:
    """`data` with the recommendation, the concepts that did not learn and the notes, for these
    bounds; checkpoints whose file is gone (pruned since) are marked and never recommended."""
    loras = Path(run_dir) / "loras"
    for entry in data["checkpoints"]:
        entry["missing"] = not (loras / entry["file"]).is_file()
    base = (data.get("base") or {}).get("scores")
    result = verdict(data["checkpoints"], base, bounds)
    step = next((c["step"] for c in data["checkpoints"] if c["file"] == result.recommended), None)
    return {**data, "bounds": bounds.to_json(), "recommended": result.recommended, "recommended_step": step,
            "not_learned": result.not_learned, "notes": result.notes,
            "updated": datetime.now(UTC).isoformat(timespec="seconds")}


def _write(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def rescore(run_dir: Path, bounds: Bounds) -> dict | None:
    """An evaluation's verdict for other bounds, written back (no image is made)."""
    data = read_evaluation(run_dir)
    if data is None:
        return None
    data = _with_verdict(data, bounds, run_dir)
    _write(evaluation_dir(run_dir) / EVALUATION_FILE, data)
    return data


# -- in the app and the CLI: the manager's models ---------------------------------------------------------
class PipelineImages:
    """Images from a pipeline the manager holds, each checkpoint applied as Generate applies a LoRA."""

    def __init__(self, manager, record, settings: dict):
        from studio.generation.generate import config_for_family, runner_for
        from studio.schemas import GenerateConfig

        self.runner = runner_for(record, manager)
        config = GenerateConfig(prompt="evaluation", width=settings["width"], height=settings["height"],
                                steps=settings["steps"], cfg_scale=settings["cfg_scale"])
        self.config = config_for_family(config, record.source.family)
        self.weight = settings["lora_weight"]
        self.warnings: list[str] = []

    def use(self, checkpoint: Checkpoint | None) -> AbstractContextManager:
        from contextlib import nullcontext

        from studio.schemas import LoraSpec

        specs = [] if checkpoint is None else [LoraSpec(path=str(checkpoint.path), weight=self.weight)]
        self.warnings += self.runner.apply_loras(specs)
        return nullcontext()

    def make(self, prompt: str, negative: str, seeds: list[int], progress: Progress) -> list:
        conditioning = self.runner.encode(prompt, negative)
        pictures = []
        for seed in seeds:  # one at a time: each image is the one Generate makes with its seed
            pictures += self.runner.run_with_oom_retry(
                lambda seed=seed: self.runner.txt2img(self.config, conditioning, [seed], progress), self.warnings)
        return pictures


def tag_with(tagger, settings: dict, stop: threading.Event | None = None) -> Tag:
    """A Tag function over a loaded Tagger at the evaluation's thresholds."""
    from studio.captioning.tagger import TagError, TagThresholds

    thresholds = TagThresholds(general=settings["general_threshold"], character=settings["character_threshold"])

    def tag(paths: list[Path]) -> list[list[str]]:
        found: dict[int, list[str]] = {}
        for index, result in tagger.tag_images(paths, batch_size=8, thresholds=thresholds):
            found[index] = [] if isinstance(result, TagError) else list(result.tags)
        if stop is not None and stop.is_set():
            raise JobStopped("evaluation stopped")
        return [found.get(i, []) for i in range(len(paths))]

    return tag


def evaluate(manager, run_dir: Path, config: EvaluationConfig, *, resolver, default_tagger_name: str = "",
             report: Report | None = None, stop: threading.Event | None = None) -> EvaluationResult:
    """Evaluate a run's checkpoints with the manager's models (the app's Evaluate, /evaluate and
    `python -m studio evaluate`). `resolver` (studio.paths.Resolver) admits the run's model, the
    tagger and the files; `default_tagger_name` is the app's tagger ("" = by the model: the demo
    tagger for a demo model)."""
    from studio.captioning.tagger import DEMO_TAGGER, KNOWN_TAGGERS
    from studio.training.runs import read_run_config

    report = report or (lambda fraction, message: None)
    run_dir = Path(run_dir)

    # 1. The run: its config, concepts and checkpoints; every path inside what the resolver admits.
    run_config = read_run_config(run_dir)
    concepts = run_concepts(run_dir)
    folder = evaluation_dir(run_dir)
    if not resolver.owner and (folder.is_symlink() or (folder.exists() and not resolver.allowed(folder))):
        raise ConfigError(f"{folder} is a link out of the workspace: the evaluation writes only inside the run")
    # a request's checkpoints are files of the run, never links; the command line's may be anything
    checkpoints = chosen_checkpoints(run_dir, config.checkpoints,
                                     lambda path: resolver.owner or (not path.is_symlink() and resolver.allowed(path)))
    model = resolver.model(run_config.pretrained_model, manager.catalog, "base model")
    vae = resolver.model(run_config.vae, (), "VAE") or None
    source = manager.resolve(model, vae=vae)
    tagger = resolver.model(config.tagger or default_tagger_name or default_tagger(source), {*KNOWN_TAGGERS, DEMO_TAGGER},
                            "tagger")
    settings = image_settings(config, source, tagger, concepts)

    # 2. The models, under the GPU lane for the whole evaluation; the tagger is unloaded after.
    tagger_source = manager.resolve(tagger, family="tagger")
    with manager.gpu_lane(f"evaluation of {run_dir.name}"):
        record = manager.get(source, progress=report)
        tagger_record = manager.get(tagger_source, progress=report)
        maker = None
        try:
            with manager.use(record), manager.use(tagger_record) as loaded_tagger:
                maker = PipelineImages(manager, record, settings)
                result = evaluate_sets(run_dir, settings, config.bounds, checkpoints, maker,
                                       tag_with(loaded_tagger, settings, stop), report=report, stop=stop)
        finally:
            if maker is not None:
                maker.runner.apply_loras([])  # the base model again, for whatever runs next
            manager.unload(tagger_source)
    result.warnings += list(dict.fromkeys(maker.warnings))
    return result
