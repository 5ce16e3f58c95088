"""Presets: small files of settings merged over defaults.

A preset is sparse: it names only the settings that differ from the defaults, so a shipped preset
stays short and keeps working when a new setting (with its default) is added. Tables nest the way
the settings do (`[rules]`, `[nl]` for captioning).

    store = PresetStore("caption", user_root=workspace / "presets")
    store.names()                          # shipped presets first, then the user's
    values = store.load("anima", defaults)  # the preset merged over `defaults`
    store.save("my style", values, defaults)  # writes only what differs from `defaults`

Shipped presets live in `presets/<kind>/` of the project and are never written; the user's own
go to `<workspace>/presets/<kind>/`, written atomically. Presets are read from `.toml` (and
`.yaml`/`.yml`, when PyYAML is installed) and written as TOML. This module checks the file's
shape, not its meaning: the caller validates the merged values into its config object.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import ConfigError
from studio.fileio import atomic_write_text

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "presets"
SUFFIXES = (".toml", ".yaml", ".yml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    shipped: bool


class PresetStore:
    """The presets of one kind ("caption", "train", ...): shipped ones and the user's."""

    def __init__(self, kind: str, user_root: Path, shipped_root: Path = SHIPPED_DIR):
        self.kind = kind
        self.shipped_dir = Path(shipped_root) / kind
        self.user_dir = Path(user_root) / kind

    def list(self) -> list[Preset]:
        """Shipped presets (by name), then the user's; a user file named like a shipped preset
        is hidden by it."""
        shipped = _presets_in(self.shipped_dir, shipped=True)
        taken = {p.name.lower() for p in shipped}
        return shipped + [p for p in _presets_in(self.user_dir, shipped=False) if p.name.lower() not in taken]

    def names(self) -> list[str]:
        return [p.name for p in self.list()]

    def find(self, name: str) -> Preset:
        name = (name or "").strip()
        for preset in self.list():
            if preset.name == name:
                return preset
        known = ", ".join(self.names()) or "none yet"
        raise ConfigError(f"no {self.kind} preset named {name!r} (known: {known})")

    def read(self, name: str) -> dict:
        """The preset's own (sparse) settings."""
        return read_preset_file(self.find(name).path)

    def load(self, name: str, defaults: dict) -> dict:
        """The preset merged over `defaults`."""
        preset = self.find(name)
        return merge(defaults, read_preset_file(preset.path), where=str(preset.path))

    def save(self, name: str, values: dict, defaults: dict) -> Path:
        """Write the settings of `values` that differ from `defaults` as the user's preset `name`
        (replacing an older user preset of that name). Shipped presets are never overwritten."""
        name = check_name(name)
        if any(p.name.lower() == name.lower() for p in _presets_in(self.shipped_dir, shipped=True)):
            raise ConfigError(f"{name!r} is a shipped {self.kind} preset and cannot be overwritten: "
                              "save under another name")
        path = self.user_dir / f"{name}.toml"
        for other in (self.user_dir / f"{name}{suffix}" for suffix in SUFFIXES[1:]):
            if other.exists():
                raise ConfigError(f"{other} already holds a preset named {name!r}: pick another name")
        header = f"# {self.kind} preset {name!r}: only what differs from the defaults\n"
        atomic_write_text(path, header + dumps_toml(sparse(values, defaults)))
        return path


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not _NAME.match(name) or name.endswith("."):
        raise ConfigError(f"preset name {name!r} is not usable: use up to 64 letters, digits, spaces, "
                          "'-', '_' or '.', starting with a letter or digit")
    return name


def _presets_in(folder: Path, shipped: bool) -> list[Preset]:
    if not folder.is_dir():
        return []
    found: dict[str, Preset] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in SUFFIXES and path.is_file() and not path.name.startswith("."):
            found.setdefault(path.stem, Preset(path.stem, path, shipped))
    return sorted(found.values(), key=lambda p: p.name.lower())


# -- reading and merging ---------------------------------------------------------------------


def read_preset_file(path: Path) -> dict:
    """A preset file's settings; a ConfigError that names the file when it cannot be parsed."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".toml":
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        else:
            data = _read_yaml(path)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and yaml.YAMLError are ValueErrors here
        raise ConfigError(f"cannot read the preset {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the preset {path} must hold settings (key = value), not a {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path} is a YAML preset but PyYAML is not installed: pip install pyyaml, "
                          "or write the preset as TOML") from None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def merge(defaults: dict, overrides: dict, where: str = "preset") -> dict:
    """`overrides` laid over `defaults`: tables merge key by key, anything else replaces. A table
    given where the default is a plain value (or the other way round) is refused."""
    merged = dict(defaults)
    for key, value in overrides.items():
        default = defaults.get(key)
        if isinstance(default, dict) and default and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table of settings ([{key}]), not {value!r}")
        if isinstance(value, dict) and key in defaults and not isinstance(default, dict):
            raise ConfigError(f"{where}: {key} must be a single value, not a table")
        merged[key] = merge(default, value, f"{where}: {key}") if isinstance(default, dict) and default else value
    return merged


def sparse(values: dict, defaults: dict) -> dict:
    """The part of `values` that differs from `defaults` (tables compared key by key)."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and default:
            if inner := sparse(value, default):
                out[key] = inner
        elif key not in defaults or value != default:
            out[key] = value
    return out


# -- writing TOML ------------------------------------------------------------------------------
# The subset presets need: strings, booleans, numbers, lists of those, and nested tables.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps_toml(data: dict) -> str:
    """`data` as TOML that `tomllib` reads back equal. None has no TOML form: leave such keys out."""
    lines = _table_lines(data, ())
    return "\n".join(lines).strip("\n") + "\n" if lines else ""


def _table_lines(data: dict, path: tuple[str, ...]) -> list[str]:
    plain = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = []
    if path and (plain or not tables):
        lines += ["", "[" + ".".join(_key(k) for k in path) + "]"]
    for key, value in plain.items():
        lines.append(f"{_key(key)} = {_value(value, (*path, key))}")
    for key, value in tables.items():
        lines += _table_lines(value, (*path, key))
    return lines


def _key(key: str) -> str:
    key = str(key)
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any, path: tuple[str, ...]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _multiline(value) if "\n" in value else _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, path) for v in value) + "]"
    if isinstance(value, dict):  # inside a list: an inline table (e.g. datasets = [{ path = "..." }])
        items = (f"{_key(k)} = {_value(v, (*path, str(k)))}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(items) + " }"
    where = ".".join(path)
    if value is None:
        raise ConfigError(f"{where} has no value (None), which a TOML preset cannot hold")
    raise ConfigError(f"{where}: a preset cannot hold a {type(value).__name__}")


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _multiline(text: str) -> str:
    """Readable multi-line text (NL prompt templates) as a literal '''...''' string when it can be
    one exactly; a basic string with escapes otherwise."""
    controls = any((ord(c) < 0x20 and c not in "\n\t") or ord(c) == 0x7F for c in text)
    if "'''" in text or text.endswith("'") or "\r" in text or controls:
        return _string(text)
    return "'''\n" + text + "'''"  # the newline right after the opening quotes is not part of the text
