"""Run folders and how a TrainConfig is put together: defaults <- preset <- config file <- overrides.

A run folder (workspace/runs/<output_name>-<date-time>/) holds config.toml (the resolved config),
events.jsonl, loras/ (kohya files, one per checkpoint), state/ (resumable training state),
samples/ and tensorboard/."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

from studio.errors import ConfigError
from studio.fileio import atomic_write_text
from studio.schemas import validate
from studio.training.config import TrainConfig

CONFIG_FILE = "config.toml"


def train_defaults() -> dict:
    return TrainConfig(max_train_steps=1600).model_dump(mode="json")


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def resolve_config(*, preset: str | None = None, config_file: Path | None = None, overrides: dict | None = None,
                   presets_root: Path | None = None) -> TrainConfig:
    """Defaults, then the preset, then the config file, then explicit overrides (CLI flags, form)."""
    from studio.presets import PresetStore, merge

    values = train_defaults()
    if preset:
        store = PresetStore("train", user_root=presets_root or Path("workspace/presets"))
        values = store.load(preset, values)
    if config_file is not None:
        values = merge(values, read_toml(config_file), where=str(config_file))
    if overrides:
        values = merge(values, overrides, where="the command line")
    return validate(TrainConfig, values)


def new_run_dir(runs_dir: Path, output_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = runs_dir / f"{output_name}-{stamp}"
    number = 1
    while folder.exists():
        folder = runs_dir / f"{output_name}-{stamp}-{number}"
        number += 1
    return folder


def write_run_config(run_dir: Path, config: TrainConfig) -> Path:
    from studio.presets import dumps_toml

    run_dir.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json", exclude_none=True)
    return atomic_write_text(run_dir / CONFIG_FILE, "# the resolved config of this run\n" + dumps_toml(data))


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a training run folder (no {CONFIG_FILE})")
    return validate(TrainConfig, read_toml(path))
