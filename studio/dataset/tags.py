"""Pure operations on one caption's tag list, used by the bulk edits, plus the dataset-wide tag
frequency table and tag filters. No file access here."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from studio.dataset.captions import split_tags

Position = Literal["front", "back"]


def add_tags(tags: list[str], new: list[str], position: Position = "front") -> list[str]:
    """Add the tags not already present, in the given order, at the front or the back."""
    missing = [tag for tag in dict.fromkeys(new) if tag not in tags]
    return missing + tags if position == "front" else tags + missing


def remove_tags(tags: list[str], remove: Iterable[str]) -> list[str]:
    gone = set(remove)
    return [tag for tag in tags if tag not in gone]


def replace_tag(tags: list[str], old: str, new: str) -> list[str]:
    """Replace `old` by `new` where it stands (an empty `new` removes it). If that changes the
    caption, duplicates are merged, the first kept: `new` may already have been there."""
    if old not in tags or old == new:
        return list(tags)
    return _dedupe([new if tag == old else tag for tag in tags])


def regex_replace_tags(tags: list[str], pattern: re.Pattern[str], replacement: str) -> list[str]:
    """`pattern.sub(replacement)` on each tag. A tag that becomes empty is removed, one that gains a
    comma becomes several; if anything changed, duplicates are merged, the first kept."""
    out: list[str] = []
    for tag in tags:
        out.extend(split_tags(pattern.sub(replacement, tag)))
    return list(tags) if out == tags else _dedupe(out)


def _dedupe(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tag for tag in tags if tag))


def tag_frequency(tag_lists: Iterable[list[str]]) -> list[tuple[str, int]]:
    """(tag, number of captions holding it), most frequent first, then alphabetical."""
    counts: Counter[str] = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    return sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))


def matches(tags: Iterable[str], all_of: Iterable[str] = (), any_of: Iterable[str] = (),
            none_of: Iterable[str] = ()) -> bool:
    """True if the caption has every tag of `all_of`, at least one of `any_of` (when given) and
    none of `none_of`."""
    present = set(tags)
    any_of = set(any_of)
    return (
        set(all_of) <= present
        and (not any_of or bool(any_of & present))
        and not (set(none_of) & present)
    )
