"""What goes out as files by their path (the Hub bundle, the CivitAI bundle) and the folders a dry
run or a CivitAI export writes, each as a whole (built beside it, renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from studio.errors import ConfigError
from studio.paths import Resolver
from studio.publish.card import (
    RECOMMENDED_WEIGHT,
    BaseModelInfo,
    concepts_section,
    evaluation_section,
    training_rows,
)
from studio.publish.run import RunSummary

MARKER = ".studio-publish.json"  # in a folder a dry run wrote: the next one may replace it


@dataclass(frozen=True)
class BundleFile:
    path: str  # where it goes, relative (POSIX)
    source: Path | None = None  # a file on disk, sent as it is
    data: bytes | None = None  # or generated content

    @property
    def size(self) -> int:
        return self.source.stat().st_size if self.source is not None else len(self.data or b"")


def hub_bundle(summary: RunSummary, card: str) -> list[BundleFile]:
    return [BundleFile(summary.checkpoint.name, source=summary.checkpoint),
            BundleFile("README.md", data=card.encode("utf-8")),
            *(BundleFile(f"samples/{s.path.name}", source=s.path) for s in summary.samples)]


def civitai_bundle(summary: RunSummary, base: BaseModelInfo) -> list[BundleFile]:
    """What CivitAI's upload takes and A1111/Forge read beside a LoRA: the file, previews that keep
    their A1111 infotext (CivitAI reads the PNG "parameters" chunk) with the same text in a .txt,
    `<name>.preview.png` (the card picture), `<name>.json` (A1111's activation text and preferred
    weight) and description.md with the triggers, base model, weight and settings."""
    name, stem = summary.checkpoint.name, summary.checkpoint.stem
    files = [BundleFile(name, source=summary.checkpoint)]
    for number, sample in enumerate(summary.samples, 1):
        files += [BundleFile(f"previews/{number:02d}.png", source=sample.path),
                  BundleFile(f"previews/{number:02d}.txt", data=sample.infotext.encode("utf-8"))]
    if summary.samples:
        files.append(BundleFile(f"{stem}.preview.png", source=summary.samples[0].path))
    words = ", ".join(summary.triggers)
    user_metadata = {"description": f"LoRA for {base.label}, trained with Anime LoRA Studio",
                     "sd version": "SDXL" if summary.family == "sdxl" else "Unknown", "activation text": words,
                     "preferred weight": RECOMMENDED_WEIGHT, "notes": f"run {summary.run_dir.name}"}
    files.append(BundleFile(f"{stem}.json", data=json.dumps(user_metadata, indent=2).encode("utf-8")))
    lines = [f"# {stem}", "", f"**Base model:** {base.label}" + (f" ({base.hub_id})" if base.hub_id else ""),
             f"**Trigger words:** {words or '(none)'}", f"**Recommended weight:** {RECOMMENDED_WEIGHT:.1f}", ""]
    lines += concepts_section(summary) + evaluation_section(summary)
    lines += ["## Training settings", ""] + [f"- {label}: {value}" for label, value in training_rows(summary, base)]
    files.append(BundleFile("description.md", data=("\n".join(lines) + "\n").encode("utf-8")))
    return files


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # a checkpoint may be large: share its data (files are replaced, never edited)
    except OSError:
        shutil.copy2(source, target)


def write_folder(files: list[BundleFile], target: Path, marker: dict) -> Path:
    """Write the bundle to `target` as a whole: built in a hidden sibling, then renamed into place.
    A folder an earlier publish wrote is replaced; any other non-empty folder is refused."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())):
        raise ConfigError(f"{target} exists and was not written by a publish: choose another folder or empty it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for item in files:
            if item.path.startswith("/") or ".." in PurePosixPath(item.path).parts:
                raise ValueError(f"unsafe bundle path {item.path!r}")  # never from a request: a bug
            dest = tmp / item.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(item.source, dest) if item.source is not None else dest.write_bytes(item.data or b"")
        (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def output_folder(resolver: Resolver, value: str, default: Path, what: str) -> Path:
    """Where a folder is written: `default` (inside the run), or a path the caller may write to
    (inside the workspace for a request; anywhere on the command line)."""
    if not value.strip():
        return default
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() if resolver.owner else resolver.workspace) / path
    if not resolver.allowed(path, (resolver.workspace,)):
        raise resolver.refusal(what, value, "name a folder inside the workspace")
    return path.absolute()
