"""Concepts in a dataset: the characters, outfits and styles one LoRA learns, each named in the
captions by one or more trigger tags.

Where they come from, first match first:
- kohya repeat folders (`10_amiya/`): each folder is a concept; its triggers are the folder's class
  tokens where the captions use them as a tag, plus the character tags most of its images carry;
- the person's trigger words (the Caption tab's trigger, `--trigger`): one concept per trigger
  the captions use;
- character tags (from the tagger's `selected_tags.csv` where one is on disk, else tags with a
  Danbooru qualifier such as `amiya (arknights)`): one concept per character tag in at least
  MIN_CHARACTER_IMAGES images;
- otherwise the dataset is one concept, whose trigger is the tag that leads (nearly) every caption.
The person can edit the list (names, triggers, target shares); it is kept in the dataset's
`.studio/concepts.json` and read back instead of the discovered one.

Per concept: its images (an image whose caption holds any of its triggers, or that lies in its
folder), its share of an epoch (images x repeats over the dataset's samples per epoch), and its
core tags: the tags at least CORE_SHARE of its images carry, leaving out its own triggers, other
concepts' triggers, people counts, framing and background words and the special tags (quality,
rating, year, aesthetic). Core tags are what the evaluation checks a checkpoint draws.

Balance: the repeats that give each concept its target share of an epoch (equal by default), as
kohya users set folder repeats by hand. All plain Python over caption tags: no model is loaded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.captioning.tag_rules import (
    ANIMA_QUALITY,
    ANIMAGINE_QUALITY,
    COUNT_TAGS,
    OLDEST_PERIOD,
    RATING_TAGS,
    YEAR_PERIODS,
    tag_key,
)
from studio.errors import DatasetError
from studio.fileio import atomic_write_text

CORE_SHARE = 0.6  # a tag in at least this share of a concept's images is one of its core tags
MIN_CHARACTER_IMAGES = 2  # a character tag in fewer images is not a concept of its own
LEADING_SHARE = 0.9  # a tag that leads this share of captions is the dataset's trigger
CONCEPTS_FILE = "concepts.json"  # in the dataset's .studio folder
MAX_CONCEPTS = 200
MAX_TRIGGERS = 16

# Words that describe the picture, not the concept: never core tags.
_SCENE_TAGS = (
    "solo", "solo focus", "looking at viewer", "looking away", "looking back", "looking to the side",
    "upper body", "full body", "cowboy shot", "portrait", "close-up", "lower body", "feet out of frame",
    "from side", "from behind", "from above", "from below", "straight-on", "dutch angle",
    "simple background", "white background", "grey background", "gray background", "black background",
    "transparent background", "gradient background", "outdoors", "indoors", "day", "night", "sky",
    "standing", "sitting", "smile", "open mouth", "closed mouth", "blush", "highres", "absurdres",
    "lowres", "commentary request", "translated", "official art", "no humans",
    "very aesthetic", "aesthetic", "displeasing", "very displeasing",
)
_NON_FEATURE = frozenset(tag_key(t) for t in (*_SCENE_TAGS, *COUNT_TAGS, *ANIMAGINE_QUALITY, *ANIMA_QUALITY,
                                              *RATING_TAGS, *(p[1] for p in YEAR_PERIODS), *OLDEST_PERIOD,
                                              "general", "questionable"))
_SPECIAL = re.compile(r"^(year \d{4}|score_\d(_up)?|@.*)$")
# Danbooru qualifiers that do not make a character tag
_NOT_CHARACTER_QUALIFIERS = {"cosplay", "medium", "artist", "style", "symbol", "meme", "object", "food",
                             "animal", "flower", "company", "series", "game", "movie", "pokemon"}
_QUALIFIER = re.compile(r"\(([^()]+)\)\s*$")


def is_feature_tag(tag: str) -> bool:
    """False for people counts, framing, background, quality, rating, year and score tags."""
    key = tag_key(tag)
    return key not in _NON_FEATURE and not _SPECIAL.match(key)


def looks_like_character(tag: str) -> bool:
    """`amiya (arknights)`: a tag with a Danbooru qualifier that names a franchise."""
    match = _QUALIFIER.search(tag_key(tag))
    return bool(match) and match.group(1).strip() not in _NOT_CHARACTER_QUALIFIERS


@dataclass(frozen=True)
class Entry:
    """One image of the dataset as the concept code sees it."""

    rel: str
    folder: str  # kohya repeat folder on disk ("10_amiya"), "" in a flat dataset
    repeats: int
    tags: tuple[str, ...]


@dataclass(frozen=True)
class ConceptSpec:
    """A concept as the person edits it: a name, the tags that name it, optionally its folder and
    the share of an epoch it should get (None: an equal share)."""

    name: str
    triggers: tuple[str, ...] = ()
    folder: str = ""
    target_share: float | None = None
    source: str = "user"  # "folder", "trigger", "character", "dataset" or "user"

    def to_json(self) -> dict:
        return {**asdict(self), "triggers": list(self.triggers)}


@dataclass(frozen=True)
class Concept:
    spec: ConceptSpec
    images: tuple[str, ...]  # rel paths
    samples: int  # images x repeats per epoch
    share: float  # of the dataset's samples per epoch
    core_tags: tuple[str, ...]  # most common first
    core_share: dict[str, float] = field(default_factory=dict)  # core tag -> share of its images

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def triggers(self) -> tuple[str, ...]:
        return self.spec.triggers

    def to_json(self) -> dict:
        return {"name": self.name, "triggers": list(self.triggers), "folder": self.spec.folder,
                "source": self.spec.source, "target_share": self.spec.target_share, "images": len(self.images),
                "samples": self.samples, "share": round(self.share, 4), "core_tags": list(self.core_tags)}


@dataclass(frozen=True)
class ConceptReport:
    concepts: tuple[Concept, ...]
    unassigned: tuple[str, ...]  # rel paths of images no concept claims
    samples_per_epoch: int
    layout: str  # "kohya" or "flat"

    def concept(self, name: str) -> Concept:
        for concept in self.concepts:
            if concept.name == name:
                return concept
        raise KeyError(name)

    def targets(self) -> dict[str, float]:
        """Each concept's target share: its own where set, the rest split equally."""
        fixed = {c.name: c.spec.target_share for c in self.concepts if c.spec.target_share is not None}
        rest = [c.name for c in self.concepts if c.name not in fixed]
        left = max(0.0, 1.0 - sum(fixed.values()))
        return {**fixed, **{name: left / len(rest) for name in rest}} if rest else fixed

    def balanced_repeats(self) -> dict[str, int]:
        """Whole repeats per concept (at least 1) whose shares come nearest the targets, for an
        epoch of about the samples it has now (between half and twice as many)."""
        targets = self.targets()
        sizes = {c.name: max(len(c.images), 1) for c in self.concepts}
        total = max(self.samples_per_epoch, len(self.concepts))

        def repeats_for(samples: int) -> dict[str, int]:
            return {name: max(1, round(samples * targets[name] / size)) for name, size in sizes.items()}

        def error(repeats: dict[str, int]) -> float:
            epoch = sum(sizes[name] * r for name, r in repeats.items())
            return max(abs(sizes[name] * r / epoch - targets[name]) for name, r in repeats.items())

        candidates = range(max(1, total // 2), 2 * total + 1, max(1, (3 * total) // 4000))
        best = min(candidates, key=lambda samples: (round(error(repeats_for(samples)), 3), abs(samples - total)))
        return repeats_for(best)

    def to_json(self) -> dict:
        repeats = self.balanced_repeats() if self.concepts else {}
        return {"layout": self.layout, "samples_per_epoch": self.samples_per_epoch,
                "unassigned": len(self.unassigned),
                "concepts": [{**c.to_json(), "balanced_repeats": repeats.get(c.name)} for c in self.concepts]}

    def table(self) -> list[list]:
        """Rows for the UI and the CLI: name, triggers, images, share, balanced repeats, core tags."""
        repeats = self.balanced_repeats() if self.concepts else {}
        return [[c.name, ", ".join(c.triggers), len(c.images), f"{c.share:.0%}", repeats.get(c.name),
                 ", ".join(c.core_tags)] for c in self.concepts]


# -- discovery --------------------------------------------------------------------------------------
def discover(entries: Sequence[Entry], *, character_tags: Iterable[str] = (), triggers: Iterable[str] = (),
             name: str = "dataset") -> list[ConceptSpec]:
    """The concepts the dataset's layout and captions show (see the module's docstring)."""
    characters = {tag_key(t) for t in character_tags}
    counts = Counter(tag_key(t) for e in entries for t in set(e.tags))
    spelled = {}
    for entry in entries:
        for tag in entry.tags:
            spelled.setdefault(tag_key(tag), tag)

    def is_character(key: str) -> bool:
        return key in characters or looks_like_character(key)

    folders = sorted({e.folder for e in entries if e.folder})
    specs: list[ConceptSpec] = []
    if folders:
        for folder in folders:
            mine = [e for e in entries if e.folder == folder]
            local = Counter(tag_key(t) for e in mine for t in set(e.tags))
            half = len(mine) / 2
            class_tokens = folder.split("_", 1)[1] if "_" in folder else folder
            found = [spelled[k] for k in (tag_key(class_tokens), tag_key(class_tokens.replace("_", " ")))
                     if local.get(k, 0) >= half and k in spelled]
            found += [spelled[k] for k, n in local.most_common() if n >= half and is_character(k)]
            specs.append(ConceptSpec(class_tokens or folder, tuple(dict.fromkeys(found)), folder, source="folder"))
        return specs
    for trigger in dict.fromkeys(t.strip() for t in triggers if t.strip()):
        if counts.get(tag_key(trigger)):
            specs.append(ConceptSpec(trigger, (spelled[tag_key(trigger)],), source="trigger"))
    claimed = {tag_key(t) for s in specs for t in s.triggers}
    for key, count in counts.most_common():
        if count >= MIN_CHARACTER_IMAGES and is_character(key) and key not in claimed:
            specs.append(ConceptSpec(spelled[key], (spelled[key],), source="character"))
    if not specs and entries:
        leading = Counter(tag_key(e.tags[0]) for e in entries if e.tags)
        key, count = leading.most_common(1)[0] if leading else ("", 0)
        trigger = (spelled[key],) if key and count >= LEADING_SHARE * len(entries) and is_feature_tag(key) else ()
        specs.append(ConceptSpec(trigger[0] if trigger else name, trigger, source="dataset"))
    return specs[:MAX_CONCEPTS]


def build_report(entries: Sequence[Entry], specs: Sequence[ConceptSpec]) -> ConceptReport:
    """Images, shares and core tags of each concept."""
    samples_per_epoch = sum(e.repeats for e in entries)
    all_triggers = {tag_key(t) for s in specs for t in s.triggers}
    concepts, claimed = [], set()
    for spec in specs:
        keys = {tag_key(t) for t in spec.triggers}
        if spec.folder:
            mine = [e for e in entries if e.folder == spec.folder]
        elif spec.source == "dataset" and not keys:
            mine = list(entries)
        else:
            mine = [e for e in entries if keys & {tag_key(t) for t in e.tags}]
        claimed.update(e.rel for e in mine)
        samples = sum(e.repeats for e in mine)
        local = Counter(tag_key(t) for e in mine for t in set(e.tags))
        spelled = {}
        for entry in mine:
            for tag in entry.tags:
                spelled.setdefault(tag_key(tag), tag)
        core = {spelled[k]: n / len(mine) for k, n in local.most_common()
                if mine and n / len(mine) >= CORE_SHARE and k not in all_triggers and is_feature_tag(k)}
        concepts.append(Concept(spec, tuple(e.rel for e in mine), samples,
                                samples / samples_per_epoch if samples_per_epoch else 0.0, tuple(core), core))
    unassigned = tuple(e.rel for e in entries if e.rel not in claimed)
    layout = "kohya" if any(e.folder for e in entries) else "flat"
    return ConceptReport(tuple(concepts), unassigned, samples_per_epoch, layout)


# -- a dataset folder ---------------------------------------------------------------------------------
def entries_of(dataset) -> list[Entry]:
    """The entries of an open `Dataset` (its last scan and caption files)."""
    return [Entry(item.rel, item.subset, item.repeats, tuple(dataset.read_tags(item))) for item in dataset.items]


def saved_specs(root: Path) -> list[ConceptSpec] | None:
    """The person's concept list for the dataset at `root`, or None when there is none."""
    path = Path(root) / ".studio" / CONCEPTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [spec_from_json(item) for item in data["concepts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a concept list the studio wrote ({exc}); delete it to start over") from None


def spec_from_json(item: dict) -> ConceptSpec:
    """A ConceptSpec from its JSON form (the saved list, a form, an API call), checked."""
    name = str(item.get("name", "")).strip()
    if not name or len(name) > 200:
        raise ValueError("each concept needs a name of 1-200 characters")
    triggers = item.get("triggers") or []
    if isinstance(triggers, str):
        triggers = [t for t in (s.strip() for s in triggers.split(",")) if t]
    if not isinstance(triggers, list) or len(triggers) > MAX_TRIGGERS or any(
            not isinstance(t, str) or not t.strip() or len(t) > 200 for t in triggers):
        raise ValueError(f"concept {name!r}: triggers must be up to {MAX_TRIGGERS} tags of 1-200 characters")
    share = item.get("target_share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
        raise ValueError(f"concept {name!r}: target_share must be a number in (0, 1]")
    folder = str(item.get("folder") or "")
    if "/" in folder or "\\" in folder or folder in (".", ".."):
        raise ValueError(f"concept {name!r}: folder must be a repeat folder's name")
    return ConceptSpec(name, tuple(t.strip() for t in triggers), folder, share, str(item.get("source") or "user"))


def save_specs(root: Path, specs: Sequence[ConceptSpec]) -> Path:
    """Keep the person's concept list in the dataset's .studio folder (written atomically)."""
    if len(specs) > MAX_CONCEPTS:
        raise DatasetError(f"at most {MAX_CONCEPTS} concepts")
    if len({s.name for s in specs}) != len(specs):
        raise DatasetError("two concepts have the same name")
    path = Path(root) / ".studio" / CONCEPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"concepts": [s.to_json() for s in specs]}, indent=1))
    return path


def dataset_concepts(dataset, *, character_tags: Iterable[str] = (), triggers: Iterable[str] = ()) -> ConceptReport:
    """The concepts of an open `Dataset`: the saved list if the person made one, else discovered."""
    entries = entries_of(dataset)
    specs = saved_specs(dataset.root)
    if specs is None:
        specs = discover(entries, character_tags=character_tags, triggers=triggers, name=dataset.root.name)
    return build_report(entries, specs)


def known_character_tags(models_dir: Path | None) -> set[str]:
    """Character tags (category 4) of every tagger's selected_tags.csv already in `models_dir`
    (nothing is downloaded); empty when there is none."""
    import csv

    names: set[str] = set()
    if models_dir is None or not Path(models_dir).is_dir():
        return names
    root = Path(models_dir)
    found = [*root.glob("*/selected_tags.csv"), *root.glob("*/snapshots/*/selected_tags.csv")]  # folders, hub cache
    for path in sorted(found)[:8]:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                names.update(row["name"] for row in csv.DictReader(fh) if row.get("category") == "4")
        except (OSError, KeyError, ValueError, csv.Error):
            continue
    return names


RUN_CONCEPTS_FILE = "concepts.json"  # in a run folder: the concepts it trained, for evaluation and publishing


def run_concepts(config, character_tags: Iterable[str] = ()) -> list[dict]:
    """The concepts of a training run's datasets (a TrainConfig), as JSON rows: name, triggers,
    core_tags, images, share, dataset. Concepts of the same name in several datasets are kept apart
    by their dataset."""
    from studio.dataset.dataset import Dataset

    rows = []
    for source in config.datasets:
        dataset = Dataset.open(Path(source.path))
        report = dataset_concepts(dataset, character_tags=character_tags)
        rows += [{**concept.to_json(), "dataset": str(dataset.root)} for concept in report.concepts]
    return rows


def write_run_concepts(run_dir: Path, rows: list[dict]) -> Path:
    """RUN/concepts.json: the run's concepts as training starts (run_concepts' rows)."""
    path = Path(run_dir) / RUN_CONCEPTS_FILE
    atomic_write_text(path, json.dumps(rows, indent=1))
    return path


def read_run_concepts(run_dir: Path) -> list[dict]:
    """The rows write_run_concepts wrote; [] for a run made before concepts existed."""
    path = Path(run_dir) / RUN_CONCEPTS_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise DatasetError(f"{path} is not a list of concepts")
    return rows
