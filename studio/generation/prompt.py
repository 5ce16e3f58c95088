"""The prompt builders: Animagine XL 3.1 (`build_prompt`) and Anima (`build_anima_prompt`).

The user's tags come first, in their order and as they wrote them; then the special tags the
model was trained on (rating, year, aesthetic, quality), each only when it is not already there.
The negative prompt gets the model's official negative merged in the same way.

Tags are compared on their bare text: weight syntax such as `(masterpiece:1.2)`, `((tag))` or
`[tag]` is ignored, case and `_`/space do not matter, and escaped parentheses (`\\(` `\\)`) stay
part of a name, as in `hatsune miku \\(cosplay\\)`. Building an already-built prompt gives it back
unchanged, which is what makes reading an image's infotext back into the form safe.

Anima puts its special tags *first* (`[quality/meta/year/safety] [1girl] [character] [series]
[@artist] [general]`): `build_anima_prompt` prefixes `masterpiece, best quality, score_7, safe`
and merges Anima's negative, with the same de-duplication and the same idempotence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from studio.schemas import AESTHETIC_TAGS, RATING_TAGS, PromptStyle

ANIMAGINE_QUALITY_TAGS = ("masterpiece", "best quality", "very aesthetic", "absurdres")
ANIMAGINE_NEGATIVE = (
    "nsfw, lowres, (bad), text, error, fewer, extra, missing, worst quality, jpeg artifacts, "
    "low quality, watermark, unfinished, displeasing, oldest, early, chromatic aberration, "
    "signature, extra digits, artistic error, username, scan, [abstract]"
)

# Anima's recommended prefix and negative (its model card's conventions).
ANIMA_QUALITY_TAGS = ("masterpiece", "best quality", "score_7")
ANIMA_SAFETY_TAG = "safe"
ANIMA_NEGATIVE = "worst quality, low quality, score_1, score_2, score_3, artist name"
# Animagine's period words as Anima writes them (Anima says `old` where Animagine says `oldest`).
ANIMA_PERIODS = {"newest": "newest", "recent": "recent", "mid": "mid", "early": "early", "oldest": "old"}
_SCORE_KEY = re.compile(r"score \d")  # score_7, score_9_up, ... once `_` reads as a space

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {close: open_ for open_, close in _OPENERS.items()}
# A1111 attention weight at the end of a group: "(tag:1.2)", "(tag: .8 )".
_TRAILING_WEIGHT = re.compile(r":\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*$")
# Tags that are prompt syntax, not tags: repeating them is meaningful, so they are never merged.
_KEYWORDS = frozenset({"break", "and"})


def _paired_brackets(text: str) -> set[int]:
    """Positions of the brackets that pair up. Escaped brackets and unpaired ones (a kaomoji's
    lone `(`) are plain text, so one stray bracket cannot swallow the rest of the prompt."""
    stack: list[int] = []
    paired: set[int] = set()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in _OPENERS:
            stack.append(i)
        elif ch in _CLOSERS and stack and text[stack[-1]] == _CLOSERS[ch]:
            paired.add(stack.pop())
            paired.add(i)
        i += 1
    return paired


def split_tags(text: str) -> list[str]:
    """Split a prompt into tags on commas and newlines, leaving weighted groups such as
    `(red hair, blue eyes:1.2)` whole and escaped characters (`\\,` `\\(` `\\)`) untouched."""
    paired = _paired_brackets(text)
    tags: list[str] = []
    current: list[str] = []
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            current.append(text[i : i + 2])
            i += 2
            continue
        if i in paired:
            depth += 1 if ch in _OPENERS else -1
        elif depth == 0 and ch in ",\n":
            tags.append("".join(current))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    tags.append("".join(current))
    return [tag.strip() for tag in tags if tag.strip()]


def _strip_weight_syntax(tag: str) -> str:
    """The tag's text without its paired brackets and attention weights."""
    paired = _paired_brackets(tag)
    out = ""
    i = 0
    while i < len(tag):
        ch = tag[i]
        if ch == "\\":
            out += tag[i : i + 2]
            i += 2
            continue
        if i in paired:
            if ch == ")":
                out = _TRAILING_WEIGHT.sub("", out)
            out += " "  # "(a)(b)" is two words, not "ab"
        else:
            out += ch
        i += 1
    return out


def _normalise(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).casefold()


def tag_keys(tag: str) -> set[str]:
    """What a tag means for de-duplication: `(masterpiece:1.2)` -> {"masterpiece"}, and a group
    `(red hair, blue eyes:1.2)` -> {"red hair", "blue eyes"}."""
    keys = {_normalise(part) for part in split_tags(_strip_weight_syntax(tag))}
    keys.discard("")
    return keys


def _without_exact_duplicates(tags: list[str]) -> list[str]:
    """The tags in order, dropping a tag written exactly like an earlier one (ignoring case and
    spacing). `masterpiece` and `(masterpiece:1.2)` are different on purpose: both are kept."""
    seen: set[str] = set()
    kept = []
    for tag in tags:
        exact = " ".join(tag.split()).casefold()
        if exact in seen and exact not in _KEYWORDS:
            continue
        seen.add(exact)
        kept.append(tag)
    return kept


def _all_keys(tags: list[str]) -> set[str]:
    keys: set[str] = set()
    for tag in tags:
        keys |= tag_keys(tag)
    return keys


def _style_tags(style: PromptStyle, present: set[str]) -> list[str]:
    """The special tags `style` asks for, in Animagine's order: rating, year, aesthetic, quality."""
    tags = [t for t in (style.rating, style.year, style.aesthetic) if t]
    if style.quality_tags:
        # "very aesthetic" in the quality prefix would contradict a lower aesthetic tag.
        lower_aesthetics = set(AESTHETIC_TAGS) - {"very aesthetic"}
        contradicted = style.aesthetic in lower_aesthetics or bool(present & lower_aesthetics)
        tags += [t for t in ANIMAGINE_QUALITY_TAGS if not (contradicted and t == "very aesthetic")]
    return tags


def _append_missing(tags: list[str], extra: list[str], present: set[str]) -> None:
    for tag in extra:
        keys = tag_keys(tag)
        if keys and not keys & present:
            tags.append(tag)
            present |= keys


def build_prompt(prompt: str, negative: str, style: PromptStyle) -> tuple[str, str]:
    """The final (positive, negative) prompts for Animagine XL 3.1, joined with ", "."""
    # 1. The user's own tags, in order, exact repeats dropped.
    positive = _without_exact_duplicates(split_tags(prompt))
    negative_tags = _without_exact_duplicates(split_tags(negative))

    # 2. The special tags, unless already present in any weighting.
    positive_keys = _all_keys(positive)
    _append_missing(positive, _style_tags(style, positive_keys), positive_keys)

    # 3. The official negative; a tag the positive asks for (a chosen "nsfw" rating, an "oldest"
    #    year) is left out rather than fought against.
    if style.default_negative:
        taken = _all_keys(negative_tags) | positive_keys
        _append_missing(negative_tags, split_tags(ANIMAGINE_NEGATIVE), taken)

    return ", ".join(positive), ", ".join(negative_tags)


def _anima_prefix(style: PromptStyle, present: set[str]) -> list[str]:
    """Anima's special tags in its order: period, quality, score, safety. A score or rating the
    user wrote replaces the default one; an explicit `style.score` replaces score_7 and an
    explicit `style.rating` replaces `safe`."""
    tags = [ANIMA_PERIODS[style.year]] if style.year else []
    user_score = any(map(_SCORE_KEY.match, present))
    if style.quality_tags:
        tags += [t for t in ANIMA_QUALITY_TAGS if not t.startswith("score_")]
    if style.score:
        tags.append(style.score)
    elif style.quality_tags and not user_score:
        tags += [t for t in ANIMA_QUALITY_TAGS if t.startswith("score_")]
    if style.rating:
        tags.append(style.rating)
    elif style.quality_tags and not present & set(RATING_TAGS):
        tags.append(ANIMA_SAFETY_TAG)
    return tags


def build_anima_prompt(prompt: str, negative: str, style: PromptStyle) -> tuple[str, str]:
    """The final (positive, negative) prompts for Anima, joined with ", ".

    Of `style`, `quality_tags`, `default_negative`, `rating` and `year` apply (Anima was trained
    on the same rating and period words), and Anima's own `score` (in place of score_7) and
    `artist` (`@name`, after the user's tags); `aesthetic` does not: Anima rates with score_N
    tags instead. The user's tags are kept as written.
    """
    # 1. The user's own tags, in order, exact repeats dropped.
    positive = _without_exact_duplicates(split_tags(prompt))
    negative_tags = _without_exact_duplicates(split_tags(negative))

    # 2. Anima's special tags go first, unless already present in any weighting.
    positive_keys = _all_keys(positive)
    prefix: list[str] = []
    _append_missing(prefix, _anima_prefix(style, positive_keys), positive_keys)
    positive = prefix + positive
    if style.artist.strip():  # after the user's character and series tags (Anima's order)
        artist = "@" + style.artist.strip().removeprefix("@")
        _append_missing(positive, [artist], positive_keys | _all_keys(prefix))

    # 3. Anima's negative, leaving out what the positive asks for.
    if style.default_negative:
        taken = _all_keys(negative_tags) | positive_keys
        _append_missing(negative_tags, split_tags(ANIMA_NEGATIVE), taken)

    return ", ".join(positive), ", ".join(negative_tags)


@dataclass(frozen=True)
class PromptBuilder:
    """What the Generate tab's prompt builder shows for a model family, and how it builds."""

    title: str
    quality_label: str
    fields: tuple[str, ...]  # the style fields that apply, besides quality, year, rating, negative
    build: Callable[[str, str, PromptStyle], tuple[str, str]]


BUILDERS = {
    "sdxl": PromptBuilder("Prompt builder: Animagine XL 3.1 special tags",
                          f"Quality tags ({', '.join(ANIMAGINE_QUALITY_TAGS)})", ("aesthetic",), build_prompt),
    "anima": PromptBuilder("Prompt builder: Anima special tags (quality, score, period, safety, @artist)",
                           f"Quality tags ({', '.join(ANIMA_QUALITY_TAGS)}, {ANIMA_SAFETY_TAG})", ("score", "artist"),
                           build_anima_prompt),
}


def builder_for(family: str) -> PromptBuilder:
    return BUILDERS.get(family, BUILDERS["sdxl"])
