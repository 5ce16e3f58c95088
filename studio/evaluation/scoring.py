"""Scores of one checkpoint from the tags of its images, the recommendation and the concepts that did
not learn. Pure functions over tag lists (no model, no torch): the engine (run.py) feeds them what
the tagger saw, the tests feed them constructed tag sets.

An image is a mapping with "concept" (the concept whose prompt made it, None for a trigger-less
prompt), "kind" (prompts.TRIGGER, CORE, POSE or FREE), "expects" (the tags its prompt asks for)
and "tags" (what the tagger found). Tags compare with `tag_key` (case, `_`/space and escaped
parentheses do not matter). Per concept:

- fidelity: the share of the concept's core tags found in the images of its TRIGGER and POSE
  prompts (their prompt does not name the core tags: the look must come from the trigger), averaged
  over those images; `fidelity_with_tags` the same for its CORE prompt, which names them;
- bleed: the share of the concept's *distinctive* core tags (those the prompting concept does not
  share) found in the images of other concepts' prompts and of the trigger-less prompts. `bleed_raw`
  is that share; `bleed` is what it exceeds the base model's share for the same prompts by (0 when
  it does not): the base model draws "long hair" on plenty of girls without any LoRA;
- flexibility: the share of the tags a POSE prompt asks for (a pose, a framing, a background) found
  in its images.
A score is None where there is nothing to measure (a concept without core tags has no fidelity).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from studio.captioning.tag_rules import tag_key
from studio.evaluation.prompts import CORE, POSE, TRIGGER

SCORE_NAMES = ("fidelity", "bleed", "flexibility")


@dataclass(frozen=True)
class Bounds:
    """What a recommended checkpoint must meet, and what "learned" means."""

    max_bleed: float = 0.25  # no concept's bleed above this (over the base model's)
    min_flexibility: float = 0.5  # no concept's flexibility below this (or below the base model's, if lower)
    min_fidelity: float = 0.5  # a concept whose fidelity never reaches this did not learn

    def to_json(self) -> dict:
        return asdict(self)


def keys(tags: Iterable[str]) -> set[str]:
    return {tag_key(t) for t in tags}


def share(wanted: set[str], found: set[str]) -> float | None:
    """The share of `wanted` present in `found`; None when nothing is wanted."""
    return len(wanted & found) / len(wanted) if wanted else None


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# -- one image set (a checkpoint's, or the base model's) ----------------------------------------------
def fidelity(core_tags: Iterable[str], images: Sequence[Mapping]) -> float | None:
    """Mean share of `core_tags` found per image of `images`."""
    core = keys(core_tags)
    return mean(share(core, keys(image["tags"])) for image in images) if core else None


def flexibility(images: Sequence[Mapping]) -> float | None:
    """Mean share of each image's asked-for tags found in it (images that ask for nothing skipped)."""
    return mean(share(keys(image.get("expects") or ()), keys(image["tags"])) for image in images)


def bleed_raw(name: str, core_by_concept: Mapping[str, set[str]], images: Sequence[Mapping]) -> float | None:
    """Mean share of concept `name`'s distinctive core tags found in the images it did not prompt."""
    own = core_by_concept.get(name) or set()
    rates = []
    for image in images:
        source = image.get("concept")
        if source == name:
            continue
        distinctive = own - (core_by_concept.get(source) or set())
        rates.append(share(distinctive, keys(image["tags"])))
    return mean(rates)


def concept_scores(concepts: Sequence[Mapping], images: Sequence[Mapping]) -> dict[str, dict]:
    """{concept name: {fidelity, fidelity_with_tags, bleed_raw, flexibility, images}} for one image set;
    `concepts` are rows with "name" and "core_tags" (RUN/concepts.json)."""
    core_by_concept = {str(c["name"]): keys(c.get("core_tags") or ()) for c in concepts}
    scores = {}
    for row in concepts:
        name = str(row["name"])
        mine = [i for i in images if i.get("concept") == name]
        scores[name] = {
            "fidelity": fidelity(row.get("core_tags") or (), [i for i in mine if i["kind"] in (TRIGGER, POSE)]),
            "fidelity_with_tags": fidelity(row.get("core_tags") or (), [i for i in mine if i["kind"] == CORE]),
            "bleed_raw": bleed_raw(name, core_by_concept, images),
            "flexibility": flexibility([i for i in mine if i["kind"] == POSE]),
            "images": len(mine),
        }
    return scores


def against_base(scores: Mapping[str, Mapping], base: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """A checkpoint's scores with `bleed`: its raw bleed over the base model's for the same prompts
    (never below 0). Without a base (None) the raw bleed stands. The base's own bleed is 0."""
    out = {}
    for name, values in scores.items():
        raw = values.get("bleed_raw")
        reference = (base or {}).get(name, {}).get("bleed_raw")
        bleed = None if raw is None else max(0.0, raw - (reference or 0.0))
        out[name] = {**values, "bleed": bleed}
    return out


def base_scores(concepts: Sequence[Mapping], images: Sequence[Mapping]) -> dict[str, dict]:
    """The base model's scores: the reference each checkpoint is compared with (its bleed is 0)."""
    return {name: {**values, "bleed": None if values["bleed_raw"] is None else 0.0}
            for name, values in concept_scores(concepts, images).items()}


# -- across checkpoints ------------------------------------------------------------------------------
def problems(scores: Mapping[str, Mapping], base: Mapping[str, Mapping] | None, bounds: Bounds) -> list[str]:
    """Why a checkpoint is out of bounds (empty: within them): a concept that bleeds past
    max_bleed, or whose flexibility falls below min_flexibility (or below the base model's, where
    the base model itself does worse: the tagger may not see a pose on any model)."""
    found = []
    for name, values in scores.items():
        bleed, flex = values.get("bleed"), values.get("flexibility")
        if bleed is not None and bleed > bounds.max_bleed:
            found.append(f"{name} bleeds {bleed:.2f} (over {bounds.max_bleed:.2f})")
        base_flex = (base or {}).get(name, {}).get("flexibility")
        floor = bounds.min_flexibility if base_flex is None else min(bounds.min_flexibility, base_flex)
        if flex is not None and flex < floor:
            found.append(f"{name} follows its prompts {flex:.2f} (under {floor:.2f})")
    return found


def mean_fidelity(scores: Mapping[str, Mapping]) -> float | None:
    return mean(values.get("fidelity") for values in scores.values())


@dataclass(frozen=True)
class Verdict:
    recommended: str | None  # a checkpoint's file name
    not_learned: list[str]
    notes: list[str]


def verdict(checkpoints: Sequence[Mapping], base: Mapping[str, Mapping] | None, bounds: Bounds) -> Verdict:
    """The recommended checkpoint: the best mean fidelity among those within bounds (the earlier
    one on a tie: less training, less overfitting); and the concepts whose fidelity reached
    min_fidelity at no checkpoint. `checkpoints`: {"file", "step", "scores"} in step order; those
    with "missing": True (pruned since) are scored but never recommended."""
    notes: list[str] = []
    best, best_fidelity = None, -1.0
    for checkpoint in sorted(checkpoints, key=lambda c: c.get("step") or 0):
        if checkpoint.get("missing"):
            continue
        found = problems(checkpoint["scores"], base, bounds)
        if found:
            notes.append(f"{checkpoint['file']}: " + "; ".join(found))
            continue
        value = mean_fidelity(checkpoint["scores"])
        value = -0.5 if value is None else value  # within bounds, but nothing to measure: last resort
        if value > best_fidelity:
            best, best_fidelity = checkpoint["file"], value
    if checkpoints and best is None:
        notes.insert(0, "no checkpoint is within the bounds")
    names = list(dict.fromkeys(name for c in checkpoints for name in c["scores"]))
    not_learned = []
    for name in names:
        values = [c["scores"].get(name, {}).get("fidelity") for c in checkpoints]
        measured = [v for v in values if v is not None]
        if measured and max(measured) < bounds.min_fidelity:
            not_learned.append(name)
        elif not measured:
            notes.append(f"{name} has no core tags the tagger can check: its fidelity is not measured")
    return Verdict(best, not_learned, notes)
