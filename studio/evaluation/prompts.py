"""The fixed prompt set of a checkpoint evaluation: for every concept its trigger alone, its trigger
with its core tags, and its trigger in a few poses, framings and backgrounds; then prompts without
any trigger ("1girl, solo", "1boy, solo", a scene). Each prompt says which tags it asks for, so the
tagger can tell whether the picture followed the prompt (flexibility).

The set is fixed (PROMPT_SET_VERSION names it): the same prompts, the same seeds, the base model
and every checkpoint, so the numbers compare across checkpoints and runs. Plain Python; no model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from studio.captioning.tag_rules import tag_key

PROMPT_SET_VERSION = 1  # bump when the prompts change: evaluations made with another set are redone

# Kinds of prompt. Fidelity reads TRIGGER and POSE images (the look must come from the trigger,
# not from the prompt); CORE images say whether it comes when asked; FREE images carry no trigger.
TRIGGER, CORE, POSE, FREE = "trigger", "core", "pose", "free"

# (extra tags, the tags the image should then show): a pose, a framing and a background each
POSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("standing, full body, white background", ("standing", "full body", "white background")),
    ("sitting, upper body, indoors", ("sitting", "upper body", "indoors")),
    ("smile, looking at viewer, portrait", ("smile", "looking at viewer")),
    ("outdoors, sky, cowboy shot", ("outdoors", "sky", "cowboy shot")),
)
FREE_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("1girl, solo", ("1girl", "solo")),
    ("1boy, solo", ("1boy", "solo")),
    ("scenery, no humans, outdoors, sky, tree", ("scenery", "no humans", "outdoors", "sky")),
)
NO_TRIGGER = "solo"  # what a concept without a trigger word (a style, a one-concept dataset) is drawn with
MAX_CORE_IN_PROMPT = 12  # a CORE prompt names at most this many of the concept's core tags


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the set: whose it is (None: no concept), its kind, its text and the tags it
    asks for (those the image should show)."""

    concept: str | None
    kind: str
    text: str
    expects: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**asdict(self), "expects": list(self.expects)}


def _join(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def concept_prompts(name: str, triggers: Sequence[str], core_tags: Sequence[str]) -> list[EvalPrompt]:
    """A concept's prompts: its (first) trigger alone, with its core tags, and in each pose."""
    trigger = next((t.strip() for t in triggers if t.strip()), "") or NO_TRIGGER
    core = [t for t in core_tags if tag_key(t) != tag_key(trigger)][:MAX_CORE_IN_PROMPT]
    prompts = [EvalPrompt(name, TRIGGER, trigger)]
    if core:
        prompts.append(EvalPrompt(name, CORE, _join(trigger, *core), tuple(core)))
    prompts += [EvalPrompt(name, POSE, _join(trigger, extra), expects) for extra, expects in POSES]
    return prompts


def free_prompts() -> list[EvalPrompt]:
    return [EvalPrompt(None, FREE, text, expects) for text, expects in FREE_PROMPTS]


def prompt_set(concepts: Iterable[dict]) -> list[EvalPrompt]:
    """Every prompt of an evaluation, for concept rows as RUN/concepts.json holds them
    ({"name", "triggers", "core_tags", ...}): each concept's, then the trigger-less ones."""
    prompts: list[EvalPrompt] = []
    for row in concepts:
        prompts += concept_prompts(str(row["name"]), list(row.get("triggers") or []), list(row.get("core_tags") or []))
    return prompts + free_prompts()
