"""Model references: what a name typed in the UI or CLI points at.

A reference is one of: a catalog name from presets/models.toml, a local diffusers folder, a single
.safetensors checkpoint, or a Hugging Face hub repo id. `resolve_reference` turns it into a
ModelSource without loading anything heavy.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from studio.errors import ModelNotFoundError, UnsafeCheckpointError

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SourceKind = Literal["hub", "folder", "single_file", "demo"]
SELF_RESOLVING = ("tagger", "vlm")  # families whose own resolver knows their names and layouts


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    label: str
    family: str
    source: str
    demo: bool = False
    defaults: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and what family of pipeline loads them."""

    name: str  # what the user called it; used in infotext "Model:"
    family: str  # "sdxl"
    kind: SourceKind
    location: str  # hub repo id, folder, file, or demo variant
    vae: str | None = None  # optional separate VAE (folder, file or repo id)
    config: str | None = None  # for single files: a diffusers folder/repo holding the configs
    defaults: dict = field(default_factory=dict)
    demo: bool = False

    @property
    def key(self) -> str:
        return f"{self.family}:{self.kind}:{self.location}:{self.vae or ''}"


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    path = path or PRESETS_DIR / "models.toml"
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    return {name: CatalogEntry(name=name, **values) for name, values in raw.items()}


def check_not_pickle(path: Path) -> None:
    """Refuse checkpoints that would need unpickling: they can run arbitrary code."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path.name} is a pickle checkpoint ({path.suffix}); loading it could run arbitrary code. "
            "Use the model's .safetensors file instead (most model pages offer one)."
        )


def resolve_reference(
    ref: str,
    catalog: dict[str, CatalogEntry],
    *,
    vae: str | None = None,
    family: str = "sdxl",
) -> ModelSource:
    """Turn a model reference into a ModelSource. Loads nothing; checks only what is cheap."""
    ref = ref.strip()
    if not ref:
        raise ModelNotFoundError("no model given: pick one from the list or type a path or hub id")
    if family in SELF_RESOLVING:
        # taggers and VLMs resolve their own names, folders and repo ids when materialized
        local = Path(ref).expanduser()
        return ModelSource(local.name or ref, family, "folder" if local.is_dir() else "hub", ref, demo=ref.startswith("demo-"))
    if ref in catalog:
        entry = catalog[ref]
        kind: SourceKind = "demo" if entry.source.startswith("demo:") else "hub"
        location = entry.source.removeprefix("demo:") if kind == "demo" else entry.source
        return ModelSource(ref, entry.family, kind, location, vae, None, dict(entry.defaults), entry.demo)
    path = Path(ref).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        check_not_pickle(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but not a diffusers model (no model_index.json). Point at the "
                "folder that holds model_index.json, or at a single .safetensors checkpoint."
            )
        return ModelSource(path.name, family, "folder", str(path.resolve()), vae)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"checkpoint file not found: {path}")
        return ModelSource(path.stem, family, "single_file", str(path.resolve()), vae)
    if HUB_ID.match(ref) and not path.exists():
        return ModelSource(ref.split("/")[-1], family, "hub", ref, vae)
    raise ModelNotFoundError(
        f"{ref!r} is not a catalog model ({', '.join(catalog)}), an existing diffusers folder, "
        "a .safetensors file, or a hub repo id like 'cagliostrolab/animagine-xl-3.1'."
    )
