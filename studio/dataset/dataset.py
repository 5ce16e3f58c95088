"""`Dataset`: an open dataset folder, its last scan, its caption files and their undo history.

Every write goes through one path (`_commit`): snapshot the files it will change into the undo
store, then write each one atomically. Bulk edits take a set of items (or their `rel` paths) and
touch only the captions they actually change. Safe to call from several threads."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import regex

from studio.dataset import tags as tag_ops
from studio.dataset.buckets import BucketPreview, preview_buckets
from studio.dataset.captions import clean_tags, encode_nl, encode_tags, read_caption, split_tags
from studio.dataset.config import BucketConfig, ImportLimits, ScanOptions
from studio.dataset.dedupe import DEFAULT_MAX_DISTANCE, find_near_duplicates
from studio.dataset.importer import ImportReport, import_uploads
from studio.dataset.model import DatasetItem, Problem, ScanReport
from studio.dataset.scan import ProgressFn, scan_dataset
from studio.dataset.undo import FileSnapshot, UndoEntry, UndoResult, UndoStore, sha256_or_none
from studio.errors import DatasetError
from studio.fileio import atomic_write_bytes

ItemRef = DatasetItem | str  # an item, or its rel path
CaptionKind = Literal["tags", "nl"]


@dataclass(frozen=True)
class EditResult:
    op: str
    description: str
    changed: tuple[str, ...]  # rel paths of the images whose captions changed
    undo_id: int | None  # None when nothing changed (no snapshot taken)


REGEX_SECONDS = 5.0  # the whole of one regex bulk edit


class TimedPattern:
    """A regular expression (the `regex` package, re's syntax) whose substitutions together
    may take `seconds`; past that TimeoutError, so a backtracking pattern cannot hang the app."""

    def __init__(self, pattern: str, seconds: float):
        self.pattern = pattern
        self.compiled = regex.compile(pattern, flags=regex.VERSION0)
        self.deadline = time.monotonic() + seconds

    def sub(self, replacement: str, text: str) -> str:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return self.compiled.sub(replacement, text, timeout=left)


class Dataset:
    def __init__(self, root: str | Path, options: ScanOptions | None = None, max_undo: int = 200):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
        self.root = root
        self.options = options or ScanOptions()
        self.undo = UndoStore(root, max_undo)
        self._lock = threading.RLock()
        self._report: ScanReport | None = None
        self._items: dict[str, DatasetItem] = {}
        self._by_caption: dict[str, list[str]] = {}  # caption file rel -> rels of the images using it

    @classmethod
    def open(cls, root: str | Path, options: ScanOptions | None = None) -> Dataset:
        dataset = cls(root, options)
        dataset.scan()
        return dataset

    # -- scanning ----------------------------------------------------------------------------
    def scan(self, on_progress: ProgressFn | None = None) -> ScanReport:
        report = scan_dataset(self.root, self.options, on_progress)
        with self._lock:
            self._report = report
            self._items = {item.rel: item for item in report.items}
            self._by_caption = {}
            for item in report.items:
                for path in (item.tags_path, item.nl_path):
                    self._by_caption.setdefault(self._rel(path), []).append(item.rel)
        return report

    @property
    def report(self) -> ScanReport:
        """The last scan (scanning on first use), its items' caption flags kept current by this
        object's writes; problems are as found by that scan."""
        self._ensure_scanned()
        with self._lock:
            return replace(self._report, items=tuple(self._items.values()))

    @property
    def items(self) -> list[DatasetItem]:
        self._ensure_scanned()
        with self._lock:
            return list(self._items.values())

    def item(self, ref: ItemRef) -> DatasetItem:
        """The current item for an item or a rel path; DatasetError if the scan did not find it."""
        rel = ref.rel if isinstance(ref, DatasetItem) else ref
        self._ensure_scanned()
        with self._lock:
            try:
                return self._items[rel]
            except KeyError:
                raise DatasetError(f"{rel} is not in the dataset {self.root} (was it removed? rescan)") from None

    def _ensure_scanned(self) -> None:
        if self._report is None:
            self.scan()

    # -- captions ----------------------------------------------------------------------------
    def read_tags(self, item: ItemRef) -> list[str]:
        text = read_caption(self.item(item).tags_path)
        return split_tags(text) if text is not None else []

    def read_nl(self, item: ItemRef) -> str:
        text = read_caption(self.item(item).nl_path)
        return text.strip() if text is not None else ""

    def write_tags(self, item: ItemRef, tags: Sequence[str]) -> DatasetItem:
        """Save one caption's tags (undoable). No tags removes the file: kohya refuses empty ones."""
        item = self.item(item)
        self._commit("write_tags", f"edit the tags of {item.rel}", [(item, "tags", encode_tags(list(tags)))])
        return self.item(item)

    def write_many_tags(self, tag_lists: dict[ItemRef, Sequence[str]], description: str) -> EditResult:
        """Save several captions as ONE undoable edit (e.g. a batch of tagger results)."""
        changes = [(self.item(item), "tags", encode_tags(list(tags))) for item, tags in tag_lists.items()]
        return self._commit("write_tags", description, changes)

    def write_nl(self, item: ItemRef, text: str) -> DatasetItem:
        item = self.item(item)
        self._commit("write_nl", f"edit the caption of {item.rel}", [(item, "nl", encode_nl(text))])
        return self.item(item)

    # -- queries -----------------------------------------------------------------------------
    def tag_frequency(self, items: Iterable[ItemRef] | None = None) -> list[tuple[str, int]]:
        """(tag, number of images whose caption has it), most frequent first, then by name."""
        chosen = self.items if items is None else [self.item(i) for i in items]
        return tag_ops.tag_frequency(self.read_tags(item) for item in chosen)

    def filter(self, all_of: Iterable[str] = (), any_of: Iterable[str] = (), none_of: Iterable[str] = (),
               items: Iterable[ItemRef] | None = None) -> list[DatasetItem]:
        """Items whose tags include all of `all_of`, at least one of `any_of` (if given), none of `none_of`."""
        all_of, any_of, none_of = list(all_of), list(any_of), list(none_of)
        chosen = self.items if items is None else [self.item(i) for i in items]
        return [item for item in chosen if tag_ops.matches(self.read_tags(item), all_of, any_of, none_of)]

    # -- bulk edits (each one undoable) ------------------------------------------------------
    def add_tags(self, items: Iterable[ItemRef], tags: Sequence[str],
                 position: tag_ops.Position = "front") -> EditResult:
        new = _checked_tags(tags)
        return self._edit_tags("add_tags", f"add {_quote(new)} at the {position}", items,
                               lambda old: tag_ops.add_tags(old, new, position), create=True)

    def remove_tags(self, items: Iterable[ItemRef], tags: Sequence[str]) -> EditResult:
        gone = _checked_tags(tags)
        return self._edit_tags("remove_tags", f"remove {_quote(gone)}", items,
                               lambda old: tag_ops.remove_tags(old, gone))

    def replace_tag(self, items: Iterable[ItemRef], old: str, new: str) -> EditResult:
        old, new = old.strip(), new.strip()
        if not old:
            raise DatasetError("no tag to replace: type the tag to look for")
        encode_tags([old, new])  # refuses commas and line breaks
        return self._edit_tags("replace_tag", f"replace {old!r} by {new!r}", items,
                               lambda tags: tag_ops.replace_tag(tags, old, new))

    def rename_tag(self, old: str, new: str) -> EditResult:
        """Replace a tag everywhere in the dataset."""
        return self.replace_tag(self.items, old, new)

    def regex_replace(self, items: Iterable[ItemRef], pattern: str, replacement: str,
                      target: CaptionKind = "tags") -> EditResult:
        """`re.sub(pattern, replacement)` on each tag (target "tags") or on the whole natural-language
        caption (target "nl"). Only existing caption files are edited."""
        try:
            compiled = TimedPattern(pattern, REGEX_SECONDS)
            if target == "tags":
                return self._edit_tags(
                    "regex_replace", f"regex {pattern!r} -> {replacement!r} on tags", items,
                    lambda tags: tag_ops.regex_replace_tags(tags, compiled, replacement))
            return self._regex_replace_nl(items, compiled, replacement)
        except (re.error, regex.error, IndexError) as exc:  # raised while planning, before anything is written
            raise DatasetError(f"invalid regular expression {pattern!r} / {replacement!r}: {exc}") from None
        except TimeoutError:
            raise DatasetError(
                f"the regular expression {pattern!r} took more than {REGEX_SECONDS:.0f} s over this dataset and was "
                "stopped; nothing was changed. Patterns like (a+)+$ backtrack without end: simplify it."
            ) from None

    def _regex_replace_nl(self, items: Iterable[ItemRef], pattern: TimedPattern,
                          replacement: str) -> EditResult:
        with self._lock:
            changes = []
            for item in (self.item(i) for i in items):
                if item.nl_path.exists():
                    text = self.read_nl(item)
                    if (new := pattern.sub(replacement, text)) != text:
                        changes.append((item, "nl", encode_nl(new)))
            description = f"regex {pattern.pattern!r} -> {replacement!r} on captions"
            return self._commit("regex_replace", description, changes)

    # -- undo --------------------------------------------------------------------------------
    def undo_last(self) -> UndoResult | None:
        """Undo the newest edit (bulk or single), restoring the exact bytes; None if none is left."""
        with self._lock:
            result = self.undo.undo_last()
            if result is not None:
                self._refresh(result.restored)
            return result

    def history(self) -> list[UndoEntry]:
        return self.undo.history()

    # -- previews and imports ----------------------------------------------------------------
    def bucket_preview(self, config: BucketConfig | None = None) -> BucketPreview:
        return preview_buckets(self.items, config or BucketConfig())

    def near_duplicates(self, max_distance: int = DEFAULT_MAX_DISTANCE, on_progress: ProgressFn | None = None
                        ) -> tuple[list[list[DatasetItem]], list[Problem]]:
        """Groups of images whose perceptual hashes are within `max_distance` bits, and the images
        that could not be hashed."""
        by_path = {item.image: item for item in self.items}
        groups, problems = find_near_duplicates(list(by_path), max_distance=max_distance,
                                                on_progress=on_progress)
        return [[by_path[path] for path in group] for group in groups], problems

    def import_uploads(self, paths: Iterable[str | Path], folder: str = "",
                       limits: ImportLimits | None = None) -> ImportReport:
        """Copy uploaded images, captions and zips into the dataset (never overwriting); call
        `scan()` afterwards to see them."""
        return import_uploads(self.root, paths, folder=folder, limits=limits)

    # -- the one write path ------------------------------------------------------------------
    def _edit_tags(self, op: str, description: str, items: Iterable[ItemRef],
                   transform: Callable[[list[str]], list[str]], create: bool = False) -> EditResult:
        with self._lock:
            changes = []
            for item in (self.item(i) for i in items):
                if not create and not item.tags_path.exists():
                    continue
                old = self.read_tags(item)
                new = transform(old)
                if new != old:
                    changes.append((item, "tags", encode_tags(new)))
            return self._commit(op, description, changes)

    def _commit(self, op: str, description: str,
                changes: list[tuple[DatasetItem, CaptionKind, bytes | None]]) -> EditResult:
        with self._lock:
            planned = []
            for item, kind, new in changes:
                path = item.tags_path if kind == "tags" else item.nl_path
                before = _read_or_none(path)
                if before != new:
                    planned.append((item, path, before, new))
            if not planned:
                return EditResult(op, description, (), None)
            description = f"{description} ({len(planned)} caption{'s' if len(planned) > 1 else ''})"
            snapshots = [FileSnapshot(self._rel(path), before, sha256_or_none(new))
                         for _, path, before, new in planned]
            entry = self.undo.record(op, description, snapshots)
            for _, path, _, new in planned:
                if new is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(path, new)
            self._refresh(s.rel for s in snapshots)
            changed = tuple(dict.fromkeys(item.rel for item, *_ in planned))
            return EditResult(op, description, changed, entry.id)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _refresh(self, caption_rels: Iterable[str]) -> None:
        """Update has_tags / has_nl of the items owning these caption files."""
        for caption_rel in caption_rels:
            for rel in self._by_caption.get(caption_rel, ()):
                item = self._items[rel]
                self._items[rel] = replace(item, has_tags=item.tags_path.exists(), has_nl=item.nl_path.exists())


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _checked_tags(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str):
        tags = split_tags(tags)  # "solo, smile" typed in one box
    cleaned = clean_tags(list(tags))  # refuses tags with commas or line breaks
    if not cleaned:
        raise DatasetError("no tag given: type at least one tag")
    return cleaned


def _quote(tags: list[str]) -> str:
    return ", ".join(repr(t) for t in tags)
