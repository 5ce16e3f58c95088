"""Caption sampling during training: the caption one sample trains with at one step.

The loop builds one `CaptionSampler` from the run's caption config (`CaptionSampler.from_config`)
and calls `sample(tags, nl, rng)` for every sample of every step, with a `random.Random` it seeds
per step and sample, so an exact resume redraws exactly the same captions. `tags` is the image's
tag list as the dataset reads it (`split_tags` of `<stem>.txt`: commas and line breaks separate),
`nl` the text of `<stem>_nl.txt` ("" when there is none).

Two schemes:

kohya (`KohyaCaptionConfig`), sd-scripts' semantics (library/train_util.py, `process_caption`, and
docs/config_README-en.md), in kohya's order:
  1. `caption_prefix` / `caption_suffix` are glued to the caption text with a space, as kohya does
     (so write the comma yourself: `caption_prefix = "masterpiece, "`);
  2. whole-caption dropout: one draw, the caption becomes "" with probability
     `caption_dropout_rate`; also every `caption_dropout_every_n_epochs`-th epoch (epochs counted
     from 1, as kohya does);
  3. the caption splits into a fixed head, a body and a fixed tail. With the `|||` separator
     (`keep_tokens_separator`) in the text, the head is everything before the first `|||` and
     `keep_tokens` is ignored (the separator wins); text after a second `|||` is a fixed tail that
     stays last, as in kohya's own example `1girl, hatsune miku, vocaloid ||| stage, microphone,
     white shirt, smile ||| best quality, rating: general`. A third `|||` is refused (kohya would
     leave it inside a tail tag and train on the literal `|||`). Without a separator the head is
     the first `keep_tokens` tags;
  4. the body is shuffled (`shuffle_caption`);
  5. each body tag is then dropped independently with probability `caption_tag_dropout_rate`
     (head and tail never are);
  6. head + body + tail are joined with ", ".
  Given the same `random.Random` state, the draws are kohya's (one `random()` for the caption
  dropout when its rate is above 0, `shuffle(body)`, one `random()` per body tag).
  Deviations, all on purpose: the separators are removed even when nothing is random (kohya then
  passes the text through untouched, `|||` included, to the text encoder); empty tags are dropped
  and whitespace normalised; line breaks separate tags (the studio's caption files) where kohya
  would read only the first line; no wildcards, secondary separator or token warm-up. The NL
  caption is not used by this scheme (kohya reads one caption file).

mixed (`MixedCaptionConfig`), the natural-language/tag scheme Anima LoRAs are trained with, as in
the Anima support of diffusion-pipe forks (bluvoll/diffusion-pipe models/anima.py: default weights
tags 50, nl 10, tags_nl 20, nl_tags 20; a fixed fraction of tag dropout, rounded; at least 3 tags
left; `{stem}_nl.txt`; tags and NL joined with ". "), per sample and step:
  1. whole-caption dropout with probability `caption_dropout_rate` (default 0);
  2. a variant is drawn by weight among the variants the image can make: `tags`, `nl`, `tags_nl`
     (tags, separator, NL) and `nl_tags` (NL, separator, tags). An image without an NL caption
     can only make `tags`, so the weights renormalise to tags = 100% (nl, tags_nl and nl_tags all
     become tags); an image with NL but no tags trains on its NL. When every variant the image can
     make has weight 0 (e.g. an NL-only run and an image without NL), it falls back to its tags
     (or its NL when it has no tags);
  3. when the variant uses tags: the first `keep_first` tags (trigger, character, series,
     @artist) stay first, in order, and are never dropped; `protected_tags` (compared ignoring
     case, `_`/space and escaping) are never dropped and keep their places; the other tags, the
     droppable ones, are shuffled among their own places (`shuffle_tags`), then exactly
     round(tag_dropout * droppable) of them are dropped (Python's round: halves go to even), fewer
     when that would leave under `min_tags` tags in all;
  4. when the variant uses NL and `shuffle_sentences` is on: sentences (split after `.`, `!` or
     `?` followed by whitespace, punctuation kept) after the first are shuffled; the first
     sentence, which names the character and series, stays first;
  5. parts are joined with `nl_separator` (default ". ", as diffusion-pipe; "\n" also works);
     when the first part already ends a sentence the separator's own full stop is left out, so
     NL then tags reads "A girl smiles. 1girl, solo", not "smiles.. 1girl".

Captions that change from step to step cannot use cached text-encoder outputs:
`varies_per_step` says whether they can, `cache_refusal_reason()` gives the user the reason, and
`static_caption(tags, nl)` is the one caption each image has when nothing varies.
"""

from __future__ import annotations

import functools
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from studio.captioning.tag_rules import tag_key
from studio.dataset.captions import join_tags, split_tags
from studio.errors import ConfigError, DatasetError

Variant = Literal["tags", "nl", "tags_nl", "nl_tags"]
VARIANTS: tuple[Variant, ...] = ("tags", "nl", "tags_nl", "nl_tags")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_key = functools.lru_cache(maxsize=65536)(tag_key)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KohyaCaptionConfig(_Config):
    """kohya sd-scripts' caption options, same names and meaning."""

    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0)
    keep_tokens_separator: str = "|||"  # "" turns it off
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout_every_n_epochs: int | None = Field(None, ge=1)
    caption_prefix: str = ""  # glued with a space: end it with ", "
    caption_suffix: str = ""  # glued with a space: start it with ", "

    @field_validator("keep_tokens_separator")
    @classmethod
    def _separator(cls, value: str) -> str:
        if re.search(r"[,\n\r]", value) or (value and not value.strip()):
            raise ValueError(f"keep_tokens_separator {value!r} must be visible text without commas, "
                             "e.g. '|||'")
        return value


class MixedCaptionConfig(_Config):
    """Mixed natural-language/tag captions (Anima LoRAs); field names as TrainConfig.mixed_captions."""

    weight_tags: float = Field(50, ge=0)
    weight_nl: float = Field(10, ge=0)
    weight_tags_nl: float = Field(20, ge=0)
    weight_nl_tags: float = Field(20, ge=0)
    tag_dropout: float = Field(0.3, ge=0, le=1)  # a fixed fraction of the droppable tags
    keep_first: int = Field(1, ge=0)  # trigger, character, series, @artist stay first
    protected_tags: list[str] = []  # never dropped, never moved
    # the run's concept triggers and the dataset's character tags join protected_tags (the trainer
    # adds them: a multi-character LoRA never trains a caption that lost its character's name)
    protect_concepts: bool = False
    min_tags: int = Field(3, ge=0)  # tag dropout never leaves fewer
    shuffle_tags: bool = True  # the droppable tags only
    shuffle_sentences: bool = False  # the first sentence stays first
    nl_separator: str = Field(". ", min_length=1)
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)  # whole caption -> "" (for CFG)

    @model_validator(mode="after")
    def _some_weight(self) -> MixedCaptionConfig:
        if sum(self.weights().values()) <= 0:
            raise ValueError("every variant weight is 0: give tags, nl, tags_nl or nl_tags a weight "
                             "(default 50/10/20/20)")
        return self

    def weights(self) -> dict[Variant, float]:
        return {"tags": self.weight_tags, "nl": self.weight_nl, "tags_nl": self.weight_tags_nl,
                "nl_tags": self.weight_nl_tags}


class _NoRandom:
    """Stands in for the RNG where a caption must not depend on chance."""

    def __getattr__(self, name: str):
        raise RuntimeError(f"internal error: a static caption asked the RNG for {name}()")


class CaptionSampler(ABC):
    """Turns an image's tags and NL caption into the caption of one sample at one step."""

    @staticmethod
    def from_config(config: KohyaCaptionConfig | MixedCaptionConfig) -> CaptionSampler:
        if isinstance(config, KohyaCaptionConfig):
            return KohyaCaptionSampler(config)
        if isinstance(config, MixedCaptionConfig):
            return MixedCaptionSampler(config)
        raise TypeError(f"no caption sampler for {type(config).__name__}")

    @abstractmethod
    def sample(
        self, tags: Sequence[str], nl: str | None, rng: random.Random, *, epoch: int | None = None
    ) -> str:
        """The caption for this step. `epoch` (counted from 1) is needed only by kohya's
        caption_dropout_every_n_epochs."""

    @abstractmethod
    def variation_causes(self) -> list[str]:
        """The settings that make captions change from step to step (empty: they never do)."""

    def caption_problem(self, tags: Sequence[str]) -> str | None:
        """Why this caption cannot be sampled (checked up front by the loop), or None."""
        return None

    @property
    def varies_per_step(self) -> bool:
        return bool(self.variation_causes())

    def cache_refusal_reason(self) -> str | None:
        causes = self.variation_causes()
        if not causes:
            return None
        return (f"text-encoder output caching is off: the captions change from step to step "
                f"({', '.join(causes)}); turn those off to cache")

    def static_caption(self, tags: Sequence[str], nl: str | None) -> str:
        """The image's only caption when nothing varies (what the text-encoder cache encodes)."""
        if self.varies_per_step:
            raise ConfigError(self.cache_refusal_reason())
        return self.sample(tags, nl, _NoRandom(), epoch=1)  # type: ignore[arg-type]


# --- kohya ------------------------------------------------------------------------------------


class KohyaCaptionSampler(CaptionSampler):
    def __init__(self, config: KohyaCaptionConfig):
        self.config = config

    def variation_causes(self) -> list[str]:
        c = self.config
        causes = ["shuffle_caption"] if c.shuffle_caption else []
        if c.caption_tag_dropout_rate > 0:
            causes.append("caption_tag_dropout_rate")
        if c.caption_dropout_rate > 0:
            causes.append("caption_dropout_rate")
        if c.caption_dropout_every_n_epochs:
            causes.append("caption_dropout_every_n_epochs")
        return causes

    def sample(
        self, tags: Sequence[str], nl: str | None, rng: random.Random, *, epoch: int | None = None
    ) -> str:
        c = self.config
        # kohya's order: prefix/suffix -> whole-caption dropout -> head|body|tail -> shuffle the
        # body -> drop body tags one coin each -> join with ", ".
        text = self._with_prefix_suffix(tags)
        dropped = c.caption_dropout_rate > 0 and rng.random() < c.caption_dropout_rate
        if c.caption_dropout_every_n_epochs:
            if epoch is None or epoch < 1:
                raise ValueError(
                    f"caption_dropout_every_n_epochs needs the epoch counted from 1, got {epoch!r}")
            dropped = dropped or epoch % c.caption_dropout_every_n_epochs == 0
        if dropped:
            return ""
        head, body, tail = self._split(text)
        if c.shuffle_caption:
            rng.shuffle(body)
        if c.caption_tag_dropout_rate > 0:
            body = [tag for tag in body if rng.random() >= c.caption_tag_dropout_rate]
        return join_tags(head + body + tail)

    def caption_problem(self, tags: Sequence[str]) -> str | None:
        return self._separator_problem(self._with_prefix_suffix(tags))

    def _separator_problem(self, text: str) -> str | None:
        separator = self.config.keep_tokens_separator
        count = text.count(separator) if separator else 0
        if count > 2:
            return (f"the caption has {count} {separator!r} separators; at most two are allowed "
                    f"(kept head {separator} shuffled body {separator} kept tail): {text[:120]!r}")
        return None

    def _with_prefix_suffix(self, tags: Sequence[str]) -> str:
        c = self.config
        text = join_tags(list(tags))
        if c.caption_prefix:
            text = c.caption_prefix + " " + text
        if c.caption_suffix:
            text = text + " " + c.caption_suffix
        return text

    def _split(self, text: str) -> tuple[list[str], list[str], list[str]]:
        """(head, body, tail): kohya's fixed tokens, flex tokens and fixed suffix tokens."""
        separator = self.config.keep_tokens_separator
        if separator and separator in text:
            parts = text.split(separator)
            if len(parts) > 3:
                raise DatasetError(self._separator_problem(text))
            head, body = split_tags(parts[0]), split_tags(parts[1])
            tail = split_tags(parts[2]) if len(parts) == 3 else []
            return head, body, tail
        tokens = split_tags(text)
        keep = self.config.keep_tokens
        return tokens[:keep], tokens[keep:], []


# --- mixed NL / tags --------------------------------------------------------------------------


def fixed_dropout_count(total: int, droppable: int, fraction: float, min_tags: int) -> int:
    """How many tags the mixed scheme drops: round(fraction * droppable), capped so that at least
    `min_tags` of the `total` tags remain."""
    return max(0, min(round(fraction * droppable), droppable, total - min_tags))


def split_sentences(text: str) -> list[str]:
    """'A girl. She smiles! Why?' -> ['A girl.', 'She smiles!', 'Why?']: split after . ! or ?
    followed by whitespace. (An abbreviation such as 'Mr. X' splits too.)"""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def join_parts(first: str, second: str, separator: str) -> str:
    """first + separator + second, skipping an empty part, without a doubled full stop."""
    if not first or not second:
        return first or second
    if first[-1] in ".!?" and separator[0] in ".!?":
        separator = separator.lstrip(".!?") or " "
    return first + separator + second


class MixedCaptionSampler(CaptionSampler):
    def __init__(self, config: MixedCaptionConfig):
        self.config = config
        self._protected = frozenset(_key(t) for t in config.protected_tags if t.strip())

    def variation_causes(self) -> list[str]:
        c = self.config
        weights = c.weights()
        weighted = [v for v in VARIANTS if weights[v] > 0]
        causes = [f"mixed variants {'/'.join(weighted)}"] if len(weighted) > 1 else []
        if c.caption_dropout_rate > 0:
            causes.append("caption_dropout_rate")
        if c.shuffle_tags:
            causes.append("shuffle_tags")
        if c.tag_dropout > 0:
            causes.append("tag_dropout")
        if c.shuffle_sentences and any(weights[v] > 0 for v in ("nl", "tags_nl", "nl_tags")):
            causes.append("shuffle_sentences")
        return causes

    def sample(
        self, tags: Sequence[str], nl: str | None, rng: random.Random, *, epoch: int | None = None
    ) -> str:
        c = self.config
        # Order: whole-caption dropout -> variant -> tags (shuffle droppable, drop a fixed
        # fraction) -> NL (sentence shuffle) -> join. Only the parts the variant uses draw numbers.
        if c.caption_dropout_rate > 0 and rng.random() < c.caption_dropout_rate:
            return ""
        tags = [t.strip() for t in tags if t.strip()]
        nl = (nl or "").strip()
        variant = self.choose_variant(bool(tags), bool(nl), rng)
        tag_text = join_tags(self.process_tags(tags, rng)) if "tags" in variant else ""
        nl_text = self.process_nl(nl, rng) if "nl" in variant else ""
        if variant == "nl_tags":
            return join_parts(nl_text, tag_text, c.nl_separator)
        return join_parts(tag_text, nl_text, c.nl_separator)

    def choose_variant(self, has_tags: bool, has_nl: bool, rng: random.Random) -> Variant:
        """A variant by weight among those the image can make (see the module docstring)."""
        both = has_tags and has_nl
        can_make = {"tags": has_tags, "nl": has_nl, "tags_nl": both, "nl_tags": both}
        weights = self.config.weights()
        candidates = [(v, weights[v]) for v in VARIANTS if can_make[v] and weights[v] > 0]
        if not candidates:
            return "tags" if has_tags or not has_nl else "nl"
        if len(candidates) == 1:
            return candidates[0][0]
        point = rng.random() * sum(w for _, w in candidates)
        for variant, weight in candidates:
            point -= weight
            if point < 0:
                return variant
        return candidates[-1][0]  # only reached through float rounding

    def process_tags(self, tags: list[str], rng: random.Random) -> list[str]:
        """Head kept, droppable tags shuffled among their places, a fixed fraction dropped."""
        c = self.config
        head = min(c.keep_first, len(tags))
        slots = [i for i in range(head, len(tags)) if _key(tags[i]) not in self._protected]
        out = list(tags)
        if c.shuffle_tags and len(slots) > 1:
            droppable = [tags[i] for i in slots]
            rng.shuffle(droppable)
            for i, tag in zip(slots, droppable):
                out[i] = tag
        count = fixed_dropout_count(len(tags), len(slots), c.tag_dropout, c.min_tags)
        if count:
            dropped = set(rng.sample(slots, count))
            out = [tag for i, tag in enumerate(out) if i not in dropped]
        return out

    def process_nl(self, nl: str, rng: random.Random) -> str:
        """The NL caption, its sentences after the first shuffled when asked."""
        if not self.config.shuffle_sentences:
            return nl
        sentences = split_sentences(nl)
        if len(sentences) < 3:
            return nl
        rest = sentences[1:]
        rng.shuffle(rest)
        return " ".join([sentences[0], *rest])
