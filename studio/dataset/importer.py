"""Bringing files into a dataset folder: uploaded images and caption files, and zip archives.

Rules:
- Nothing lands outside the dataset: a zip entry with an absolute name, a drive letter, a `..`
  component or a symlink makes the whole archive refused before anything is written; so does an
  archive over the file-count or uncompressed-size limit. Destination folders that are symlinks
  leading outside the dataset are refused too.
- Nothing is overwritten: an incoming image whose name is taken (by a file, by another image with
  the same stem, or by caption files) is saved as `name (1).png`, together with its incoming
  captions, and the report says so.
- Each file is written to a hidden temporary file in its final folder and linked into place, so a
  crash never leaves half a file under a real name. An import that fails midway removes the files
  it had already placed: it completes, or leaves the dataset as it was.
- Only images and `.txt` captions are taken; hidden files, `__MACOSX/` and anything else are
  skipped and listed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import uuid
import zipfile
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from studio.dataset.config import ImportLimits
from studio.dataset.images import is_image_name
from studio.dataset.model import NL_SUFFIX, TAGS_SUFFIX, Problem, parse_repeat_folder
from studio.errors import DatasetError
from studio.wording import count

ProgressFn = Callable[[int, int], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportedFile:
    source: str  # the upload's file name or the zip entry's name
    path: Path  # where it was written
    renamed: bool


@dataclass(frozen=True)
class ImportReport:
    destination: Path
    imported: tuple[ImportedFile, ...]
    skipped: tuple[Problem, ...]

    @property
    def renamed(self) -> tuple[ImportedFile, ...]:
        return tuple(f for f in self.imported if f.renamed)

    def summary(self) -> str:
        text = f"{count(len(self.imported), 'file')} imported into {self.destination}"
        if self.renamed:
            shown = ", ".join(f"{Path(f.source).name} -> {f.path.name}" for f in self.renamed[:5])
            more = f" and {len(self.renamed) - 5} more" if len(self.renamed) > 5 else ""
            text += f"; {len(self.renamed)} renamed to keep existing files ({shown}{more})"
        refused = [p for p in self.skipped if p.kind == "refused"]
        if len(self.skipped) > len(refused):
            text += f"; {len(self.skipped) - len(refused)} skipped"
        for problem in refused:
            text += f"; {problem.reason}"
        return text


@dataclass
class _Incoming:
    """One file to import: where it goes (relative folder, name) and how to read it."""

    source: str
    folder: PurePosixPath
    name: str
    size: int
    open: Callable[[], BinaryIO]
    is_image: bool = False
    stem: str = ""
    part: str = ""  # what follows the stem: ".png", ".txt", "_nl.txt"


@dataclass
class _Group:
    """Files sharing a stem in one folder (an image and its captions): renamed together."""

    folder: PurePosixPath
    stem: str
    members: list[_Incoming] = field(default_factory=list)

    def accepts(self, f: _Incoming) -> bool:
        """One image per group, and no two files for the same name."""
        return not (f.is_image and any(m.is_image for m in self.members)) and all(
            m.part.lower() != f.part.lower() for m in self.members)


# -- entry points ----------------------------------------------------------------------------


def import_uploads(root: str | Path, paths: Iterable[str | Path], folder: str = "",
                   limits: ImportLimits | None = None, on_progress: ProgressFn | None = None) -> ImportReport:
    """Import uploaded files: images and captions are copied, each zip is extracted as its own
    all-or-nothing import, the rest is skipped. A refused zip does not undo the other uploads: it
    is listed in `skipped` with the reason (kind "refused")."""
    paths = [Path(p) for p in paths]
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    report = import_files(root, [p for p in paths if p not in zips], folder, limits, on_progress)
    for archive in zips:
        try:
            extracted = import_zip(root, archive, folder, limits, on_progress=on_progress)
        except DatasetError as exc:
            extracted = ImportReport(report.destination, (), (Problem(archive, str(exc), "skip", "refused"),))
        report = ImportReport(report.destination, report.imported + extracted.imported,
                              report.skipped + extracted.skipped)
    return report


def import_files(root: str | Path, paths: Iterable[str | Path], folder: str = "",
                 limits: ImportLimits | None = None, on_progress: ProgressFn | None = None) -> ImportReport:
    """Copy files (by their own names) into `root/folder`."""
    root, limits = Path(root), limits or ImportLimits()
    destination = _destination(root, folder)
    incoming, skipped = [], []
    for path in map(Path, paths):
        if not path.is_file():
            skipped.append(Problem(path, "not a file", "skip", "not_file"))
        elif not _wanted(path.name):
            skipped.append(Problem(path, "not an image or .txt caption", "skip", "unsupported"))
        else:
            incoming.append(_Incoming(path.name, PurePosixPath(), path.name, path.stat().st_size,
                                      functools.partial(path.open, "rb")))
    _check_limits(f"{len(incoming)} uploads", len(incoming), sum(f.size for f in incoming), limits, destination)
    return ImportReport(destination, _place(destination, incoming, on_progress, root), tuple(skipped))


def import_zip(root: str | Path, archive: str | Path, folder: str = "", limits: ImportLimits | None = None,
               strip_top_folder: bool = True, on_progress: ProgressFn | None = None) -> ImportReport:
    """Extract a zip's images and captions into `root/folder`, keeping its folders (so a zip of
    `10_alice/...` brings its repeat folder). A single top folder that is not a repeat folder
    (`my_dataset/...`, what zipping a folder gives) is dropped when `strip_top_folder`."""
    root, archive, limits = Path(root), Path(archive), limits or ImportLimits()
    destination = _destination(root, folder)
    try:
        with zipfile.ZipFile(archive) as zf:
            incoming, skipped = _plan_zip(zf, archive.name, limits, destination)
            if strip_top_folder:
                _strip_top_folder(incoming)
            imported = _place(destination, incoming, on_progress, root)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive.name} is not a readable zip archive ({exc})") from None
    return ImportReport(destination, imported, tuple(skipped))


# -- planning --------------------------------------------------------------------------------


def unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted, or None. Backslashes count as separators (archives
    made on Windows use them)."""
    name = info.filename
    parts = re.split(r"[\\/]", name)
    if "\x00" in name:
        return "NUL character in the name"
    if name.startswith(("/", "\\")):
        return "absolute path"
    if any(re.match(r"^[A-Za-z]:", part) for part in parts):
        return "drive letter"
    if ".." in parts:
        return "'..' leads outside the dataset"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def _plan_zip(zf: zipfile.ZipFile, label: str, limits: ImportLimits,
              destination: Path) -> tuple[list[_Incoming], list[Problem]]:
    infos = zf.infolist()
    files = [i for i in infos if not i.is_dir()]
    unsafe = [(i.filename, reason) for i in infos if (reason := unsafe_member_reason(i))]
    if unsafe:
        listed = "; ".join(f"{name!r}: {reason}" for name, reason in unsafe[:5])
        entries = "entry" if len(unsafe) == 1 else "entries"
        raise DatasetError(f"refused {label}: {len(unsafe)} unsafe {entries} ({listed}); nothing was extracted")
    _check_limits(label, len(files), sum(i.file_size for i in files), limits, destination)
    incoming, skipped = [], []
    for info in files:
        parts = info.filename.replace("\\", "/").split("/")
        parts = [p for p in parts if p not in ("", ".")]
        why = _skip_reason(parts, info)
        if why is not None:
            skipped.append(Problem(Path(info.filename), why, "skip", "unsupported"))
            continue
        incoming.append(_Incoming(info.filename, PurePosixPath(*parts[:-1]), parts[-1], info.file_size,
                                  lambda info=info: _CappedReader(zf.open(info), info.file_size, info.filename)))
    return incoming, skipped


def _skip_reason(parts: list[str], info: zipfile.ZipInfo) -> str | None:
    if not parts:
        return "empty name"
    if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return "hidden file or macOS metadata"
    if info.flag_bits & 0x1:
        return "encrypted entry"
    if os.name == "nt" and any(":" in p for p in parts):
        return "':' is not allowed in Windows file names"
    if not _wanted(parts[-1]):
        return "not an image or .txt caption"
    return None


def _strip_top_folder(incoming: list[_Incoming]) -> None:
    tops = {f.folder.parts[0] if f.folder.parts else "" for f in incoming}
    top = tops.pop() if len(tops) == 1 else ""
    if top and parse_repeat_folder(top) is None:
        for f in incoming:
            f.folder = PurePosixPath(*f.folder.parts[1:])


def _wanted(name: str) -> bool:
    return not name.startswith(".") and (is_image_name(name) or name.lower().endswith(TAGS_SUFFIX))


def _check_limits(label: str, count: int, total: int, limits: ImportLimits, destination: Path) -> None:
    if count > limits.max_files:
        raise DatasetError(f"refused {label}: {count:,} files, over the limit of {limits.max_files:,}; "
                           "split it or raise the limit in the settings")
    if total > limits.max_total_bytes:
        raise DatasetError(f"refused {label}: {total / 1e9:,.1f} GB uncompressed, over the limit of "
                           f"{limits.max_total_bytes / 1e9:,.1f} GB; split it or raise the limit")
    free = shutil.disk_usage(_existing_ancestor(destination)).free
    if total > free:
        raise DatasetError(f"refused {label}: needs {total / 1e9:,.2f} GB, only {free / 1e9:,.2f} GB free")


def _destination(root: Path, folder: str) -> Path:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    parts = [p for p in re.split(r"[\\/]", folder) if p not in ("", ".")]
    if folder.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", folder) or any(
            p == ".." or p.startswith(".") for p in parts):
        raise DatasetError(f"import folder {folder!r} must be a plain subfolder name such as '10_alice'")
    return root.joinpath(*parts)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


# -- placing ---------------------------------------------------------------------------------


def _place(destination: Path, incoming: list[_Incoming], on_progress: ProgressFn | None,
           root: Path | None = None) -> tuple[ImportedFile, ...]:
    # 1. Group each image with its incoming captions: they are renamed together
    groups = _group(incoming)
    root_real = os.path.realpath(root or destination)
    folders: dict[Path, _FolderState] = {}
    placed: list[ImportedFile] = []
    try:
        # 2. Write each group under the first stem that takes no existing name
        for group in groups:
            target = destination.joinpath(*group.folder.parts)
            if target not in folders:
                folders[target] = _FolderState.prepare(target, root_real)
            state = folders[target]
            stem = state.free_stem(group)
            for member in group.members:
                final = target / f"{stem}{member.part}"
                _write_new(member, final)
                state.add(final.name, member.is_image)
                placed.append(ImportedFile(member.source, final, renamed=stem != group.stem))
                if on_progress is not None:
                    on_progress(len(placed), len(incoming))
    except BaseException:
        # 3. A failure (or a stop) removes what this import placed: all or nothing
        for f in placed:
            f.path.unlink(missing_ok=True)
        raise
    return tuple(placed)


def _group(incoming: list[_Incoming]) -> list[_Group]:
    image_stems = {(f.folder, f.name.rsplit(".", 1)[0]) for f in incoming if is_image_name(f.name)}
    by_key: dict[tuple[PurePosixPath, str], list[_Group]] = {}
    ordered: list[_Group] = []
    for f in incoming:
        f.is_image = is_image_name(f.name)
        base, dot, ext = f.name.rpartition(".")
        f.stem, f.part = base, dot + ext
        if not f.is_image and base.endswith("_nl") and (f.folder, base) not in image_stems:
            f.stem, f.part = base[: -len("_nl")], "_nl" + dot + ext
        candidates = by_key.setdefault((f.folder, f.stem), [])
        group = next((g for g in candidates if g.accepts(f)), None)
        if group is None:
            group = _Group(f.folder, f.stem)
            candidates.append(group)
            ordered.append(group)
        group.members.append(f)
    return ordered


@dataclass
class _FolderState:
    """Lower-case names already in a destination folder (case-insensitive filesystems collide)."""

    names: set[str]
    image_stems: set[str]

    @classmethod
    def prepare(cls, folder: Path, root_real: str) -> _FolderState:
        ancestor = os.path.realpath(_existing_ancestor(folder))
        if os.path.commonpath([root_real, ancestor]) != root_real:
            raise DatasetError(f"{folder} leads outside the dataset (a symlinked folder): refused")
        folder.mkdir(parents=True, exist_ok=True)
        state = cls(set(), set())
        for name in os.listdir(folder):
            state.add(name, is_image_name(name))
        return state

    def add(self, name: str, is_image: bool) -> None:
        self.names.add(name.lower())
        if is_image:
            self.image_stems.add(name.rsplit(".", 1)[0].lower())

    def free_stem(self, group: _Group) -> str:
        has_image = any(m.is_image for m in group.members)
        for n in range(100_000):
            stem = group.stem if n == 0 else f"{group.stem} ({n})"
            names = {stem + m.part for m in group.members}
            if has_image:  # an image takes its caption names, and no other image may share its stem
                names |= {stem + TAGS_SUFFIX, stem + NL_SUFFIX}
                if stem.lower() in self.image_stems:
                    continue
            if not any(name.lower() in self.names for name in names):
                return stem
        raise DatasetError(f"no free name for {group.stem} in {group.folder}")


def _write_new(member: _Incoming, final: Path) -> None:
    """Copy into a hidden temporary file beside `final`, then link it into place: never over an
    existing file, never half a file under the real name. (No fsync: an import can be re-run from
    its source, and fsyncing 20,000 images would cost minutes.)"""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with closing(member.open()) as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise DatasetError(f"{final} appeared during the import: not overwritten") from None
        except OSError:  # no hard links on this filesystem (FAT, some network shares)
            if os.path.lexists(final):
                raise DatasetError(f"{final} appeared during the import: not overwritten") from None
            os.rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class _CappedReader:
    """A zip entry stream that refuses to yield more bytes than the entry declares (the limits are
    checked on declared sizes; a forged header must not get past them)."""

    def __init__(self, stream: BinaryIO, declared: int, name: str):
        self._stream, self._left, self._name = stream, declared, name

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._left -= len(data)
        if self._left < 0:
            raise DatasetError(f"zip entry {self._name!r} holds more data than it declares: damaged or "
                               "malicious archive, refused")
        return data

    def close(self) -> None:
        self._stream.close()
