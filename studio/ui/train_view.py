"""What the Train tab shows, tested without a browser: the dataset summary (the engine's own
samples, buckets and batch plan, nothing re-counted here), the run folders, and a run's events as
a status line, plot frames, a samples gallery and a checkpoint list. No gradio."""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from studio.fileio import atomic_path
from studio.paths import Resolver
from studio.training.config import TrainConfig

# -- the dataset summary ---------------------------------------------------------------------------
REFERENCE_SECONDS = 0.8  # one 1024x1024 image through an SDXL LoRA step on a 24 GB GPU, roughly


@dataclass
class DataSummary:
    images: int
    held_out: int
    repeats: list[int]
    samples_per_epoch: int  # with repeats, at every resolution
    buckets: pd.DataFrame
    batches_per_epoch: int
    steps_per_epoch: float
    total_steps: int
    seconds: float
    basis: str  # what the time estimate rests on
    warnings: list[str] = field(default_factory=list)
    concepts: list[tuple[str, int, float]] = field(default_factory=list)  # (name, images, share of an epoch)

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def summarize(config: TrainConfig, runs_dir: Path | None = None, models_dir: Path | None = None) -> DataSummary:
    """Images, repeats, buckets, steps per epoch and total steps as the trainer will see them, and
    each concept's share of an epoch (with balance_concepts, after balancing)."""
    from studio.dataset.concepts import known_character_tags
    from studio.training.data import BatchPlan, collect_samples
    from studio.training.loop import make_plan

    characters = frozenset(known_character_tags(models_dir))
    report = collect_samples(config, characters)
    plan = make_plan(config, BatchPlan(report.train, config.train_batch_size, config.seed).batches_per_epoch)
    images, weighted = Counter(), Counter()
    for sample in report.train:
        images[sample.bucket_key] += 1
        weighted[sample.bucket_key] += sample.repeats
    buckets = pd.DataFrame([(r, f"{w}x{h}", images[(r, w, h)], weighted[(r, w, h)]) for r, w, h in sorted(images)],
                           columns=["resolution", "bucket", "images", "with repeats"])
    seconds, basis = estimate_seconds(config, plan.total_steps, runs_dir)
    return DataSummary(report.images, len({s.image for s in report.validation}),
                       sorted({s.repeats for s in report.train}), sum(weighted.values()), buckets,
                       plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps, seconds, basis,
                       [w for w in report.warnings if ": concepts balanced: " not in w],
                       concept_shares(config, report, characters))


def concept_shares(config: TrainConfig, report, character_tags) -> list[tuple[str, int, float]]:
    """(concept, images, share of the epoch's samples) over the run's datasets, as trained."""
    from studio.dataset.concepts import dataset_concepts
    from studio.dataset.dataset import Dataset

    repeats = {s.image: s.repeats for s in report.train}
    total = sum(repeats.values())
    rows = []
    for source in config.datasets:
        dataset = Dataset.open(Path(source.path))
        for concept in dataset_concepts(dataset, character_tags=character_tags).concepts:
            images = [dataset.root / rel for rel in concept.images]
            samples = sum(repeats.get(path, 0) for path in images)
            rows.append((concept.name, len(images), samples / total if total else 0.0))
    return rows


def _work_per_step(config: TrainConfig) -> float:
    """Images per optimizer step, in 1024x1024 units."""
    area = sum(r * r for r in config.resolutions) / len(config.resolutions) / 1024**2
    return config.train_batch_size * config.gradient_accumulation_steps * area


def estimate_seconds(config: TrainConfig, total_steps: int, runs_dir: Path | None) -> tuple[float, str]:
    """Training time (steps only, not loading or caching): the rate measured by the latest run of
    the same model here, scaled to this batch and resolution; a rule of thumb otherwise."""
    for run in list_runs(runs_dir)[:5] if runs_dir else []:
        step = last_event(run, "step")
        try:
            previous = TrainConfig.model_validate(tomllib.loads((run / "config.toml").read_text()))
        except (OSError, ValueError):
            continue
        if step and step.get("it_s") and previous.pretrained_model == config.pretrained_model:
            per_unit = 1 / step["it_s"] / _work_per_step(previous)
            return total_steps * _work_per_step(config) * per_unit, f"at the speed of run {run.name}"
    return (total_steps * _work_per_step(config) * REFERENCE_SECONDS,
            (f"on a 24 GB GPU by a rule of thumb ({REFERENCE_SECONDS} s per 1024² image); the first run of this "
            "model here measures the real speed"))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return "under 1s"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def summary_markdown(summary: DataSummary, config: TrainConfig) -> str:
    held = f" ({summary.held_out} held out for validation)" if summary.held_out else ""
    repeats = "×" + "/".join(str(r) for r in summary.repeats)
    resolutions = ", ".join(f"{r}px" for r in config.resolutions)
    accumulation = config.gradient_accumulation_steps
    lines = [
        (f"**{summary.images + summary.held_out} images**{held} · repeats {repeats} · "
         f"**{summary.samples_per_epoch} samples per epoch** at {resolutions} in {len(summary.buckets)} bucket(s)"),
        (f"{summary.batches_per_epoch} batches of {config.train_batch_size} per epoch"
         + (f" ÷ {accumulation} accumulated" if accumulation > 1 else "")
         + f" = **{summary.steps_per_epoch:g} steps per epoch** · **{summary.total_steps} steps** in all "
         f"({summary.epochs:.1f} epochs)"),
        (f"Estimated training time: **{'' if summary.seconds < 1 else '~'}{duration(summary.seconds)}** "
         f"({summary.basis}; model loading and "
         "caching come on top)"),
    ]
    if summary.concepts:
        lines.append("Concepts (share of an epoch): " + " · ".join(
            f"{name} {images} img **{share:.0%}**" for name, images, share in summary.concepts[:12])
            + (f" · and {len(summary.concepts) - 12} more" if len(summary.concepts) > 12 else ""))
    lines += [f"⚠ {w}" for w in summary.warnings[:5]]
    if len(summary.warnings) > 5:
        lines.append(f"⚠ ... and {len(summary.warnings) - 5} more")
    return "  \n".join(lines)


# -- run folders ------------------------------------------------------------------------------------
def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders, the one whose config was written last first (a resumed run rewrites it)."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if (p / "config.toml").is_file()]
    return sorted(runs, key=lambda p: (p / "config.toml").stat().st_mtime_ns, reverse=True)


def run_folder(runs_dir: Path, name: str | None) -> Path:
    """A run of runs_dir by name (a request's value: through the Resolver)."""
    return Resolver(runs_dir.parent).run(name, runs_dir)


def last_event(run_dir: Path, kind: str) -> dict | None:
    """The last event of a kind, from the end of events.jsonl (which may be long)."""
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 65536))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        if f'"kind": "{kind}"' in line:
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def checkpoints(run_dir: Path) -> list[tuple[str, str]]:
    """(label, file name) of the run's kohya LoRA files, by step; the final file last."""
    folder = run_dir / "loras"
    files = sorted(folder.glob("*.safetensors"), key=lambda p: ("-step" not in p.stem, p.name)) \
        if folder.is_dir() else []
    return [(f"step {int(p.stem.rsplit('-step', 1)[1])} · {p.name}" if "-step" in p.stem else f"final · {p.name}",
             p.name) for p in files]


def publish_checkpoint(path: Path, run_name: str, loras_dir: Path) -> Path:
    """Copy a run's LoRA into workspace/loras as <run>-<file>, atomically, never overwriting a
    different file (the same file again is found, not copied twice)."""
    import filecmp

    target = loras_dir / f"{run_name}-{path.name}"
    number = 1
    while target.exists():
        if filecmp.cmp(target, path, shallow=False):
            return target
        target = loras_dir / f"{run_name}-{path.stem} ({number}){path.suffix}"
        number += 1
    with atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)
    return target


# -- a run's events as the tab shows them ----------------------------------------------------------
SERIES_COLORS = {"raw": "#a5b4fc", "smoothed": "#4338ca", "validation": "#ea580c"}
MAX_POINTS = 1500  # per series: a long run's curve is thinned, not truncated


def _thin(rows: list[dict]) -> list[dict]:
    stride = -(-len(rows) // MAX_POINTS)
    return rows if stride <= 1 else rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


def loss_frame(events: list[dict]) -> pd.DataFrame:
    """step, loss, series (raw, smoothed, validation). The browser's plot fixes its axis types and
    its set of series at the first frame it gets, so every frame is typed and holds all three series
    (a series without points yet gets one empty (NaN) point)."""
    steps = _thin([e for e in events if e["kind"] == "step"])
    rows = [(e["step"], e["loss"], "raw") for e in steps] + [(e["step"], e["smoothed"], "smoothed") for e in steps]
    rows += [(e["step"], e["loss"], "validation") for e in events if e["kind"] == "validation"]
    first = min((row[0] for row in rows), default=0)
    rows += [(first, math.nan, name) for name in SERIES_COLORS if name not in {row[2] for row in rows}]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float, "series": str})


def lr_frame(events: list[dict]) -> pd.DataFrame:
    steps = _thin([e for e in events if e["kind"] == "step"])
    frame = pd.DataFrame([(e["step"], e["lr"]) for e in steps], columns=["step", "learning rate"])
    return frame.astype({"step": int, "learning rate": float})


def sample_entries(events: list[dict]) -> list[tuple[str, str]]:
    """(image, "step N") for every sample still on disk, newest first."""
    entries = []
    for event in reversed([e for e in events if e["kind"] == "sample"]):
        paths = event.get("paths") or []
        for i, path in enumerate(paths):
            if Path(path).is_file():
                entries.append((path, f"step {event['step']}" + (f" · prompt {i + 1}" if len(paths) > 1 else "")))
    return entries


def progress(events: list[dict]) -> dict:
    """Where a run stands: step, total, the last loss and rate, and how it ended (if it did)."""
    out: dict = {"step": 0, "total_steps": None, "loss": None, "smoothed": None, "it_s": None, "eta_s": None,
                 "ended": None, "message": ""}
    for event in events:
        if event.get("plan"):
            out["total_steps"] = event["plan"]["total_steps"]
        if event["kind"] == "step":
            out.update(step=event["step"], loss=event["loss"], smoothed=event["smoothed"], it_s=event.get("it_s"),
                       eta_s=event.get("eta_s"))
        elif event["kind"] == "message":
            out["message"] = event.get("text", "")
    if events and events[-1]["kind"] == "message":  # a run ends on a message with its status
        out["ended"] = events[-1].get("status")
    return out


def status_line(events: list[dict], job_state: str | None, job_message: str = "", job_error: str | None = None) -> str:
    """One line for a run: `job_state` is the training job's state when it is this run's job."""
    now = progress(events)
    where = f"step {now['step']}/{now['total_steps'] or '?'}"
    if job_state == "failed":
        return f"**Failed** at {where}: {job_error or now['message']}"
    if job_state == "stopping":
        return f"**Stopping** after {where} (saving a checkpoint)..."
    if job_state in ("queued", "running"):
        if not now["step"]:
            return f"**Starting**: {job_message or 'loading'}..."
        parts = [f"**Training** · {where}", f"loss {now['loss']:.4f} (smoothed {now['smoothed']:.4f})"]
        if now["it_s"]:
            parts.append(f"{now['it_s']:.2f} it/s")
        if now["eta_s"] is not None:
            parts.append(f"ETA {duration(now['eta_s'])}")
        return " · ".join(parts)
    if now["ended"] == "done":
        return f"**Done**: {now['step']} steps. Pick a checkpoint below to use it in Generate."
    if now["ended"] == "stopped" or job_state == "stopped":
        return f"**Stopped** at {where}: a checkpoint was saved; Resume continues from it."
    if now["ended"] == "failed":
        return f"**Failed** at {where}: {now['message']}"
    if not events:
        return "No events yet."
    return f"**Not running** (at {where}); Resume continues from its last checkpoint."
