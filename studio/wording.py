"""Small helpers for messages people read: "an Anima LoRA", "1 file", "3 files"."""

from __future__ import annotations


def a(word: str) -> str:
    """`word` with its indefinite article: "an Anima", "a SDXL"... by the first letter, as said
    aloud ("an SDXL" is how it is read: S is "ess")."""
    first = word.strip()[:1]
    vowel_sound = (first.lower() in "aeio" or word.strip().lower().startswith("un")
                   or (first.isupper() and first in "FHLMNRSX" and word.strip()[1:2].isupper()))
    return f"{'an' if vowel_sound else 'a'} {word}"


def count(number: int, singular: str, plural: str | None = None) -> str:
    """"1 file", "2 files"."""
    return f"{number} {singular if number == 1 else (plural or singular + 's')}"
