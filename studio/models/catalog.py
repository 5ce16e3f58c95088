"""Model references: what a name typed in the UI or CLI points at.

A reference is one of: a catalog name from presets/models.toml, a local diffusers folder, a single
.safetensors checkpoint, or a Hugging Face hub repo id. `resolve_reference` turns it into a
ModelSource without loading anything heavy.
"""

from __future__ import annotations

import json
import re
import struct
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
# The index file of a diffusers folder: classic pipelines write model_index.json, modular
# pipelines (Anima) modular_model_index.json. Its `_class_name` says which family loads it.
INDEX_FILES = ("model_index.json", "modular_model_index.json")
FOLDER_FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "AnimaModularPipeline": "anima"}
# Tensor names only Anima's DiT has in its original (ComfyUI) layout: the LLM adapter, and the
# Cosmos-Predict2 blocks (the same names diffusers' single-file loader checks for "cosmos-2.0").
ANIMA_CHECKPOINT_MARKERS = ("llm_adapter.", "blocks.0.self_attn.q_proj.weight", "x_embedder.proj.1.weight")


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
    family: str  # "sdxl" or "anima"
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


def folder_index(folder: Path) -> Path | None:
    """The diffusers index file of `folder` (model_index.json or modular_model_index.json)."""
    for name in INDEX_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def family_of_folder(folder: Path, default: str) -> str:
    """The model family a diffusers folder's index names, or `default` when it names none we know
    (the family's loader then says what it expected)."""
    index = folder_index(folder)
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index else None
    except (OSError, ValueError, AttributeError):
        return default
    return FOLDER_FAMILIES.get(class_name, default)


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's header (8-byte length + JSON), without loading
    any tensor; [] when the header cannot be read (the loader reports a broken file)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024 * 1024:
                return []
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return []
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else []


def safetensors_shape(path: Path, key: str) -> list[int] | None:
    """The shape of tensor `key` in a .safetensors file, read from its header; None when the file
    cannot be read or has no such tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.get_slice(key).get_shape())
    except (OSError, SafetensorError):
        return None


def family_of_checkpoint(path: Path, default: str) -> str:
    """"anima" for Anima's diffusion model in its original (ComfyUI) layout, else `default`."""
    keys = safetensors_keys(path)
    if any(marker in key for key in keys for marker in ANIMA_CHECKPOINT_MARKERS):
        return "anima"
    return default


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
    if HUB_ID.match(ref) and not path.is_absolute() and path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        # owner/name is a repo id, never a folder relative to wherever the app runs: entry points
        # hand local paths over absolute (studio.paths). A catalog model typed by its repo id
        # belongs to that entry's family (an Anima repo id must not go to the SDXL loader).
        family = next((e.family for e in catalog.values() if e.source == ref), family)
        return ModelSource(ref.split("/")[-1], family, "hub", ref, vae)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        check_not_pickle(path)
    if path.is_dir():
        if folder_index(path) is None:
            raise ModelNotFoundError(
                f"{path} is a folder but not a diffusers model (no model_index.json or "
                "modular_model_index.json). Point at the folder that holds it, or at a single "
                ".safetensors checkpoint."
            )
        return ModelSource(path.name, family_of_folder(path, family), "folder", str(path.resolve()), vae)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"checkpoint file not found: {path}")
        return ModelSource(path.stem, family_of_checkpoint(path, family), "single_file", str(path.resolve()), vae)
    raise ModelNotFoundError(
        f"{ref!r} is not a catalog model ({', '.join(catalog)}), an existing diffusers folder, "
        "a .safetensors file, or a hub repo id like 'cagliostrolab/animagine-xl-3.1'."
    )
