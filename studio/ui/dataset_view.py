"""What the Caption tab shows of a dataset: gallery entries (cached thumbnails, the first tags as
captions), and the tables: problems, subsets, tag frequency, undo history, buckets. Formatters of
caption runs and edits too. No gradio here: tables are pandas DataFrames, the tab displays them."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from studio.captioning.run import CaptionRunReport
from studio.dataset.buckets import BucketPreview
from studio.dataset.dataset import Dataset, EditResult
from studio.dataset.images import load_rgb
from studio.dataset.model import DatasetItem, ScanReport
from studio.dataset.undo import UndoEntry, UndoResult
from studio.errors import DatasetError
from studio.fileio import atomic_path

MAX_GALLERY = 200  # images shown at once; a filter narrows a bigger dataset
THUMB_SIDE = 384
THUMB_DIR = Path(".studio") / "thumbs"  # hidden: the scan ignores it
CAPTION_CHARS = 90


# -- gallery -------------------------------------------------------------------------------------


def thumbnail(root: Path, item: DatasetItem, side: int = THUMB_SIDE) -> Path:
    """A small JPEG of the image under <dataset>/.studio/thumbs, made once per version of the file
    (the name hashes path, size and modification time). The original when it cannot be decoded."""
    try:
        stat = item.image.stat()
    except OSError:
        return item.image
    key = hashlib.sha1(f"{item.rel}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    path = root / THUMB_DIR / f"{key}.jpg"
    if path.exists():
        return path
    try:
        image = load_rgb(item.image, draft_size=(side, side))
    except DatasetError:
        return item.image
    image.thumbnail((side, side))
    with atomic_path(path) as tmp:
        image.save(tmp, "JPEG", quality=85)
    return path


def gallery_caption(tags: Sequence[str], has_nl: bool) -> str:
    """'[NL] mychar, 1girl, solo, …': the gallery shows one line, so the NL mark comes first."""
    text = ", ".join(tags) if tags else "(no tags)"
    if len(text) > CAPTION_CHARS:
        text = text[: CAPTION_CHARS - 1].rsplit(", ", 1)[0] + ", …"
    return ("[NL] " if has_nl else "") + text


def gallery_entries(dataset: Dataset, items: Sequence[DatasetItem]) -> list[tuple[str, str]]:
    """(thumbnail path, caption) per item, in order."""
    return [(str(thumbnail(dataset.root, item)), gallery_caption(dataset.read_tags(item), item.nl_path.exists()))
            for item in items]


def gallery_info(dataset: Dataset, shown: int, matching: int, filtered: bool) -> str:
    items = dataset.items
    tagged = sum(item.tags_path.exists() for item in items)
    described = sum(item.nl_path.exists() for item in items)
    text = f"**{len(items)} images** · {tagged} with tags · {described} with NL captions"
    if filtered:
        text += f" · **filter: {matching} match**"
    if shown < matching:
        text += f" · showing the first {shown}: filter to see the others"
    return text


def captions_signature(items: Iterable[DatasetItem]) -> tuple:
    """Changes when any caption file is written, removed or replaced (one stat per file)."""
    return tuple(_mtime(path) for item in items for path in (item.tags_path, item.nl_path))


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


# -- tables --------------------------------------------------------------------------------------


def scan_markdown(report: ScanReport, folder: str) -> str:
    lines = [f"**{folder}**: {report.summary()}"]
    if report.layout == "kohya":
        lines.append("Repeat folders: " + ", ".join(
            f"`{s.folder}` ({s.images} images × {s.repeats})" for s in report.subsets))
    if not report.items:
        lines.append("No images yet: upload images or a zip.")
    return "  \n".join(lines)


def problems_table(report: ScanReport) -> pd.DataFrame:
    rows = [(_relative(p.path, report.root), p.reason, p.severity) for p in report.problems]
    return pd.DataFrame(rows, columns=["file", "reason", "severity"])


def frequency_table(frequency: Sequence[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame(list(frequency), columns=["tag", "images"])


def history_table(entries: Sequence[UndoEntry]) -> pd.DataFrame:
    rows = [(e.id, time.strftime("%H:%M:%S", time.localtime(e.time)), e.description) for e in reversed(entries)]
    return pd.DataFrame(rows, columns=["#", "time", "edit"])


def bucket_tables(preview: BucketPreview, items: Sequence[DatasetItem]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bucket, images, samples per epoch) rows, and (image, size, bucket) per image."""
    buckets = pd.DataFrame(preview.table(), columns=["bucket", "images", "samples per epoch"])
    rows = []
    for item in items:
        assignment = preview.assignments.get(item.rel)
        bucket = f"{assignment.bucket[0]}x{assignment.bucket[1]}" if assignment else "none"
        rows.append((item.rel, f"{item.width}x{item.height}", bucket))
    return buckets, pd.DataFrame(rows, columns=["image", "size", "bucket"])


def skipped_table(run: CaptionRunReport | None) -> pd.DataFrame:
    rows = [(name, reason, "skipped") for name, reason in run.skipped] if run else []
    rows += [(name, reason, "warning") for name, reason in run.warnings] if run else []
    return pd.DataFrame(rows, columns=["file", "reason", "severity"])


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


# -- messages ------------------------------------------------------------------------------------

_COUNT_SUFFIX = re.compile(r" \(\d+ captions?\)$")


def edit_message(result: EditResult, scope: str) -> str:
    """'3 captions changed: add 'x' at the front (in the 3 filtered images)'."""
    what = _COUNT_SUFFIX.sub("", result.description)
    n = len(result.changed)
    if not n:
        return f"No caption changed: {what} ({scope})"
    return f"**{n} caption{'s' if n > 1 else ''} changed**: {what} ({scope}) · Undo reverts it"


def undo_message(result: UndoResult | None) -> str:
    if result is None:
        return "Nothing to undo."
    text = f"**Undone**: {_COUNT_SUFFIX.sub('', result.entry.description)} ({len(result.restored)} files restored)"
    if result.edited_since:
        text += (f". Note: {len(result.edited_since)} of them had been changed since by another program; "
                 "they were restored anyway")
    return text


def run_summary(run: CaptionRunReport) -> str:
    """The summary of a caption run with each skipped file and its reason (the API's answer)."""
    lines = [("Stopped: " if run.stopped else "Done: ") + run.summary()]
    lines += [f"skipped {name}: {reason}" for name, reason in run.skipped]
    lines += [f"warning {name}: {reason}" for name, reason in run.warnings]
    return "\n".join(lines)


def run_details(run: CaptionRunReport) -> dict:
    return {
        "images": run.images,
        "tagged": list(run.tagged),
        "kept": list(run.kept),
        "nl_written": list(run.nl_written),
        "skipped": [list(pair) for pair in run.skipped],
        "warnings": [list(pair) for pair in run.warnings],
        "stopped": run.stopped,
        "seconds": round(run.seconds, 3),
    }
