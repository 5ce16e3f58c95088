"""Publishing a trained LoRA: a Hugging Face model repository (the checkpoint, a model card in the
Hub's format, the run's sample images) made in ONE commit, and a CivitAI-ready folder. No gradio.

`publish(config, resolver, ...)` reads top to bottom:
1. the run: its config.toml, the chosen checkpoint and its ss_* metadata, the samples made at that
   checkpoint's step, and where they exist the run's concepts.json and evaluation/evaluation.json
   (written by the concepts and evaluation steps; read defensively: a malformed row is left out
   and named in the notes). Without concepts the triggers come from the LoRA's metadata, the
   config (protected tags) and the tag leading the captions of each dataset folder;
2. what goes out, as a `Bundle` of files by their path in the repository: the checkpoint and
   samples as they are on disk (the PNGs keep their A1111 infotext), the card as text;
3. a dry run writes that bundle to a folder (the folder that would be uploaded), and the CivitAI
   bundle (the file, previews with infotext, description.md, A1111's `<name>.json`) to another;
4. an upload, with huggingface_hub: whoami, create_repo, each file pre-uploaded (LFS or Xet, as
   the Hub says) with progress per file, then one commit naming them all. The repository shows
   none of it until that commit lands, so a failed upload leaves nothing half-published, and
   publishing again retries it (objects already uploaded are not sent twice).

Tokens: `publish` takes the caller's token. The token of whoever runs the machine (HF_TOKEN, the
local `hf auth login`) is used only when `owner_login_allowed`: on the command line, and in an app
that strangers cannot reach. On a Space, a --share link or a public --host a request publishes
with its own token (the Space's OAuth sign-in, or one the API caller passes) or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.errors import ConfigError, StudioError
from studio.fileio import inside
from studio.paths import Resolver

Report = Callable[[float | None, str], None]
MAX_SAMPLES = 16
MAX_CONCEPTS = 500
MAX_TRIGGERS = 16
MARKER = ".studio-publish.json"  # in a folder a dry run wrote: the next one may replace it
PUBLISH_DIR = "publish"  # RUN/publish/<checkpoint>-huggingface, RUN/publish/<checkpoint>-civitai
RECOMMENDED_WEIGHT = 1.0
NOTHING_PUBLISHED = ("Nothing was published: the repository shows none of these files. Publish again to retry "
                     "(files already uploaded are not sent twice).")
# Licenses of the base models the catalog names (license, license_name, license_link), as their
# model cards declare them; a LoRA trained on one inherits its terms.
BASE_LICENSES = {
    "cagliostrolab/animagine-xl-3.1": ("other", "faipl-1.0-sd", "https://freedevproject.org/faipl-1.0-sd/"),
    "circlestone-labs/Anima-Base-v1.0-Diffusers": (
        "other", "circlestone-labs-non-commercial-license",
        "https://huggingface.co/circlestone-labs/Anima/blob/main/LICENSE.md"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", None, None),
}
# License ids the Hub knows (any other name becomes license: other + license_name)
HUB_LICENSES = frozenset((
    "apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
    "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "gpl-3.0",
    "agpl-3.0", "lgpl-3.0", "bsd-3-clause", "unlicense", "wtfpl", "artistic-2.0", "other",
))
GENERIC_TAGS = frozenset(("1girl", "1boy", "1other", "2girls", "2boys", "multiple girls", "multiple boys", "solo",
                          "masterpiece", "best quality", "newest", "safe", "general", "absurdres", "highres"))


class PublishConfig(BaseModel):
    """One publish: from a run's checkpoint to a Hub repository, a dry-run folder, a CivitAI folder."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1, max_length=1000)  # a run folder (a name in workspace/runs, or a path)
    checkpoint: str = Field("", max_length=1000)  # a file of RUN/loras; "" = the recommended, else the final
    repo_id: str = Field("", max_length=96)  # OWNER/NAME; "" = no upload
    private: bool = True
    license: str = Field("", max_length=64)  # "" = the base model's license, else "other"
    dry_run: bool = False  # write the folder that would be uploaded, upload nothing
    folder: str = Field("", max_length=1000)  # the dry run's folder ("" = RUN/publish/<checkpoint>-huggingface)
    civitai: bool = False  # also write a CivitAI-ready folder
    civitai_folder: str = Field("", max_length=1000)  # "" = RUN/publish/<checkpoint>-civitai

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        value = value.strip()
        problem = repo_id_problem(value) if value else None
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value

    @field_validator("license")
    @classmethod
    def _license(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9.+_-]*", value):
            raise ValueError(f"{value!r}: a license id such as apache-2.0, openrail++ or faipl-1.0-sd")
        return value


def repo_id_problem(value: str) -> str | None:
    """What is wrong with OWNER/NAME for the Hub (huggingface_hub's own validator), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        return str(exc)
    if value.count("/") != 1:
        return "write it as OWNER/NAME (your user name or an organization of yours)"
    return None


# -- 1. the run ------------------------------------------------------------------------------------
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


# -- 2. the model card ---------------------------------------------------------------------------
@dataclass
class BaseModelInfo:
    hub_id: str | None  # what base_model says (None: a local file the Hub does not know)
    label: str
    license: tuple[str, str | None, str | None]
    family: str | None = None  # the catalog's word for it, where the catalog knows the model


def base_model_info(pretrained: str, family: str, license: str = "", catalog=None) -> BaseModelInfo:
    """The run's base model as the Hub names it: a catalog name's hub id, a hub id as given; a
    local folder or file has none (only its name is shown, never its path)."""
    from studio.models.catalog import HUB_ID, load_catalog

    catalog = load_catalog() if catalog is None else catalog
    entry = catalog.get(pretrained)
    if entry is not None:
        hub_id = entry.source if HUB_ID.match(entry.source) else None
        label = entry.label.split(" (")[0]
    elif HUB_ID.match(pretrained) and not Path(pretrained).is_absolute() and not Path(pretrained).exists():
        hub_id, label = pretrained, pretrained
    else:
        hub_id, label = None, Path(pretrained).name or family
    family = entry.family if entry else next((e.family for e in catalog.values() if e.source == hub_id), None)
    known = getattr(entry, "license", None) or BASE_LICENSES.get(hub_id or "")
    if license:
        chosen = (license, None, None) if license in HUB_LICENSES else ("other", license, None)
    else:
        chosen = tuple(known) if known else ("other", "same-as-base-model", None)
    return BaseModelInfo(hub_id, label, chosen, family)


def card_data(summary: RunSummary, base: BaseModelInfo):
    from huggingface_hub import ModelCardData

    family_tags = ["stable-diffusion-xl", "sdxl"] if summary.family == "sdxl" else ["anima", "cosmos"]
    base_tag = re.sub(r"[^a-z0-9.-]+", "-", base.label.lower()).strip("-")
    widget = [{"text": s.prompt, **({"parameters": {"negative_prompt": s.negative}} if s.negative else {}),
               "output": {"url": f"samples/{s.path.name}"}} for s in summary.samples if s.prompt]
    license, license_name, license_link = base.license
    return ModelCardData(
        base_model=base.hub_id, license=license, license_name=license_name, license_link=license_link,
        tags=_unique(["lora", "text-to-image", "template:sd-lora", "anime", *family_tags, base_tag]),
        pipeline_tag="text-to-image", library_name="diffusers" if summary.family == "sdxl" else None,
        instance_prompt=", ".join(summary.triggers) or None, widget=widget or None,
    )


def _md(text) -> str:
    """Text for a markdown table cell: pipes, angle brackets and newlines made harmless."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _code(text: str) -> str:
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def concepts_section(summary: RunSummary) -> list[str]:
    if not summary.concepts:
        words = ", ".join(_code(t) for t in summary.triggers)
        return ["## Trigger words", "", f"Write {words} in the prompt." if words else
                "No trigger word was found: the LoRA works without one.", ""]
    lines = ["## Concepts and their trigger words", "", "| concept | trigger words | images | core tags |",
             "|---|---|---|---|"]
    for c in summary.concepts:
        lines.append(f"| {_md(c.name)} | {_md(', '.join(c.triggers)) or '–'} | "
                     f"{'–' if c.images is None else c.images} | {_md(', '.join(c.core_tags[:12])) or '–'} |")
    return [*lines, ""]


def evaluation_section(summary: RunSummary) -> list[str]:
    evaluation, stem = summary.evaluation, summary.checkpoint.stem
    if evaluation is None or not evaluation.rows:
        return ["## Evaluation", "", "This checkpoint was not evaluated (no `evaluation/evaluation.json` in its run).",
                ""]
    about = ("Scores from images generated with each checkpoint and tagged with a WD tagger: *fidelity* (share of "
             "a concept's core tags drawn), *bleed* (its core tags appearing where it was not prompted; lower is "
             "better), *flexibility* (prompted poses and scenes that appeared).")
    lines = ["## Evaluation", "", about, ""]
    if evaluation.recommended:
        mark = " (this one)" if evaluation.recommended == stem else ""
        lines += [f"Recommended checkpoint: **{_md(evaluation.recommended)}**{mark}.", ""]
    missed = not_learned_at(evaluation, stem)
    if missed:  # a list: concepts no evaluated checkpoint learned; per checkpoint: this one's
        where = "by this checkpoint" if isinstance(evaluation.not_learned, dict) else "by any evaluated checkpoint"
        lines += [f"⚠ Not learned {where}: {_md(', '.join(missed))}.", ""]
    lines += ["| checkpoint | concept | fidelity | bleed | flexibility |", "|---|---|---|---|---|"]
    for row in sorted(evaluation.rows, key=lambda r: (r.checkpoint != stem, r.checkpoint, r.concept)):
        name = f"**{_md(row.checkpoint)}**" if row.checkpoint == stem else _md(row.checkpoint)
        lines.append(f"| {name} | {_md(row.concept)} | {_score(row.fidelity)} | {_score(row.bleed)} | "
                     f"{_score(row.flexibility)} |")
    return [*lines, ""]


def training_rows(summary: RunSummary, base: BaseModelInfo) -> list[tuple[str, str]]:
    s, meta = summary.settings, summary.metadata
    resolutions = s.get("resolution") if isinstance(s.get("resolution"), list) else [s.get("resolution")]
    network = f"{s.get('network_type')} on {s.get('network_target')}, dim {s.get('network_dim')}, " \
              f"alpha {s.get('network_alpha')}"
    extras = [name for key, name in (("train_text_encoder", "text encoder"), ("train_llm_adapter", "LLM adapter"))
              if s.get(key)]
    if s.get("caption_scheme") == "mixed":
        m = {"weight_tags": 50, "weight_nl": 10, "weight_tags_nl": 20, "weight_nl_tags": 20, "tag_dropout": 0.3,
             "keep_first": 1, **(s.get("mixed_captions") or {})}
        captions = (f"mixed: tags {m['weight_tags']} / NL {m['weight_nl']} / tags+NL {m['weight_tags_nl']} / "
                    f"NL+tags {m['weight_nl_tags']}, tag dropout {m['tag_dropout']}, first {m['keep_first']} kept")
    else:
        captions = (f"tags{', shuffled' if s.get('shuffle_caption') else ''}, keep tokens {s.get('keep_tokens')}, "
                    f"tag dropout {s.get('caption_tag_dropout_rate')}, caption dropout {s.get('caption_dropout_rate')}")
    rates = (("", "learning_rate"), ("UNet/DiT ", "unet_lr"), ("text encoder ", "text_encoder_lr"),
             ("LLM adapter ", "llm_adapter_lr"))
    buckets = (f"{s.get('min_bucket_reso')}-{s.get('max_bucket_reso')} px in steps of {s.get('bucket_reso_steps')}"
               f"{', no upscale' if s.get('bucket_no_upscale') else ''}{', flipped' if s.get('flip_aug') else ''}")
    precision = {"no": "fp32"}.get(s.get("mixed_precision"), s.get("mixed_precision"))
    rows = [
        ("Base model", f"{base.label}" + (f" ({base.hub_id})" if base.hub_id and base.hub_id != base.label else "")),
        ("Network", network + (f", plus {' and '.join(extras)}" if extras else "")),
        ("Steps", f"{summary.step or '?'} of {meta.get('ss_max_train_steps') or s.get('max_train_steps') or '?'}"),
        ("Epochs", f"{summary.epoch or '?'} of {meta.get('ss_num_epochs') or '?'}"),
        ("Batch size", f"{s.get('train_batch_size')} × {s.get('gradient_accumulation_steps')} accumulation"),
        ("Learning rate", ", ".join(f"{label}{s[key]:g}" for label, key in rates if isinstance(s.get(key), int | float))),
        ("Scheduler", f"{s.get('lr_scheduler')}, warmup {s.get('lr_warmup_steps')} steps"),
        ("Optimizer", f"{s.get('optimizer_type')}, weight decay {s.get('weight_decay')}"),
        ("Resolution", ", ".join(str(r) for r in resolutions)),
        ("Buckets", buckets),
        ("Captions", captions),
        ("Precision", f"{precision}{', fp8 base' if s.get('fp8_base') else ''}"),
    ]
    rows += [(label, str(s[key])) for label, key in (("Noise offset", "noise_offset"), ("Min-SNR gamma",
             "min_snr_gamma"), ("v-prediction", "v_parameterization")) if s.get(key)]
    return [*rows, ("Seed", str(s.get("seed")))]


def usage_section(summary: RunSummary, base: BaseModelInfo, repo_id: str) -> list[str]:
    name, stem = summary.checkpoint.name, summary.checkpoint.stem
    words = ", ".join(summary.triggers)
    trigger_note = f" with the trigger words {_code(words)}" if words else ""
    lines = ["## How to use", "", f"Weight {RECOMMENDED_WEIGHT:.1f} (lower it to 0.6-0.8 if it overpowers the prompt).",
             ""]
    if summary.family == "sdxl":
        lines.append(f"- **A1111 / Forge**: put `{name}` in `models/Lora` and add `<lora:{stem}:{RECOMMENDED_WEIGHT:.1f}>` "
                     f"to the prompt{trigger_note}.")
    lines.append(f"- **ComfyUI**: put `{name}` in `models/loras` and add a *Load LoRA* node after the model loader "
                 f"(strength {RECOMMENDED_WEIGHT:.1f}); write the prompt{trigger_note}.")
    if summary.family == "sdxl" and base.hub_id:
        prompt = (summary.samples[0].prompt if summary.samples else words) or "1girl, solo"
        lines += ["- **diffusers**:", "", "```python", "import torch",
                  "from diffusers import StableDiffusionXLPipeline", "",
                  f'pipe = StableDiffusionXLPipeline.from_pretrained("{base.hub_id}", torch_dtype=torch.float16)',
                  'pipe = pipe.to("cuda")',
                  f'pipe.load_lora_weights("{repo_id or "OWNER/NAME"}", weight_name="{name}")',
                  f"image = pipe({json.dumps(prompt, ensure_ascii=False)}).images[0]", "```"]
    return [*lines, ""]


def card_text(summary: RunSummary, base: BaseModelInfo, repo_id: str) -> str:
    """The README.md: YAML metadata the Hub reads, then the concepts, evaluation, settings, usage."""
    from huggingface_hub import ModelCard

    from studio.generation.infotext import file_sha256

    title = repo_id.split("/")[-1] if repo_id else summary.checkpoint.stem
    step = f" at step {summary.step}" if summary.step else ""
    intro = (f"A LoRA for **{_md(base.label)}**, trained with Anime LoRA Studio. This is checkpoint "
             f"`{summary.checkpoint.name}`{step} of run `{_md(summary.run_dir.name)}` "
             f"(SHA-256 `{file_sha256(summary.checkpoint)}`).")
    lines = [f"# {_md(title)}", "", intro, ""]
    lines += concepts_section(summary) + evaluation_section(summary)
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_md(value)} |" for label, value in training_rows(summary, base)] + [""]
    lines += usage_section(summary, base, repo_id)
    if summary.samples:
        lines += [f"## Samples (step {_step_of_sample(summary.samples[0])})", ""]
        for sample in summary.samples:
            lines += [f"![sample](samples/{sample.path.name})", "", f"{_code(sample.prompt)}", ""]
    text = f"---\n{card_data(summary, base).to_yaml()}\n---\n\n" + "\n".join(lines)
    ModelCard(text)  # the Hub's own parser must read it back (a failure here is a bug of this module)
    return text


def _step_of_sample(sample: Sample) -> int:
    return int(sample.path.name[4:].split("-")[0])


# -- 3. bundles and folders --------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleFile:
    path: str  # where it goes, relative (POSIX)
    source: Path | None = None  # a file on disk, sent as it is
    data: bytes | None = None  # or generated content

    @property
    def size(self) -> int:
        return self.source.stat().st_size if self.source is not None else len(self.data or b"")


def hub_bundle(summary: RunSummary, card: str) -> list[BundleFile]:
    return [BundleFile(summary.checkpoint.name, source=summary.checkpoint),
            BundleFile("README.md", data=card.encode("utf-8")),
            *(BundleFile(f"samples/{s.path.name}", source=s.path) for s in summary.samples)]


def civitai_bundle(summary: RunSummary, base: BaseModelInfo) -> list[BundleFile]:
    """What CivitAI's upload takes and A1111/Forge read beside a LoRA: the file, previews that keep
    their A1111 infotext (CivitAI reads the PNG "parameters" chunk) with the same text in a .txt,
    `<name>.preview.png` (the card picture), `<name>.json` (A1111's activation text and preferred
    weight) and description.md with the triggers, base model, weight and settings."""
    name, stem = summary.checkpoint.name, summary.checkpoint.stem
    files = [BundleFile(name, source=summary.checkpoint)]
    for number, sample in enumerate(summary.samples, 1):
        files += [BundleFile(f"previews/{number:02d}.png", source=sample.path),
                  BundleFile(f"previews/{number:02d}.txt", data=sample.infotext.encode("utf-8"))]
    if summary.samples:
        files.append(BundleFile(f"{stem}.preview.png", source=summary.samples[0].path))
    words = ", ".join(summary.triggers)
    user_metadata = {"description": f"LoRA for {base.label}, trained with Anime LoRA Studio",
                     "sd version": "SDXL" if summary.family == "sdxl" else "Unknown", "activation text": words,
                     "preferred weight": RECOMMENDED_WEIGHT, "notes": f"run {summary.run_dir.name}"}
    files.append(BundleFile(f"{stem}.json", data=json.dumps(user_metadata, indent=2).encode("utf-8")))
    lines = [f"# {stem}", "", f"**Base model:** {base.label}" + (f" ({base.hub_id})" if base.hub_id else ""),
             f"**Trigger words:** {words or '(none)'}", f"**Recommended weight:** {RECOMMENDED_WEIGHT:.1f}", ""]
    lines += concepts_section(summary) + evaluation_section(summary)
    lines += ["## Training settings", ""] + [f"- {label}: {value}" for label, value in training_rows(summary, base)]
    files.append(BundleFile("description.md", data=("\n".join(lines) + "\n").encode("utf-8")))
    return files


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # a checkpoint may be large: share its data (files are replaced, never edited)
    except OSError:
        shutil.copy2(source, target)


def write_folder(files: list[BundleFile], target: Path, marker: dict) -> Path:
    """Write the bundle to `target` as a whole: built in a hidden sibling, then renamed into place.
    A folder an earlier publish wrote is replaced; any other non-empty folder is refused."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())):
        raise ConfigError(f"{target} exists and was not written by a publish: choose another folder or empty it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for item in files:
            if item.path.startswith("/") or ".." in PurePosixPath(item.path).parts:
                raise ValueError(f"unsafe bundle path {item.path!r}")  # never from a request: a bug
            dest = tmp / item.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(item.source, dest) if item.source is not None else dest.write_bytes(item.data or b"")
        (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def output_folder(resolver: Resolver, value: str, default: Path, what: str) -> Path:
    """Where a folder is written: `default` (inside the run), or a path the caller may write to
    (inside the workspace for a request; anywhere on the command line)."""
    if not value.strip():
        return default
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() if resolver.owner else resolver.workspace) / path
    if not resolver.allowed(path, (resolver.workspace,)):
        raise resolver.refusal(what, value, "name a folder inside the workspace")
    return path.absolute()


# -- 4. the Hub ------------------------------------------------------------------------------------
def hub_token(given: str | None, *, owner_login_allowed: bool) -> str:
    """The token to publish with: the caller's own, else (only where allowed) HF_TOKEN or the
    local `hf auth login`. Always a string, so huggingface_hub never falls back by itself."""
    given = (given or "").strip()
    if given:
        return given
    if not owner_login_allowed:
        raise ConfigError("publishing needs your own Hugging Face token: sign in with Hugging Face, or pass a write "
                          "token of yours. This server can be reached by others, so it never publishes with its "
                          "owner's token")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login`")
    return token


@contextmanager
def hub_phase(what: str):
    """A Hub call's failure as one StudioError naming the phase (the token never appears)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except StudioError:
        raise
    except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = exc.__cause__
        if cause is not None and str(cause).strip():
            reason += f" ({str(cause).strip().splitlines()[0]})"
        raise StudioError(f"{what} failed: {reason}. {NOTHING_PUBLISHED}") from None


@dataclass
class Upload:
    url: str
    commit: str
    commit_url: str


def upload(files: list[BundleFile], repo_id: str, *, private: bool, token: str, message: str,
           report: Report, endpoint: str | None = None) -> Upload:
    """One commit of `files` to `repo_id` (created if needed), each file pre-uploaded first."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise ConfigError("HF_HUB_OFFLINE is set: publishing needs the Hub. Unset it, or make a dry run")
    api = HfApi(endpoint=endpoint, token=token)
    report(0.1, "checking your token")
    with hub_phase("checking your Hugging Face token"):
        who = api.whoami()
    owner, names = repo_id.split("/")[0], [who.get("name"), *(o.get("name") for o in who.get("orgs") or [])]
    if owner not in names:
        raise ConfigError(f"your token is {who.get('name')}'s, who cannot publish to {owner}/ (your namespaces: "
                          f"{', '.join(n for n in names if n)})")
    report(0.15, f"creating {repo_id}")
    with hub_phase(f"creating {repo_id}"):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        existing = api.model_info(repo_id)
    if private and existing.private is False:
        raise ConfigError(f"{repo_id} exists and is public, and you asked for a private upload: make it private "
                          "on the Hub first, publish it public, or choose another name")
    operations = [CommitOperationAdd(f.path, f.source if f.source is not None else f.data) for f in files]
    total, done = sum(f.size for f in files) or 1, 0
    for item, operation in zip(files, operations):
        report(0.2 + 0.7 * done / total, f"uploading {item.path} ({item.size / 1e6:.1f} MB)")
        with hub_phase(f"uploading {item.path}"):
            api.preupload_lfs_files(repo_id, additions=[operation], free_memory=False)
        done += item.size
    report(0.92, f"committing {len(files)} files to {repo_id}")
    with hub_phase(f"the commit to {repo_id}"):
        commit = api.create_commit(repo_id, operations=operations, commit_message=message,
                                   commit_description="Published with Anime LoRA Studio")
    return Upload(url, commit.oid, commit.commit_url)


# -- the one entry point ---------------------------------------------------------------------------
@dataclass
class PublishResult:
    checkpoint: Path
    repo_id: str
    files: list[str]  # paths in the repository
    url: str | None = None
    commit: str | None = None
    folder: Path | None = None
    civitai_folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        parts = []
        if self.url:
            parts.append(f"Published {self.checkpoint.name} to {self.url} ({len(self.files)} files in one commit)")
        if self.folder:
            parts.append(f"Dry run: the {len(self.files)} files that would be uploaded are in {self.folder}")
        if self.civitai_folder:
            parts.append(f"CivitAI folder: {self.civitai_folder}")
        return ". ".join(parts) + "."

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint.name, "repo_id": self.repo_id, "url": self.url, "commit": self.commit,
                "files": self.files, "folder": str(self.folder) if self.folder else None,
                "civitai_folder": str(self.civitai_folder) if self.civitai_folder else None, "notes": self.notes}


def check(config: PublishConfig, resolver: Resolver, token: str | None, *,
          owner_login_allowed: bool) -> tuple[Path, str | None]:
    """The cheap checks, before any work: the run folder, that there is something to do, and the
    token to upload with (None without an upload)."""
    run_dir = resolver.folder(config.run, [resolver.workspace / "runs"], "run")
    uploading = bool(config.repo_id) and not config.dry_run
    if not (uploading or config.dry_run or config.civitai):
        raise ConfigError("give a repo id (OWNER/NAME) to publish, or ask for a dry run or a CivitAI folder")
    return run_dir, hub_token(token, owner_login_allowed=owner_login_allowed) if uploading else None


def publish(config: PublishConfig, resolver: Resolver, *, token: str | None = None, owner_login_allowed: bool,
            report: Report | None = None, endpoint: str | None = None) -> PublishResult:
    report = report or (lambda fraction, message: None)
    # 1. Check inputs: the run, what to do, the token before any work
    run_dir, hub = check(config, resolver, token, owner_login_allowed=owner_login_allowed)
    report(0.0, "reading the run")
    summary = read_run(run_dir, config.checkpoint, resolver)
    folder = output_folder(resolver, config.folder, run_dir / PUBLISH_DIR / f"{summary.checkpoint.stem}-huggingface",
                           "dry-run folder")
    civitai = output_folder(resolver, config.civitai_folder,
                            run_dir / PUBLISH_DIR / f"{summary.checkpoint.stem}-civitai", "CivitAI folder")
    # 2. What goes out
    base = base_model_info(str(summary.settings.get("pretrained_model", "")), summary.family, config.license)
    summary.family = base.family or summary.family
    files = hub_bundle(summary, card_text(summary, base, config.repo_id))
    result = PublishResult(summary.checkpoint, config.repo_id, [f.path for f in files], notes=summary.notes)
    marker = {"run": run_dir.name, "checkpoint": summary.checkpoint.name, "repo_id": config.repo_id}
    # 3. Folders
    if config.dry_run:
        report(0.05, f"writing {folder}")
        result.folder = write_folder(files, folder, {**marker, "kind": "huggingface"})
    if config.civitai:
        report(0.08, f"writing {civitai}")
        result.civitai_folder = write_folder(civitai_bundle(summary, base), civitai, {**marker, "kind": "civitai"})
    # 4. The upload: one commit
    if hub is not None:
        step = f" (step {summary.step})" if summary.step else ""
        done = upload(files, config.repo_id, private=config.private, token=hub, endpoint=endpoint, report=report,
                      message=f"Upload {summary.checkpoint.name}{step} from Anime LoRA Studio")
        result.url, result.commit = done.url, done.commit
    report(1.0, result.message)
    return result
