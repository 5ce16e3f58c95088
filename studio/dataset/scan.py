"""Scanning a dataset folder: its layout, every image with its header size and caption files, and
every problem found, file by file, without stopping at the first.

Layout, as kohya sd-scripts reads a train_data_dir:
- a root holding repeat folders (`10_alice/`, `3_outfit/`) is a kohya dataset: each folder is a
  subset seen <repeats> times per epoch; images directly in the root are skipped (kohya ignores
  them), other folders are reported as ignored;
- otherwise the root itself is the only subset, repeats 1 (a flat folder).
Nothing deeper is scanned. Hidden files and folders (`.studio/` holds the undo history) are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from studio.dataset.captions import MAX_CAPTION_BYTES, caption_too_large, decode_caption, encoding_note, split_tags
from studio.dataset.config import ScanOptions
from studio.dataset.images import (
    DECODE_ERRORS,
    ImageHeader,
    find_damage,
    is_image_name,
    mode_notes,
    read_header,
)
from studio.dataset.model import (
    NL_SUFFIX,
    TAGS_SUFFIX,
    DatasetItem,
    Layout,
    Problem,
    ScanReport,
    Subset,
    parse_repeat_folder,
)
from studio.errors import DatasetError

ProgressFn = Callable[[int, int], None]  # (done, total); may raise JobStopped to stop the scan


@dataclass
class _Folder:
    path: Path
    subset: str  # name on disk, "" for a flat dataset
    name: str
    repeats: int
    images: list[Path] = field(default_factory=list)
    texts: set[str] = field(default_factory=set)


def scan_dataset(root: str | Path, options: ScanOptions | None = None,
                 on_progress: ProgressFn | None = None) -> ScanReport:
    # 1. Check the root
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    options = options or ScanOptions()
    problems: list[Problem] = []
    # 2. Find the subsets: kohya repeat folders, or the root itself
    layout, folders = _find_folders(root, problems)
    # 3. List each folder's images and caption files
    for folder in folders:
        _list_folder(root, folder, problems, nested=layout == "kohya")
    # 4. Read each image's header and check it; attach its captions
    total = sum(len(folder.images) for folder in folders)
    items: list[DatasetItem] = []
    done = 0
    for folder in folders:
        kept = []
        for image in folder.images:
            item = _scan_image(root, folder, image, options, problems)
            if item is not None:
                kept.append(item)
            done += 1
            if on_progress is not None and (done % 64 == 0 or done == total):
                on_progress(done, total)
        _report_caption_conflicts(folder, kept, problems)
        items.extend(kept)
    # 5. Summarise the subsets
    subsets = tuple(
        Subset(folder=f.subset, name=f.name, repeats=f.repeats,
               images=sum(1 for item in items if item.subset == f.subset))
        for f in folders
    )
    return ScanReport(root=root, layout=layout, items=tuple(items), problems=tuple(problems), subsets=subsets)


def scan_headers(paths: Iterable[str | Path], options: ScanOptions | None = None
                 ) -> list[tuple[Path, ImageHeader | None, list[Problem]]]:
    """Header and integrity check of loose files (no folder layout, no captions): the scan's inner
    loop, usable by a benchmark."""
    options = options or ScanOptions()
    return [(Path(p), *inspect_image(Path(p), options)) for p in paths]


def inspect_image(path: Path, options: ScanOptions) -> tuple[ImageHeader | None, list[Problem]]:
    """The image's header, or None and why it must be skipped; plus warnings for kept images."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return None, [Problem(path, "empty file (0 bytes)", "skip", "empty")]
            return _inspect_open(path, fh, size, options)
    except OSError as exc:  # permission denied, I/O error, vanished since the listing
        return None, [Problem(path, f"cannot be read: {exc.strerror or exc}", "skip", "unreadable")]


def _inspect_open(path: Path, fh, size: int, options: ScanOptions) -> tuple[ImageHeader | None, list[Problem]]:
    try:
        im = Image.open(fh)
    except Image.DecompressionBombError as exc:
        return None, [Problem(path, f"declared size too large to decode safely (not decoded): {exc}",
                              "skip", "too_large")]
    except UnidentifiedImageError:
        return None, [Problem(path, "not an image: Pillow cannot identify it (wrong extension or damaged "
                                    "header)", "skip", "not_image")]
    except DECODE_ERRORS as exc:
        return None, [Problem(path, f"damaged header: {exc}", "skip", "corrupt")]
    with im:
        header = read_header(im)
        if header.pixels > options.max_pixels:
            reason = (f"declares {header.width}x{header.height} ({header.pixels / 1e6:,.0f} MP), over the "
                      f"{options.max_pixels / 1e6:,.0f} MP limit (a decompression bomb or a huge scan): "
                      "not decoded; downscale it")
            return None, [Problem(path, reason, "skip", "too_large")]
        damage = find_damage(im, fh, size, options.check)
    if damage is not None:
        if "truncat" in damage.lower():
            return None, [Problem(path, f"truncated: the image data is cut short ({damage})", "skip", "truncated")]
        return None, [Problem(path, f"damaged image data: {damage}", "skip", "corrupt")]
    return header, [Problem(path, message, "warning", kind) for kind, message in mode_notes(header)]


# -- layout ----------------------------------------------------------------------------------


def _find_folders(root: Path, problems: list[Problem]) -> tuple[Layout, list[_Folder]]:
    root_real = os.path.realpath(root)
    try:
        entries = [e for e in _sorted_entries(root) if not e.name.startswith(".")]
    except OSError as exc:
        raise DatasetError(f"cannot list the dataset folder {root}: {exc.strerror or exc}") from None
    dirs = [e for e in entries if _is_dir(e)]
    repeat_dirs = [(e, parse_repeat_folder(e.name)) for e in dirs if parse_repeat_folder(e.name)]
    if not repeat_dirs:
        for entry in dirs:
            problems.append(_ignored_folder(entry, "a flat dataset is not scanned recursively; name it like "
                                                   f"10_{entry.name} and move loose images into one too"))
        return "flat", [_Folder(root, "", "", 1)]
    folders = []
    for entry, (repeats, name) in repeat_dirs:
        if entry.is_symlink() and not _inside(root_real, entry.path):
            problems.append(Problem(Path(entry.path), "symlink to a folder outside the dataset", "skip",
                                    "symlink_outside"))
        elif repeats < 1:
            problems.append(_ignored_folder(entry, "0 repeats: kohya skips it; rename it with a count >= 1"))
        else:
            folders.append(_Folder(Path(entry.path), entry.name, name, repeats))
    for entry in dirs:
        if parse_repeat_folder(entry.name) is None:
            problems.append(_ignored_folder(entry, f"not a repeat folder: rename it like 10_{entry.name}"))
    for entry in entries:
        if not _is_dir(entry) and is_image_name(entry.name):
            problems.append(Problem(Path(entry.path), "image beside repeat folders: kohya ignores it; move it "
                                                      "into a repeat folder", "skip", "loose_image"))
    return "kohya", folders


def _list_folder(root: Path, folder: _Folder, problems: list[Problem], nested: bool) -> None:
    root_real = os.path.realpath(root)
    try:
        entries = _sorted_entries(folder.path)
    except OSError as exc:
        problems.append(Problem(folder.path, f"folder cannot be listed: {exc.strerror or exc}", "skip",
                                "unreadable"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if _is_dir(entry):
            if nested:
                problems.append(_ignored_folder(entry, "folders inside a repeat folder are not scanned"))
            continue
        if entry.name.endswith(TAGS_SUFFIX):
            folder.texts.add(entry.name)
        if not is_image_name(entry.name):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            if not os.path.exists(entry.path):
                problems.append(Problem(path, "broken symlink", "skip", "broken_symlink"))
                continue
            if not _inside(root_real, entry.path):
                problems.append(Problem(path, "symlink to a file outside the dataset: copy the file in instead",
                                        "skip", "symlink_outside"))
                continue
        folder.images.append(path)


def _scan_image(root: Path, folder: _Folder, image: Path, options: ScanOptions,
                problems: list[Problem]) -> DatasetItem | None:
    header, found = inspect_image(image, options)
    problems.extend(found)
    if header is None:
        return None
    stem = image.name.rsplit(".", 1)[0]
    tags_path = folder.path / (stem + TAGS_SUFFIX)
    nl_path = folder.path / (stem + NL_SUFFIX)
    for path in (tags_path, nl_path):
        if path.name in folder.texts and (size := _file_size(path)) > MAX_CAPTION_BYTES:
            problems.append(Problem(image, f"{path.name}: {caption_too_large(size)}", "skip", "caption_too_large"))
            return None
    has_tags = tags_path.name in folder.texts and _check_caption(tags_path, problems, tags=True)
    has_nl = nl_path.name in folder.texts and _check_caption(nl_path, problems, tags=False)
    return DatasetItem(
        image=image, rel=image.relative_to(root).as_posix(), width=header.width, height=header.height,
        repeats=folder.repeats, subset=folder.subset, tags_path=tags_path, nl_path=nl_path,
        has_tags=has_tags, has_nl=has_nl, format=header.format, mode=header.mode,
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_caption(path: Path, problems: list[Problem], tags: bool) -> bool:
    """Report captions that are unreadable, not UTF-8 or empty; True if the file exists."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    except OSError as exc:
        problems.append(Problem(path, f"caption cannot be read: {exc.strerror or exc}", "warning", "caption_unreadable"))
        return True
    text, encoding = decode_caption(data)
    note = encoding_note(encoding)
    if note is not None:
        problems.append(Problem(path, note, "warning", "caption_encoding"))
    if not (split_tags(text) if tags else text.strip()):
        problems.append(Problem(path, "empty caption file: kohya refuses it; write a caption or delete it",
                                "warning", "caption_empty"))
    return True


def _report_caption_conflicts(folder: _Folder, kept: list[DatasetItem], problems: list[Problem]) -> None:
    """Images sharing a stem share caption files; captions with no image are likely leftovers."""
    first_by_stem: dict[str, str] = {}
    for item in kept:
        stem = item.image.name.rsplit(".", 1)[0]
        if stem in first_by_stem:
            problems.append(Problem(item.image, f"shares its caption files with {first_by_stem[stem]} "
                                                "(same name, other extension): rename one", "warning",
                                    "caption_shared"))
        else:
            first_by_stem[stem] = item.image.name
    stems = {image.name.rsplit(".", 1)[0] for image in folder.images}
    for name in sorted(folder.texts):
        stem = name[: -len(TAGS_SUFFIX)]
        if stem not in stems and not (name.endswith(NL_SUFFIX) and stem[: -len("_nl")] in stems):
            problems.append(Problem(folder.path / name, "caption without an image", "warning",
                                    "orphan_caption"))


# -- helpers ---------------------------------------------------------------------------------


def _natural_key(name: str) -> list[object]:
    """'img2.png' sorts before 'img10.png'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def _sorted_entries(path: Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: _natural_key(e.name))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _inside(root_real: str, path: str) -> bool:
    target = os.path.realpath(path)
    return os.path.commonpath([root_real, target]) == root_real


def _ignored_folder(entry: os.DirEntry[str], why: str) -> Problem:
    return Problem(Path(entry.path), f"folder ignored: {why}", "warning", "ignored_folder")
