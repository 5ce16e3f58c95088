"""Model folders people already have: ComfyUI's `models/` (checkpoints, diffusion_models, loras, vae) and
A1111/Forge's `models/` (Stable-diffusion, Lora, VAE), given with `--model-dir` / STUDIO_MODEL_DIRS.
Their `.safetensors` files are listed beside the workspace's own, under their absolute paths, and
are only ever read (the resolver in studio.paths allows reading them; nothing writes there).

A `--model-dir` may be the tool's `models/` folder or one of its kind folders itself
(`ComfyUI/models/loras`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from studio.fileio import inside

Kind = Literal["checkpoint", "lora", "vae"]
# kind -> {folder name: the tool whose layout uses it}
KIND_FOLDERS: dict[str, dict[str, str]] = {
    # diffusion_models (older ComfyUI: unet) holds diffusion models without their text encoder and
    # VAE, such as Anima's DiT (its companions are found in text_encoders/ and vae/ when loaded)
    "checkpoint": {"checkpoints": "ComfyUI", "diffusion_models": "ComfyUI", "unet": "ComfyUI",
                   "Stable-diffusion": "A1111/Forge"},
    "lora": {"loras": "ComfyUI", "Lora": "A1111/Forge", "LyCORIS": "A1111/Forge"},
    "vae": {"vae": "ComfyUI", "VAE": "A1111/Forge"},
}
MAX_FILES = 2000  # per folder: a huge tree is listed in part, never walked whole
MAX_DEPTH = 4  # ComfyUI users sort LoRAs into subfolders


def kind_folders(model_dirs, kind: Kind) -> list[tuple[Path, str]]:
    """(folder, tool) of each folder of `kind` among the model dirs."""
    found = []
    for root in model_dirs:
        root = Path(root)
        for name, tool in KIND_FOLDERS[kind].items():
            if root.name == name and root.is_dir():
                found.append((root, tool))
            elif (root / name).is_dir():
                found.append((root / name, tool))
    return found


def model_files(model_dirs, kind: Kind) -> list[tuple[str, str]]:
    """(label, absolute path) of every .safetensors file of `kind` in the model dirs, sorted by
    label; labels say where a file comes from (`mychar.safetensors · ComfyUI`). Files that lead
    out of their folder through a link are left out (the resolver would refuse them)."""
    files = []
    for folder, tool in kind_folders(model_dirs, kind):
        count = 0
        for dirpath, dirnames, filenames in os.walk(folder):
            depth = len(Path(dirpath).relative_to(folder).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < MAX_DEPTH else []
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not name.lower().endswith(".safetensors") or name.startswith("."):
                    continue
                if not inside(path, folder):
                    continue
                files.append((f"{path.relative_to(folder).as_posix()} · {tool}", str(path.resolve())))
                count += 1
                if count >= MAX_FILES:
                    break
            if count >= MAX_FILES:
                break
    return sorted(files)
