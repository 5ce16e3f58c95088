"""Where a model named in a request may come from. Anyone who reaches the app may send any string,
so a model, VAE, tagger or VLM reference from the UI, the API or a training config is one of:
a catalog name (or another name the caller knows), a Hugging Face repo id, or a path that lies
inside the workspace once `..` and symlinks are resolved. Anything else is refused with one
message that says nothing about whether the path exists."""

from __future__ import annotations

from pathlib import Path

from studio.errors import ConfigError
from studio.fileio import inside
from studio.models.catalog import HUB_ID


def model_reference(value: str | None, names, workspace: Path, what: str = "model",
                    model_dirs: tuple[Path, ...] = ()) -> str:
    """`value` as the loaders should receive it: a known name or a repo id unchanged, a path as
    its resolved absolute path inside `workspace` or one of the `model_dirs` the person running
    the app configured (--model-dir: e.g. their ComfyUI or A1111 model folders, only read).
    `names`: the names that need no path."""
    value = (value or "").strip()
    if not value or value in names:
        return value
    path = Path(value).expanduser()
    local = path if path.is_absolute() else workspace / path
    if any(inside(local, root) for root in (workspace, *model_dirs)) and local.exists():
        return str(local.resolve())
    hub_like = HUB_ID.match(value) and ".." not in value.split("/") and not path.is_absolute()
    if hub_like and not path.exists():  # not also a folder of that name beside the app
        return value
    known = f"one of {', '.join(sorted(names))}, " if names else ""
    raise ConfigError(
        f"{what} {value!r} is not usable: name {known}a Hugging Face repo id (owner/name), or a file or folder "
        f"inside the workspace ({workspace}), e.g. in {workspace / 'models'}"
    )
