"""Undo history for caption edits, kept on disk in `<dataset>/.studio/undo/` so that it survives a
restart. Before an edit writes anything, the bytes of every caption file it will change (or the
fact that the file did not exist) are saved in one JSON snapshot, written atomically; undo puts
exactly those bytes back, deleting files the edit created. An edit that crashes halfway is undone
the same way."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from studio.errors import DatasetError
from studio.fileio import atomic_write_bytes, atomic_write_text

UNDO_DIR = Path(".studio") / "undo"
FORMAT = 1


@dataclass(frozen=True)
class FileSnapshot:
    rel: str  # posix path relative to the dataset root
    before: bytes | None  # None: the file did not exist
    after_sha256: str | None  # what the edit wrote (None: the edit deleted the file)


@dataclass(frozen=True)
class UndoEntry:
    id: int
    op: str  # "add_tags", "remove_tags", "replace_tag", "regex_replace", "write_tags"...
    description: str
    time: float
    files: tuple[FileSnapshot, ...]


@dataclass(frozen=True)
class UndoResult:
    entry: UndoEntry
    restored: tuple[str, ...]
    # Files changed again after the edit (by another program): restored anyway, but say so.
    edited_since: tuple[str, ...]


def sha256_or_none(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


class UndoStore:
    def __init__(self, root: Path, max_entries: int = 200):
        self.root = Path(root)
        self.dir = self.root / UNDO_DIR
        self.max_entries = max_entries

    def record(self, op: str, description: str, files: list[FileSnapshot]) -> UndoEntry:
        """Save a snapshot before the edit writes; the oldest snapshots beyond the limit go."""
        ids = self._ids()
        entry = UndoEntry(id=(ids[-1] + 1) if ids else 1, op=op, description=description,
                          time=time.time(), files=tuple(files))
        atomic_write_text(self._path(entry.id), json.dumps(_to_json(entry)))
        for old in ids[: max(0, len(ids) + 1 - self.max_entries)]:
            self._path(old).unlink(missing_ok=True)
        return entry

    def history(self) -> list[UndoEntry]:
        """Every snapshot, oldest first."""
        return [self._load(i) for i in self._ids()]

    def last(self) -> UndoEntry | None:
        ids = self._ids()
        return self._load(ids[-1]) if ids else None

    def undo_last(self) -> UndoResult | None:
        """Restore the files of the newest snapshot and drop it; None when there is nothing to undo.
        If a restore fails midway the snapshot stays, so undo can be run again."""
        entry = self.last()
        if entry is None:
            return None
        edited_since = []
        for snap in entry.files:
            path = self._target(snap.rel)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            if sha256_or_none(current) != snap.after_sha256:
                edited_since.append(snap.rel)
            if snap.before is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, snap.before)
        self._path(entry.id).unlink()
        return UndoResult(entry, tuple(s.rel for s in entry.files), tuple(edited_since))

    # -- storage ---------------------------------------------------------------------------
    def _ids(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit())

    def _path(self, entry_id: int) -> Path:
        return self.dir / f"{entry_id:06d}.json"

    def _load(self, entry_id: int) -> UndoEntry:
        path = self._path(entry_id)
        try:
            return _from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"undo snapshot {path} is unreadable ({exc}): delete it to undo older edits") from None

    def _target(self, rel: str) -> Path:
        """The file a snapshot names, refused if it would lie outside the dataset (a hand-edited
        snapshot must not write elsewhere)."""
        pure = PurePosixPath(rel)
        parts = re.split(r"[\\/]", rel)
        if pure.is_absolute() or ".." in parts or not rel or re.match(r"^[A-Za-z]:", rel):
            raise DatasetError(f"undo snapshot names {rel!r}, outside the dataset: refusing to restore it")
        return self.root.joinpath(*pure.parts)


def _to_json(entry: UndoEntry) -> dict:
    return {
        "format": FORMAT,
        "id": entry.id,
        "op": entry.op,
        "description": entry.description,
        "time": entry.time,
        "files": [
            {"path": f.rel, "after_sha256": f.after_sha256,
             "before": None if f.before is None else base64.b64encode(f.before).decode("ascii")}
            for f in entry.files
        ],
    }


def _from_json(data: dict) -> UndoEntry:
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown format {data.get('format')!r}")
    files = tuple(
        FileSnapshot(rel=f["path"], after_sha256=f["after_sha256"],
                     before=None if f["before"] is None else base64.b64decode(f["before"], validate=True))
        for f in data["files"]
    )
    return UndoEntry(id=int(data["id"]), op=data["op"], description=data["description"],
                     time=float(data["time"]), files=files)
