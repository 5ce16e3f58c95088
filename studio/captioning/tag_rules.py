"""Tag rules: how a tagger's output becomes the tag list of a caption file.

One call, `build_caption(result, rules)`, applies the dataset's rules to one image:

1. Clean each tag: `_` -> space (kaomoji such as `^_^` keep theirs), lowercase for Anima,
   parentheses escaped as `\\(` `\\)` (an already escaped one is left alone), excluded tags dropped.
2. Sort tags into sections: people count (`1girl`, `6+boys`, `multiple others`, `no humans`),
   character, series, artist, general (in the tagger's order).
3. Lay the sections out in the model's order and add its special tags:
   - `animagine` (Animagine XL 3.1): count, character, series, artist, general, then the special
     tags at the end in the order the prompt builder writes them: rating, year, aesthetic, quality.
   - `anima`: special tags first, in the order of the model card's own example
     (`year 2025, newest, <quality>, score_N, safe`), then count, character, series, `@artist`,
     general; everything lowercase.
   - `none`: the tagger's order (characters, each followed by the series it implies, then the
     general tags), then the rules' series and artists, special tags at the end (Animagine's words).
4. The trigger word goes first, always, even before Anima's quality tags: kohya's
   `keep_tokens=1` (and the studio's own caption shuffling) keep the first tag in place, so the
   trigger must be the first tag. It is written exactly as the user typed it.
5. De-duplicate, keeping the first occurrence. Tags compare equal ignoring case, `_`/space and
   escaping: `Saber_(Fate)` and `saber \\(fate\\)` are one tag.

Series (copyright) tags: WD taggers have no copyright category, so series come from the rules:
- `series`: series tags added to every caption of the dataset (a one-series character LoRA),
- `character_series`: character tag -> series tag, added when that character is detected,
- a small built-in table for characters whose Danbooru qualifier names a well-known franchise
  (`saber (fate)` -> `fate (series)`, `lumine (genshin impact)` -> `genshin impact`). Only the
  exact qualifiers in `QUALIFIER_SERIES` are used: many qualifiers are not series (`(cosplay)`),
  and most characters have none (`hakurei reimu`), so nothing is guessed beyond the table.
A tag that is one of these series, wherever it appears, is placed in the series section.
Artists likewise come from `artists` (and any tag already written `@name`).

Special tags map onto each model's vocabulary: WD ratings general/sensitive/questionable/explicit
become safe/sensitive/nsfw/explicit; a year becomes Animagine's period word (newest 2021+,
recent 2018-20, mid 2015-17, early 2011-14, oldest up to 2010) or, for Anima, `year N` plus the
model card's period word (same boundaries, `old` instead of `oldest`: the card gives no ranges);
an aesthetic score in 0..1 becomes Animagine's aesthetic tag (> 0.71 very aesthetic, > 0.45
aesthetic, > 0.27 displeasing, else very displeasing) or, for Anima, a `score_N` tag (N = 1 + the
score's ninth, 1..9) unless a fixed `score` is set.

Everything here is plain Python and precomputed per rules object (each distinct tag is cleaned
once), so post-processing costs a few microseconds per image.
"""

from __future__ import annotations

import fnmatch
import functools
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from studio.errors import ConfigError, ModelNotFoundError, StudioError

Template = Literal["animagine", "anima", "none"]
ExistingPolicy = Literal["skip", "append", "prepend", "overwrite"]
EXISTING_POLICIES: tuple[str, ...] = ("skip", "append", "prepend", "overwrite")

ANIMAGINE_QUALITY = (
    "masterpiece",
    "best quality",
    "great quality",
    "good quality",
    "normal quality",
    "low quality",
    "worst quality",
)
ANIMA_QUALITY = (
    "masterpiece",
    "best quality",
    "good quality",
    "normal quality",
    "low quality",
    "worst quality",
)
RATING_TAGS = ("safe", "sensitive", "nsfw", "explicit")
# WD v3 rating rows -> the rating words Animagine XL 3.1 and Anima were trained with.
WD_RATING_TO_MODEL = {
    "general": "safe",
    "sensitive": "sensitive",
    "questionable": "nsfw",
    "explicit": "explicit",
}
# (first year of the period, Animagine word, Anima word); years before 2011 are the oldest period.
YEAR_PERIODS = (
    (2021, "newest", "newest"),
    (2018, "recent", "recent"),
    (2015, "mid", "mid"),
    (2011, "early", "early"),
)
OLDEST_PERIOD = ("oldest", "old")
AESTHETIC_THRESHOLDS = ((0.71, "very aesthetic"), (0.45, "aesthetic"), (0.27, "displeasing"))
LOWEST_AESTHETIC = "very displeasing"

# Danbooru's people-count tags; `no humans` counts nobody and leads the same way.
_PEOPLE = ("girl", "boy", "other")
COUNT_TAGS = frozenset(
    [f"1{p}" for p in _PEOPLE]
    + [f"{n}{p}s" for p in _PEOPLE for n in ("2", "3", "4", "5", "6+")]
    + [f"multiple {p}s" for p in _PEOPLE]
    + ["no humans"]
)
# Character qualifier -> the franchise's Danbooru copyright tag, for qualifiers that always mean
# that franchise. Deliberately small: extend through `character_series`, not by guessing.
QUALIFIER_SERIES = {
    "fate": "fate (series)",
    "genshin impact": "genshin impact",
    "honkai: star rail": "honkai: star rail",
    "blue archive": "blue archive",
    "arknights": "arknights",
    "azur lane": "azur lane",
    "kancolle": "kantai collection",
    "pokemon": "pokemon",
    "umamusume": "umamusume",
    "nikke": "goddess of victory: nikke",
}

_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")
_QUALIFIER = re.compile(r"\((?P<q>[^()]+)\)\s*$")
_TWO_LETTERS = re.compile(r"[^\W\d_]{2}")
_CACHE_LIMIT = 200_000


# --- tag text ---------------------------------------------------------------------------------


def is_kaomoji(tag: str) -> bool:
    """A tag whose underscores are part of a face: it has an underscore and never two letters in a
    row (`^_^`, `>_<`, `x_x`, `0_0`, `(o)_(o)`, `<|>_<|>`), unlike any word tag."""
    return "_" in tag and not _TWO_LETTERS.search(tag)


def _plain(tag: str) -> str:
    """Whitespace collapsed, `_` -> space (not in kaomoji), escapes removed: the bare text."""
    tag = " ".join(tag.split())
    if "_" in tag and not is_kaomoji(tag):
        tag = " ".join(tag.replace("_", " ").split())
    return tag.replace("\\(", "(").replace("\\)", ")")


def tag_key(tag: str) -> str:
    """What makes two tags the same: case, `_`/space and escaping do not matter."""
    return _plain(tag).casefold()


# Special tags come from a small fixed vocabulary: remember their keys.
_special_key = functools.lru_cache(maxsize=1024)(tag_key)


def escape_parentheses(tag: str) -> str:
    """`saber (fate)` -> `saber \\(fate\\)`; already escaped parentheses stay as they are."""
    return _UNESCAPED_PAREN.sub(r"\\\1", tag)


def clean_tag(tag: str, *, lowercase: bool = False, escape: bool = True) -> str:
    """A tag as it is written into a caption file."""
    text = _plain(tag)
    if lowercase:
        text = text.lower()
    return escape_parentheses(text) if escape else text


def split_caption(text: str) -> list[str]:
    """The tags of a caption file: split on commas and newlines (`\\,` is not a separator)."""
    tags = re.split(r"(?<!\\),|\n", text)
    return [t.strip() for t in tags if t.strip()]


def join_caption(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def dedupe_tags(tags: Iterable[str]) -> list[str]:
    """Tags in order, later duplicates dropped (compared with `tag_key`)."""
    seen: set[str] = set()
    kept = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            kept.append(tag)
    return kept


# --- special tags -----------------------------------------------------------------------------


def rating_tag(wd_rating: str) -> str:
    """A WD tagger rating (general/sensitive/questionable/explicit) in the models' vocabulary."""
    try:
        return WD_RATING_TO_MODEL[wd_rating.strip().lower()]
    except KeyError:
        if wd_rating.strip().lower() in RATING_TAGS:  # already a model rating word
            return wd_rating.strip().lower()
        raise ConfigError(
            f"unknown rating {wd_rating!r}: expected one of {', '.join(WD_RATING_TO_MODEL)}"
        ) from None


def year_tags(year: int, template: Template = "animagine") -> list[str]:
    """Animagine: the period word (`newest` for 2021 and later). Anima: `year N` and its period."""
    index = 1 if template == "anima" else 0
    period = OLDEST_PERIOD[index]
    for first_year, *words in YEAR_PERIODS:
        if year >= first_year:
            period = words[index]
            break
    return [f"year {year}", period] if template == "anima" else [period]


def aesthetic_tag(score: float) -> str:
    """Animagine's aesthetic tag for a 0..1 aesthetic score."""
    for threshold, tag in AESTHETIC_THRESHOLDS:
        if score > threshold:
            return tag
    return LOWEST_AESTHETIC


def anima_score_tag(score: float) -> str:
    """Anima's `score_N` (N in 1..9) for a 0..1 aesthetic score: ninths of the range."""
    return f"score_{min(9, 1 + int(max(0.0, score) * 9))}"


# --- rules ------------------------------------------------------------------------------------


class TagResultLike(Protocol):
    """What the taggers return (studio.captioning.tagger.TagResult): names with spaces, unescaped."""

    rating: tuple[str, float] | None
    characters: Sequence[tuple[str, float]]
    general: Sequence[tuple[str, float]]


class TagRules(BaseModel):
    """One dataset's caption rules. Frozen: build a new one (or `model_copy(update=...)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: Template = "animagine"
    trigger: str = ""  # written first, as typed
    quality: list[str] = []  # from the template's quality vocabulary, e.g. ["masterpiece", "best quality"]
    score: int | None = Field(None, ge=1, le=9)  # Anima only: a fixed score_N for every image
    year: int | None = Field(None, ge=1900, le=2100)  # when the art was made -> period/year tags
    rating_from_tagger: bool = True  # use the tagger's rating (mapped) when no fixed rating is set
    rating: Literal["", "safe", "sensitive", "nsfw", "explicit"] = ""  # fixed rating, wins if set
    aesthetic_score: float | None = Field(None, ge=0.0, le=1.0)  # dataset-wide; per image in build_caption
    escape: bool = True  # write `\(` `\)`
    exclude: list[str] = []  # tags to drop; `*` wildcards allowed ("* background")
    series: list[str] = []  # series tags added to every caption
    character_series: dict[str, str] = {}  # character tag -> series tag
    artists: list[str] = []  # artist names; Anima writes them as `@name`

    _compiled: _CompiledRules | None = PrivateAttr(default=None)

    @field_validator("trigger")
    @classmethod
    def _one_tag_trigger(cls, value: str) -> str:
        value = value.strip()
        if "," in value:
            raise ValueError(f"the trigger word {value!r} contains a comma: use one tag, e.g. 'ohwx'")
        return value

    @model_validator(mode="after")
    def _fits_template(self) -> TagRules:
        vocabulary = ANIMA_QUALITY if self.template == "anima" else ANIMAGINE_QUALITY
        for tag in self.quality:
            if tag.strip().lower() not in vocabulary:
                model = "Anima" if self.template == "anima" else "Animagine XL 3.1"
                raise ValueError(
                    f"{tag!r} is not a quality tag of {model}; choose from: {', '.join(vocabulary)}"
                )
        if self.score is not None and self.template != "anima":
            raise ValueError("score_N tags belong to Anima; pick the 'anima' template or clear the score")
        return self

    def compiled(self) -> _CompiledRules:
        """The precomputed rules (a copy made with `model_copy` recompiles its own)."""
        private = self.__pydantic_private__  # direct access: pydantic's __getattr__ is slow
        compiled = private.get("_compiled")
        if compiled is None or compiled.rules is not self:
            compiled = private["_compiled"] = _CompiledRules(self)
        return compiled


# Sections of a caption, in Animagine's and Anima's order (`none` keeps the tagger's order).
COUNT, CHARACTER, SERIES, ARTIST, GENERAL = range(5)


@dataclass(frozen=True, slots=True)
class TagInfo:
    text: str  # as written in the caption
    key: str  # for de-duplication
    section: int  # COUNT, CHARACTER, SERIES, ARTIST or GENERAL


@dataclass
class CaptionParts:
    """One image's tags sorted into sections (cleaned, excluded tags dropped, not de-duplicated)."""

    sections: tuple[list[TagInfo], ...]  # indexed by COUNT, CHARACTER, SERIES, ARTIST, GENERAL
    rating: str  # the model's rating word, or ""

    def texts(self, section: int) -> list[str]:
        return [info.text for info in self.sections[section]]


class _CompiledRules:
    """Everything about `TagRules` that does not depend on the image, computed once; each distinct
    tag is cleaned and classified once and remembered."""

    def __init__(self, rules: TagRules):
        self.rules = rules
        self.template = rules.template
        self.lowercase = rules.template == "anima"
        exact = [tag_key(t) for t in rules.exclude if "*" not in t]
        patterns = [fnmatch.translate(tag_key(t)) for t in rules.exclude if "*" in t]
        self.exclude_exact = frozenset(exact)
        self.exclude_pattern = re.compile("|".join(patterns)) if patterns else None

        self.fixed_series = [self._make(t, SERIES) for t in rules.series if t.strip()]
        self.character_series = {tag_key(c): self._make(s, SERIES) for c, s in rules.character_series.items()}
        self.fixed_artists = [self._artist(a) for a in rules.artists if a.strip().lstrip("@")]
        self.series_keys = {info.key for info in self.fixed_series} | {
            i.key for i in self.character_series.values()
        }
        self.series_keys |= {tag_key(s) for s in QUALIFIER_SERIES.values()}
        self.artist_keys = {tag_key(a.strip().lstrip("@")) for a in rules.artists}
        self.trigger = rules.trigger
        self.trigger_key = tag_key(rules.trigger) if rules.trigger else ""
        self.special_head, self.special_tail = self._fixed_special_tags()
        self._general = _TagCache(self._classify_general)
        self._characters = _TagCache(self._classify_character)

    # - one tag -
    def _make(self, tag: str, section: int) -> TagInfo:
        text = clean_tag(tag, lowercase=self.lowercase, escape=self.rules.escape)
        return TagInfo(text, tag_key(text), section)

    def _artist(self, name: str) -> TagInfo:
        """Anima writes artists `@name`; Animagine has no prefix; `none` keeps what it was given."""
        if self.template == "none":
            return self._make(name, ARTIST)
        info = self._make(name.strip().lstrip("@"), ARTIST)
        if self.template == "anima":
            info = TagInfo("@" + info.text, "@" + info.key, ARTIST)
        return info

    def _excluded(self, key: str) -> bool:
        return key in self.exclude_exact or (
            self.exclude_pattern is not None and bool(self.exclude_pattern.match(key))
        )

    def _classify_general(self, tag: str) -> TagInfo | None:
        """A tagger (or user) tag, cleaned and put in its section; None when excluded."""
        key = tag_key(tag)
        if not key or self._excluded(key):
            return None
        if key in COUNT_TAGS:
            return self._make(tag, COUNT)
        if key in self.series_keys:
            return self._make(tag, SERIES)
        if key.startswith("@") or key in self.artist_keys:
            return self._artist(tag)
        return self._make(tag, GENERAL)

    def _classify_character(self, tag: str) -> tuple[TagInfo, ...] | None:
        """A character tag, followed by the series it implies (user mapping first, then the
        qualifier table) if any; None when excluded."""
        key = tag_key(tag)
        if not key or self._excluded(key):
            return None
        series = self.character_series.get(key)
        if series is None and (match := _QUALIFIER.search(key)):
            known = QUALIFIER_SERIES.get(match.group("q").strip())
            series = self._make(known, SERIES) if known else None
        character = self._make(tag, CHARACTER)
        return (character, series) if series is not None else (character,)

    # - special tags -
    def _fixed_special_tags(self) -> tuple[list[str], list[str]]:
        """The special tags that are the same for every image, split around the per-image ones."""
        rules = self.rules
        quality = [q.strip().lower() for q in rules.quality]
        if rules.template == "anima":
            head = year_tags(rules.year, "anima") if rules.year is not None else []
            return head + quality, []
        head = year_tags(rules.year) if rules.year is not None else []
        return head, quality

    def special_tags(self, rating: str, aesthetic: float | None) -> list[str]:
        """Per image: Anima `year N, period, quality, score_N, rating`; Animagine/none
        `rating, year, aesthetic, quality` (the order the prompt builder writes them)."""
        if self.template == "anima":
            tags = list(self.special_head)
            if self.rules.score is not None:
                tags.append(f"score_{self.rules.score}")
            elif aesthetic is not None:
                tags.append(anima_score_tag(aesthetic))
            if rating:
                tags.append(rating)
            return tags
        tags = [rating] if rating else []
        tags += self.special_head
        if aesthetic is not None:
            tags.append(aesthetic_tag(aesthetic))
        return tags + self.special_tail

    def rating(self, result: TagResultLike) -> str:
        if self.rules.rating or not (self.rules.rating_from_tagger and result.rating):
            return self.rules.rating
        return WD_RATING_TO_MODEL.get(result.rating[0]) or rating_tag(result.rating[0])

    # - one image -
    def tag_infos(self, result: TagResultLike) -> list[TagInfo]:
        """The image's tags, cleaned and classified, in the tagger's order (characters, each
        followed by its implied series, then general tags), excluded ones dropped."""
        characters, general = self._characters, self._general
        infos = [
            info for tag, _ in result.characters if (entry := characters[tag]) is not None for info in entry
        ]
        infos += [info for tag, _ in result.general if (info := general[tag]) is not None]
        return infos

    def parts(self, result: TagResultLike) -> CaptionParts:
        infos = self.tag_infos(result)
        sections: tuple[list[TagInfo], ...] = ([], [], list(self.fixed_series), list(self.fixed_artists), [])
        for info in infos:
            sections[info.section].append(info)
        return CaptionParts(sections, self.rating(result))

    def build(self, result: TagResultLike, aesthetic: float | None) -> list[str]:
        infos = self.tag_infos(result)
        special = self.special_tags(self.rating(result), aesthetic)
        if self.template == "none":
            body = infos + self.fixed_series + self.fixed_artists
        else:  # a stable sort keeps the tagger's order (and the rules' own tags first) in each section
            body = sorted(self.fixed_series + self.fixed_artists + infos, key=_SECTION)
        head, tail = (special, []) if self.template == "anima" else ([], special)
        trigger = [self.trigger] if self.trigger else []

        # Fast path: no repeats anywhere (the usual case); otherwise keep each tag's first occurrence.
        keys = [info.key for info in body]
        fixed_keys = [self.trigger_key] * len(trigger) + [_special_key(t) for t in head + tail]
        all_keys = set(keys)
        all_keys.update(fixed_keys)
        if len(all_keys) == len(keys) + len(fixed_keys):
            return trigger + head + [info.text for info in body] + tail
        out: list[str] = []
        seen: set[str] = set()
        for key, text in zip(fixed_keys[: len(trigger) + len(head)], trigger + head):
            if key not in seen:
                seen.add(key)
                out.append(text)
        for info in body:
            if info.key not in seen:
                seen.add(info.key)
                out.append(info.text)
        for tag in tail:
            key = _special_key(tag)
            if key not in seen:
                seen.add(key)
                out.append(tag)
        return out


_SECTION = operator.attrgetter("section")


class _TagCache(dict):
    """tag -> its cleaned, classified form, computed on first sight (bounded)."""

    def __init__(self, compute):
        super().__init__()
        self._compute = compute

    def __missing__(self, tag: str):
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        value = self[tag] = self._compute(tag)
        return value


# --- building a caption -----------------------------------------------------------------------


def caption_parts(result: TagResultLike, rules: TagRules) -> CaptionParts:
    """One image's tags sorted into sections (for grounding natural-language captions)."""
    return rules.compiled().parts(result)


def build_caption(result: TagResultLike, rules: TagRules, aesthetic_score: float | None = None) -> list[str]:
    """The caption's tags for one image, in order; write it with `join_caption` (", "-joined).
    `aesthetic_score` (0..1, e.g. from `AestheticScorer`) overrides the rules' dataset-wide one.

    Layout: trigger; for Anima the special tags; count, character, series, artist, general (or
    the tagger's order for `none`); for Animagine/none the special tags; repeats dropped."""
    aesthetic = aesthetic_score if aesthetic_score is not None else rules.aesthetic_score
    return rules.compiled().build(result, aesthetic)


# --- existing captions ------------------------------------------------------------------------


def merge_existing(
    existing_tags: Sequence[str], new_tags: Sequence[str], policy: str = "skip", trigger: str = ""
) -> list[str] | None:
    """Combine an image's existing caption with new tags. None means: leave the file alone.

    skip: an image that already has tags is not touched (new tags only for an empty caption);
    append: existing, then new; prepend: new, then existing; overwrite: new only.
    Duplicates are dropped (first occurrence kept). A given `trigger` is moved to the front.
    """
    if policy not in EXISTING_POLICIES:
        raise ConfigError(
            f"unknown existing-caption policy {policy!r}; choose one of: {', '.join(EXISTING_POLICIES)}"
        )
    existing = [t.strip() for t in existing_tags if t.strip()]
    new = [t.strip() for t in new_tags if t.strip()]
    if policy == "skip" and existing:
        return None
    merged = {"skip": new, "overwrite": new, "append": existing + new, "prepend": new + existing}[policy]
    merged = dedupe_tags(merged)
    if trigger.strip():
        key = tag_key(trigger)
        merged = [trigger.strip()] + [t for t in merged if tag_key(t) != key]
    return merged


# --- aesthetic scores -------------------------------------------------------------------------


class AestheticScorer:
    """An image-classification aesthetic model run through transformers'
    `pipeline("image-classification")`; the score of an image is the probability of the model's
    positive label (`hq` for aesthetic-shadow, `aesthetic` for cafe_aesthetic, ...), in 0..1.

    The model loads on first use (or `load()`); `unload()` frees it. Give `positive_label` when
    the model's labels are not among `POSITIVE_LABELS`.
    """

    POSITIVE_LABELS = ("aesthetic", "hq", "high quality", "good", "positive")

    def __init__(
        self, model: str | Path, positive_label: str | None = None, device: str = "cpu", batch_size: int = 8
    ):
        self.model = str(model)
        self.positive_label = positive_label
        self.device = device
        self.batch_size = batch_size
        self._pipe: Any = None
        self._label: str | None = None

    def load(self) -> None:
        if self._pipe is not None:
            return
        from transformers import pipeline

        try:
            pipe = pipeline("image-classification", model=self.model, device=self.device)
        except OSError as exc:
            raise ModelNotFoundError(
                f"cannot load the aesthetic model {self.model!r}: {exc}. Give a local folder, or download "
                "it first (the app may be offline)."
            ) from exc
        self._label = self._resolve_label(list(pipe.model.config.id2label.values()))
        self._pipe = pipe

    def _resolve_label(self, labels: list[str]) -> str:
        by_lower = {label.lower(): label for label in labels}
        if self.positive_label is not None:
            if self.positive_label.lower() not in by_lower:
                raise ConfigError(
                    f"the aesthetic model {self.model!r} has no label {self.positive_label!r}; "
                    f"its labels: {labels}"
                )
            return by_lower[self.positive_label.lower()]
        for candidate in self.POSITIVE_LABELS:
            if candidate in by_lower:
                return by_lower[candidate]
        raise StudioError(
            f"cannot tell which label of {self.model!r} means 'aesthetic' (labels: {labels}); "
            "set the positive label in the captioning settings"
        )

    def score(self, images: Sequence[Any]) -> list[float]:
        """Aesthetic scores in 0..1 for PIL images or image paths, in order."""
        self.load()
        inputs = [str(i) if isinstance(i, Path) else i for i in images]
        outputs = self._pipe(inputs, top_k=None, batch_size=self.batch_size)
        return [float(next((o["score"] for o in out if o["label"] == self._label), 0.0)) for out in outputs]

    def unload(self) -> None:
        self._pipe = None
