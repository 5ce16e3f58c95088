"""The dataset's vocabulary: an item (one image and its caption files), a subset (a kohya repeat
folder), a problem found while scanning, and the scan report that holds them all.

All frozen: a scan is a snapshot. Writing a caption through `Dataset` returns a new item."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["skip", "warning"]
Layout = Literal["flat", "kohya"]

# kohya: a folder named "<repeats>_<class tokens>" (e.g. "10_alice", "3_my_char") is a subset whose
# images are seen <repeats> times per epoch. sd-scripts splits the name on "_" and reads int(first).
_REPEAT_FOLDER = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)

TAGS_SUFFIX = ".txt"
NL_SUFFIX = "_nl.txt"


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """`"10_alice"` -> `(10, "alice")`; `"alice"` -> None (not a repeat folder)."""
    match = _REPEAT_FOLDER.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or ""


@dataclass(frozen=True)
class Problem:
    """One file the scan (or an import) could not use as is. `skip`: left out of the dataset;
    `warning`: kept, but the user should know (e.g. a caption that is not UTF-8)."""

    path: Path
    reason: str
    severity: Severity
    kind: str  # short machine-readable class: "empty", "truncated", "too_large", "caption_encoding"...


@dataclass(frozen=True)
class DatasetItem:
    """One training image. `width`/`height` are the displayed size (EXIF orientation applied), read
    from the file header without decoding. `rel` is the posix path relative to the dataset root."""

    image: Path
    rel: str
    width: int
    height: int
    repeats: int
    subset: str  # the repeat folder's name on disk ("10_alice"), "" for a flat dataset
    tags_path: Path  # <stem>.txt: comma-separated booru tags
    nl_path: Path  # <stem>_nl.txt: natural-language caption
    has_tags: bool
    has_nl: bool
    format: str = ""  # Pillow's format name: PNG, JPEG, WEBP...
    mode: str = ""  # Pillow's mode as stored in the file: RGB, RGBA, P, CMYK, I;16...

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class Subset:
    """A kohya repeat folder (or the whole folder of a flat dataset)."""

    folder: str  # name on disk, "" for a flat dataset
    name: str  # kohya's class tokens: "alice" for "10_alice"
    repeats: int
    images: int


@dataclass(frozen=True)
class ScanReport:
    root: Path
    layout: Layout
    items: tuple[DatasetItem, ...]
    problems: tuple[Problem, ...]
    subsets: tuple[Subset, ...]

    @property
    def skipped(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "skip")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def samples_per_epoch(self) -> int:
        """Images times repeats: what one epoch of kohya-style training sees."""
        return sum(item.repeats for item in self.items)

    def problems_for(self, path: Path) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.path == path)

    def summary(self) -> str:
        """'120 images in 2 repeat folders (1,040 samples per epoch); 3 skipped, 5 warnings'."""
        where = f"in {len(self.subsets)} repeat folders" if self.layout == "kohya" else "(flat folder)"
        text = f"{len(self.items):,} images {where} ({self.samples_per_epoch:,} samples per epoch)"
        return f"{text}; {len(self.skipped)} skipped, {len(self.warnings)} warnings"
