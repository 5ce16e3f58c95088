"""The Caption tab's form: its fields, the form <-> CaptionConfig mapping, caption presets and the
dataset folder a form names. Pure functions (no gradio), tested without a browser.

The form is flat (`template`, `nl_backend`, ...); CaptionConfig and the preset files nest the
same settings (`rules.template`, `nl.backend`). `FIELD_PATHS` is the one table between the two."""

from __future__ import annotations

import re
from pathlib import Path

from studio.captioning.run import CaptionConfig
from studio.captioning.tagger import DEFAULT_TAGGER, DEMO_TAGGER, KNOWN_TAGGERS
from studio.dataset.captions import split_tags
from studio.errors import ConfigError
from studio.paths import Resolver
from studio.presets import PresetStore
from studio.schemas import validate
from studio.settings import Settings

# form field -> where the setting lives in CaptionConfig and in a preset
FIELD_PATHS: dict[str, tuple[str, ...]] = {
    "tagger": ("tagger",),
    "tags": ("tags",),
    "general_threshold": ("general_threshold",),
    "character_threshold": ("character_threshold",),
    "mcut": ("mcut",),
    "batch_size": ("batch_size",),
    "existing": ("existing",),
    "template": ("rules", "template"),
    "trigger": ("rules", "trigger"),
    "quality": ("rules", "quality"),
    "score": ("rules", "score"),
    "year": ("rules", "year"),
    "rating": ("rules", "rating"),
    "rating_from_tagger": ("rules", "rating_from_tagger"),
    "escape": ("rules", "escape"),
    "exclude": ("rules", "exclude"),
    "series": ("rules", "series"),
    "artists": ("rules", "artists"),
    "character_series": ("rules", "character_series"),
    "nl_backend": ("nl", "backend"),
    "nl_template": ("nl", "template"),
    "nl_existing": ("nl", "existing"),
    "nl_concurrency": ("nl", "concurrency"),
    "nl_api_key": ("nl", "api_key"),
}
CAPTION_FIELDS: tuple[str, ...] = tuple(FIELD_PATHS)
LIST_FIELDS = frozenset({"exclude", "series", "artists"})  # typed as "a, b, c"
OPTIONAL_INTS = frozenset({"score", "year"})  # blank = not set
SECRET_FIELDS = frozenset({"nl_api_key"})  # never written into a preset
TAGGER_CHOICES = [DEMO_TAGGER, *KNOWN_TAGGERS]
PAIR_ARROW = "->"


# -- form <-> settings ---------------------------------------------------------------------------


def form_to_settings(values: dict) -> dict:
    """Flat form values -> CaptionConfig's nested settings (without the dataset)."""
    settings: dict = {}
    for name, path in FIELD_PATHS.items():
        if name in values:
            _set(settings, path, _parse(name, values[name]))
    return settings


def settings_to_form(settings: dict) -> dict:
    """Nested settings (a preset, CaptionConfig.model_dump()) -> flat form values."""
    values = {}
    for name, path in FIELD_PATHS.items():
        found, value = _get(settings, path)
        if found:
            values[name] = _show(name, value)
    return values


def unshown_settings(settings: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of settings the form has no field for (a hand-written preset may set them)."""
    shown = set(FIELD_PATHS.values())
    out = []
    for key, value in settings.items():
        path = (*prefix, key)
        if path in shown:
            continue
        if isinstance(value, dict) and any(p[: len(path)] == path for p in shown):
            out += unshown_settings(value, path)
        else:
            out.append(".".join(path))
    return out


def _parse(name: str, value):
    if name in LIST_FIELDS:
        return split_tags(value or "") if isinstance(value, str) else list(value or [])
    if name == "character_series":
        return parse_pairs(value) if isinstance(value, str) else dict(value or {})
    if name in OPTIONAL_INTS:
        return None if value in (None, "") else _int(name, value)
    if name in ("batch_size", "nl_concurrency"):
        return _int(name, value)
    if name == "quality":
        return split_tags(value) if isinstance(value, str) else list(value or [])
    if isinstance(value, str) and name not in ("nl_template",):
        return value.strip()
    return value


def _show(name: str, value):
    if name in LIST_FIELDS:
        return ", ".join(value or [])
    if name == "character_series":
        return "\n".join(f"{character} {PAIR_ARROW} {series}" for character, series in (value or {}).items())
    if name in OPTIONAL_INTS:  # shown as text: "" = not set
        return "" if value is None else str(value)
    return value


def _int(name: str, value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if number != int(number):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    return int(number)


def parse_pairs(text: str) -> dict[str, str]:
    """'saber (fate) -> fate (series)' lines -> {character: series}."""
    pairs = {}
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        character, arrow, series = line.partition(PAIR_ARROW)
        if not arrow or not character.strip() or not series.strip():
            raise ConfigError(f"character -> series, line {number}: write 'character {PAIR_ARROW} series', "
                              f"e.g. 'saber (fate) {PAIR_ARROW} fate (series)', not {line.strip()!r}")
        pairs[character.strip()] = series.strip()
    return pairs


def _set(data: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def _get(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False, None
        data = data[key]
    return True, data


# -- configs and defaults ------------------------------------------------------------------------


def default_settings(demo: bool) -> dict:
    """CaptionConfig's defaults as settings (no dataset, no API key); demo mode tags with the
    offline demo tagger."""
    settings = CaptionConfig(dataset="-").model_dump(exclude={"dataset"})
    settings["nl"].pop("api_key")
    settings["tagger"] = DEMO_TAGGER if demo else DEFAULT_TAGGER
    return settings


def caption_config(settings: dict, dataset: str | Path) -> CaptionConfig:
    """The validated config for captioning `dataset`; a ConfigError says what to fix."""
    config = validate(CaptionConfig, {**settings, "dataset": str(dataset)})
    if config.nl.backend != "none":
        from studio.captioning.nl_caption import check_template

        check_template(config.nl.template)
    return config


def preset_store(settings: Settings) -> PresetStore:
    return PresetStore("caption", user_root=settings.workspace / "presets")


def load_caption_preset(store: PresetStore, name: str, defaults: dict) -> tuple[dict, list[str]]:
    """Form values of preset `name` over `defaults`, checked as a CaptionConfig, and the settings
    it sets that the form cannot show."""
    preset = store.find(name)
    merged = store.load(name, defaults)
    try:
        caption_config(merged, "-")
    except ConfigError as exc:
        raise ConfigError(f"preset {preset.path}: {exc}") from None
    return settings_to_form(merged), unshown_settings(store.read(name))


def save_caption_preset(store: PresetStore, name: str, values: dict, defaults: dict) -> Path:
    """Save the form (checked first) as the user's preset `name`, sparse over `defaults`."""
    form = {k: v for k, v in values.items() if k not in SECRET_FIELDS}
    settings = form_to_settings(form)
    caption_config(settings, "-")
    return store.save(name, settings, defaults)


# -- dataset folders -----------------------------------------------------------------------------

_FOLDER_NAME = re.compile(r"^[^/\\.\x00-\x1f][^/\\\x00-\x1f]{0,99}$")


def dataset_choices(settings: Settings) -> list[str]:
    folder = settings.datasets_dir
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=str.lower)


def dataset_path(settings: Settings, value: str) -> Path:
    """The dataset folder a form names: a folder name under workspace/datasets, or a path in the
    workspace (relative to it, or absolute). It must exist and lie inside the workspace."""
    if not (value or "").strip():
        raise ConfigError("choose a dataset folder first (or type a new name and press Create)")
    try:
        return Resolver.for_settings(settings).folder(value, [settings.datasets_dir], "dataset")
    except ConfigError as exc:
        if str(exc).startswith("there is no"):
            raise ConfigError(f"{exc}: type a new name and press Create, or upload images into it") from None
        raise


def is_new_dataset_name(settings: Settings, name: str) -> bool:
    """A usable folder name with no folder under workspace/datasets (nor the workspace) yet."""
    name = (name or "").strip()
    return (bool(_FOLDER_NAME.match(name)) and not name.endswith((".", " "))
            and not (settings.datasets_dir / name).exists() and not (settings.workspace / name).exists())


def create_dataset(settings: Settings, name: str) -> tuple[Path, bool]:
    """Make workspace/datasets/<name>; (path, whether it was created just now)."""
    name = (name or "").strip()
    if not _FOLDER_NAME.match(name) or name.endswith((".", " ")):
        raise ConfigError(f"{name!r} is not usable as a dataset folder name: one name without '/' or '\\', "
                          "not starting with '.'")
    path = settings.datasets_dir / name
    if path.is_dir():
        return path, False
    if path.exists():
        raise ConfigError(f"{path} exists and is not a folder")
    path.mkdir(parents=True)
    return path, True
