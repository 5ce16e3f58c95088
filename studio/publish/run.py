"""The run a publish reads: its config.toml, the chosen checkpoint and its ss_* metadata, the samples
made at that checkpoint's step, concepts.json and evaluation/evaluation.json (read defensively: a
malformed row is left out and named in the notes)."""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from studio.errors import ConfigError
from studio.fileio import inside
from studio.paths import Resolver

MAX_SAMPLES = 16
MAX_CONCEPTS = 500
MAX_TRIGGERS = 16
GENERIC_TAGS = frozenset(("1girl", "1boy", "1other", "2girls", "2boys", "multiple girls", "multiple boys", "solo",
                          "masterpiece", "best quality", "newest", "safe", "general", "absurdres", "highres"))


@dataclass
class Concept:
    name: str
    triggers: list[str]
    core_tags: list[str] = field(default_factory=list)
    images: int | None = None


@dataclass
class EvalRow:
    checkpoint: str  # the file's stem
    concept: str
    fidelity: float | None
    bleed: float | None
    flexibility: float | None


@dataclass
class Evaluation:
    rows: list[EvalRow]
    recommended: str | None  # a checkpoint stem
    not_learned: list[str]


@dataclass
class Sample:
    path: Path
    prompt: str
    negative: str
    infotext: str


@dataclass
class RunSummary:
    run_dir: Path
    settings: dict  # config.toml over the TrainConfig defaults
    checkpoint: Path
    metadata: dict[str, str]
    step: int | None
    epoch: int | None
    family: str  # "sdxl" or "anima"
    concepts: list[Concept]
    triggers: list[str]
    evaluation: Evaluation | None
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: Path, checkpoint: str, resolver: Resolver) -> RunSummary:
    from studio.training.runs import CONFIG_FILE, read_toml, train_defaults

    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a training run folder (no {CONFIG_FILE})")
    settings = {**train_defaults(), **read_toml(run_dir / CONFIG_FILE)}
    notes: list[str] = []
    evaluation = read_evaluation(run_dir, notes)
    path = choose_checkpoint(run_dir, checkpoint, resolver, evaluation)
    metadata = safetensors_metadata(path)
    step = _int(metadata.get("ss_steps")) or _step_of(path)
    concepts = read_concepts(run_dir, notes)
    triggers = _unique([t for c in concepts for t in c.triggers]) or fallback_triggers(settings, metadata, resolver)
    family = "anima" if "anima" in (metadata.get("modelspec.architecture", "") + metadata.get(
        "ss_base_model_version", "")).lower() else "sdxl"
    return RunSummary(run_dir, settings, path, metadata, step, _int(metadata.get("ss_epoch")), family, concepts,
                      triggers[:MAX_TRIGGERS], evaluation, samples_for(run_dir, step, notes), notes)


def _int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _step_of(path: Path) -> int | None:
    match = re.search(r"-step(\d+)$", path.stem)
    return int(match.group(1)) if match else None


def _unique(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def choose_checkpoint(run_dir: Path, value: str, resolver: Resolver, evaluation: Evaluation | None) -> Path:
    """A file of RUN/loras by name (a request may name no other), or any path on the command line.
    None named: the checkpoint the evaluation recommends, else the final one, else the last saved."""
    loras = run_dir / "loras"
    files = sorted(loras.glob("*.safetensors")) if loras.is_dir() else []
    if not value.strip():
        if not files:
            raise ConfigError(f"{run_dir.name} has no checkpoint in loras/ yet: train it (or wait for a save) first")
        wanted = evaluation.recommended if evaluation else None
        final = [f for f in files if _step_of(f) is None]
        return next((f for f in files if f.stem == wanted), None) or (final or sorted(files, key=_step_of))[-1]
    path = Path(resolver.file(value, [loras], "checkpoint"))
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"checkpoint {value!r}: only .safetensors files are published")
    if not path.is_file():
        names = ", ".join(f.name for f in files) or "none yet"
        raise ConfigError(f"there is no checkpoint {value!r} in {loras} (it has: {names})")
    if not (resolver.owner or inside(path, run_dir)):
        raise ConfigError(f"checkpoint {value!r} is not a file of this run: name one of {loras}")
    return path


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors header (read without loading a tensor)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= length <= 100 * 1024 * 1024:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{path.name} is not a readable .safetensors file ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return []
    return _unique(str(v).strip() for v in value if isinstance(v, str | int | float))


def _json(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc}); the card leaves it out")
        return None


def read_concepts(run_dir: Path, notes: list[str]) -> list[Concept]:
    """RUN/concepts.json: a list of {"name", "triggers", "core_tags", "images"} (or {"concepts": [...]})."""
    data = _json(run_dir / "concepts.json", notes)
    rows = data.get("concepts") if isinstance(data, dict) else data
    if data is not None and not isinstance(rows, list):
        notes.append("concepts.json is not a list of concepts; the card leaves it out")
    concepts, skipped = [], 0
    for row in rows[:MAX_CONCEPTS] if isinstance(rows, list) else []:
        name = row.get("name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name.strip():
            skipped += 1
            continue
        concepts.append(Concept(name.strip(), _strings(row.get("triggers"))[:MAX_TRIGGERS],
                                _strings(row.get("core_tags")), _int(row.get("images"))))
    if skipped:
        notes.append(f"concepts.json: {skipped} row(s) without a name were left out")
    return concepts


def _metric(value) -> float | None:
    """A score: a number, or the worst (largest) of several (bleed onto each other concept)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        numbers = [v for v in (_metric(v) for v in value) if v is not None]
        return max(numbers) if numbers else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _eval_rows(data) -> list[tuple[str, str, dict]]:
    """(checkpoint, concept, metrics) from the shapes an evaluation may take: studio.evaluation's
    {"checkpoints": [{"file", "scores": {concept: metrics}}]} (or "checkpoint"/"name" and "concepts"
    as a dict or a list), {"checkpoints": {ckpt: {concept: metrics}}}, {"rows": [{"checkpoint",
    "concept", ...}]}, or {"<ckpt>.safetensors": {concept: metrics}} at the top."""
    flat = data.get("rows") or data.get("results") or data.get("table")
    if isinstance(flat, list):
        return [(str(r.get("checkpoint")), str(r.get("concept")), r) for r in flat
                if isinstance(r, dict) and r.get("checkpoint") and r.get("concept")]
    table = data.get("checkpoints", {k: v for k, v in data.items() if str(k).endswith(".safetensors")})
    if isinstance(table, list):  # studio.evaluation writes [{"file", "step", "scores": {concept: {...}}, ...}]
        table = {str(e.get("file") or e.get("checkpoint") or e.get("name")): e.get("scores", e.get("concepts", {}))
                 for e in table if isinstance(e, dict)}
    rows = []
    for ckpt, concepts in table.items() if isinstance(table, dict) else []:
        if isinstance(concepts, list):
            concepts = {str(c.get("concept") or c.get("name")): c for c in concepts if isinstance(c, dict)}
        for concept, metrics in concepts.items() if isinstance(concepts, dict) else []:
            if isinstance(metrics, dict):
                rows.append((ckpt, concept, metrics))
    return rows


def read_evaluation(run_dir: Path, notes: list[str]) -> Evaluation | None:
    """RUN/evaluation/evaluation.json: scores per checkpoint x concept, "recommended", "not_learned"."""
    data = _json(run_dir / "evaluation" / "evaluation.json", notes)
    if not isinstance(data, dict):
        if data is not None:
            notes.append("evaluation.json is not an object; the card says the checkpoint was not evaluated")
        return None
    rows = [EvalRow(Path(ckpt).stem, concept, _metric(m.get("fidelity")), _metric(m.get("bleed")),
                    _metric(m.get("flexibility"))) for ckpt, concept, m in _eval_rows(data)]
    recommended = data.get("recommended")
    if isinstance(recommended, dict):
        recommended = recommended.get("checkpoint") or recommended.get("name")
    not_learned = data.get("not_learned")
    return Evaluation(rows, Path(recommended).stem if isinstance(recommended, str) and recommended else None,
                      not_learned if isinstance(not_learned, list | dict) else [])


def not_learned_at(evaluation: Evaluation, checkpoint: str) -> list[str]:
    """The concepts the evaluation says `checkpoint` did not learn (a list, or a list per checkpoint)."""
    found = evaluation.not_learned
    if isinstance(found, dict):
        found = next((v for k, v in found.items() if Path(k).stem == checkpoint), [])
    return _strings(found)


def fallback_triggers(settings: dict, metadata: dict[str, str], resolver: Resolver) -> list[str]:
    """Triggers of a run without concepts.json: the LoRA's trigger phrase, the mixed captions'
    protected tags, kohya folders (`10_name`) whose name is one of their tags, and the tag that
    leads nearly every caption of a dataset folder."""
    found = _strings(metadata.get("modelspec.trigger_phrase", ""))
    if settings.get("caption_scheme") == "mixed":
        found += _strings((settings.get("mixed_captions") or {}).get("protected_tags"))
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        frequency = {}
    for folder, tags in frequency.items() if isinstance(frequency, dict) else []:
        match = re.match(r"^\d+_(.+)$", PurePosixPath(str(folder).replace("\\", "/")).name)
        if match and isinstance(tags, dict) and match.group(1).strip() in tags:
            found.append(match.group(1).strip())
    for source in settings.get("datasets") or []:
        path = Path(str(source.get("path", ""))) if isinstance(source, dict) else None
        if path and path.is_dir() and resolver.allowed(path, (resolver.workspace,)):
            found += leading_tags(path)
    return _unique(found)


def leading_tags(dataset: Path, limit: int = 5000) -> list[str]:
    """Per kohya repeat folder (or the whole dataset): the first tag of at least 90% of its captions."""
    groups = [p for p in sorted(dataset.iterdir()) if p.is_dir() and re.match(r"^\d+_", p.name)] or [dataset]
    leaders = []
    for group in groups:
        firsts = Counter()
        for caption in sorted(group.rglob("*.txt"))[:limit]:
            if caption.stem.endswith("_nl") or any(part.startswith(".") for part in caption.parts[-3:]):
                continue
            first = caption.read_text(encoding="utf-8", errors="replace").split(",")[0].strip()
            firsts[first] += 1
        if firsts:
            tag, count = firsts.most_common(1)[0]
            if tag and tag.lower() not in GENERIC_TAGS and count >= 0.9 * sum(firsts.values()):
                leaders.append(tag)
    return leaders


def samples_for(run_dir: Path, step: int | None, notes: list[str]) -> list[Sample]:
    """The sample images made at the checkpoint's step (else the latest made before it), with the
    prompt from their infotext."""
    from studio.generation.infotext import parse_infotext, read_infotext

    found: dict[int, list[tuple[int, Path]]] = {}
    for path in (run_dir / "samples").glob("step*-*.png") if (run_dir / "samples").is_dir() else []:
        match = re.fullmatch(r"step(\d+)-(\d+)\.png", path.name)
        if match:
            found.setdefault(int(match.group(1)), []).append((int(match.group(2)), path))
    steps = [s for s in found if step is None or s <= step]
    if not steps:
        return []
    chosen = max(steps)
    if step is not None and chosen != step:
        notes.append(f"no samples were made at step {step}; the card shows those of step {chosen}")
    samples = []
    for _, path in sorted(found[chosen])[:MAX_SAMPLES]:
        try:
            infotext = read_infotext(path) or ""
        except OSError as exc:
            notes.append(f"sample {path.name} could not be read ({exc}); left out")
            continue
        prompt, negative, _ = parse_infotext(infotext)
        samples.append(Sample(path, prompt.strip(), negative.strip(), infotext))
    return samples
