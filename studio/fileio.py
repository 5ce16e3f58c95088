"""Writes that matter go to a temporary file in the same folder and are renamed into place, so a
crash never leaves half a file: readers see the old file or the new one, nothing in between."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from studio.errors import write_error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (fsynced), on error it
    is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        raise (write_error(path, exc) or exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_new_numbered(folder: Path, name_for: Callable[[int], str], write: Callable[[Path], None],
                       start: int = 0) -> Path:
    """Write a new file `folder/name_for(n)` for the first n >= `start` whose name is free, and
    never replace an existing file: the content is written to a temporary file first, the name is
    claimed by exclusive creation (so two writers never get the same one), then the content is
    renamed onto it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".new.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        number = start
        while True:
            target = folder / name_for(number)
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                number += 1
                continue
            os.replace(tmp, target)
            return target
    except Exception as exc:
        raise (write_error(folder / name_for(start), exc) or exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


STALE_TEMPORARY_SECONDS = 15 * 60  # older than any save in progress (another process may be saving)


def remove_stale_temporaries(root: Path, older_than: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Remove what interrupted atomic writes left under `root`: the hidden `.<name>.*.tmp` files
    and folders of atomic_path, write_new_numbered, atomic_folder and checkpoints, once they are
    older than `older_than` seconds. Returns what was removed."""
    import shutil
    import time

    root = Path(root)
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than
    removed = []
    for path in list(root.rglob(".*.tmp")):
        try:
            if path.is_symlink() or path.lstat().st_mtime > cutoff:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: leave it
    return removed


def read_jsonl(path: Path) -> list[dict]:
    """The records of a file we append JSON lines to (events.jsonl). A line that does not parse,
    such as the torn last line that a full disk or a kill leaves, is skipped and reported on
    stderr; the rest is read."""
    import json
    import sys

    records, torn = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn.append(number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(number)
    if torn:
        print(f"warning: {path}: skipped {len(torn)} unreadable line(s) ({', '.join(map(str, torn[:5]))}), "
              "e.g. a write cut short by a full disk or a kill; the rest is intact", file=sys.stderr)
    return records


def inside(path: Path, root: Path) -> bool:
    """Whether `path` (resolved, symlinks followed) lies in `root`."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


COMPLETE_MARKER = ".demo-complete.json"  # written last into a folder built by write_complete_folder


def folder_is_complete(folder: Path, version: int) -> bool:
    """The marker is written last, so its presence (with the current version) means complete."""
    import json

    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("version") == version


def write_complete_folder(folder: Path, fill, marker: dict) -> Path:
    """Build `folder` in a temporary sibling (`fill(tmp)` writes the files), write `marker` (with
    its "version") last, then rename it into place. A half-written or outdated folder is replaced;
    one that another process completed meanwhile is kept."""
    import json
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        fill(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        if folder_is_complete(folder, marker["version"]):
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process renamed its copy in between
            if not folder_is_complete(folder, marker["version"]):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
