"""Importing a kohya config into TrainConfig fields: the JSON that kohya_ss GUI's "Save config"
writes, or an sd-scripts TOML config (`train_network.py --config_file`: the same argument names,
flat or grouped in tables, whose names sd-scripts ignores).

    result = import_kohya_file(Path("my_lora.json"))
    result.values   # TrainConfig fields, to lay over the defaults or a preset
    result.ignored  # [(key, value)]: settings the studio does not use
    result.notes    # how values were converted, and where the studio differs from kohya

What needs converting, beyond names:
- The GUI stores many numbers as strings ("0", "1e-4") and "" for "not set"; both are read.
- The GUI's `lr_warmup` is a PERCENTAGE of the run's steps, and sd-scripts' `lr_warmup_steps`
  may be a ratio (< 1); both become steps. When the run is measured in epochs, the steps are
  counted from the dataset's repeat folders as the GUI does
  (ceil(images x repeats / batch / accumulation x epochs)).
- The GUI's `epoch` is the run's length unless max_train_steps or max_train_epochs is set.
- Text-encoder training follows kohya: the encoders train unless text_encoder_lr is 0 (with a
  unet_lr), network_train_unet_only is set, or their outputs are cached.
- `optimizer_args` ("weight_decay=0.1 betas=0.9,0.99", or a TOML list of such strings) become
  TrainConfig.weight_decay and optimizer_args; without a weight_decay, the optimizer's own
  default applies, as in kohya (the studio's default of 0.01 would not).
- The network: GUI `LoRA_type` or sd-scripts `network_module` + `network_args` (LyCORIS `algo`,
  `preset`, `conv_dim`, `dora_wd`) become network_type (lora, dora, lokr, loha) and network_target.
A value that cannot be read, or asks for something the studio cannot do, is a ConfigError naming
the key; a setting the studio does without is listed in `ignored`, never dropped silently.
"""

from __future__ import annotations

import ast
import json
import math
import shlex
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from studio.errors import ConfigError

# Performance, logging and launcher settings with no bearing on what is trained; the studio has
# its own (PyTorch attention, on-disk caches, run folders): accepted without comment.
HARMLESS = frozenset({
    "xformers", "sdpa", "mem_eff_attn", "model_list", "num_cpu_threads_per_process", "num_processes",
    "num_machines", "multi_gpu", "gpu_ids", "main_process_port", "max_data_loader_n_workers",
    "persistent_data_loader_workers", "vae_batch_size", "sdxl_no_half_vae", "no_half_vae", "lowram", "highvram",
    "lowvram", "cache_latents_to_disk", "cache_text_encoder_outputs_to_disk", "save_state",
    "save_state_on_train_end", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
    "extra_accelerate_launch_args", "training_preset", "use_wandb", "wandb_api_key", "log_config",
})
# GUI settings that belong to one LoRA type; for the other types the GUI does not pass them on.
_LORA_BLOCKS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
_LYCORIS = ("LyCORIS_preset", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "use_tucker",
            "use_scalar", "rank_dropout_scale", "train_norm", "bypass_mode", "dora_wd")
_GUI_TYPE_KEYS = {
    "Standard": _LORA_BLOCKS,
    "Kohya LoCon": _LORA_BLOCKS + ("conv_dim", "conv_alpha"),
    "LoCon": _LYCORIS, "LyCORIS/LoCon": _LYCORIS, "LyCORIS/LoHa": _LYCORIS,
    "LyCORIS/LoKr": _LYCORIS + ("factor", "use_cp", "decompose_both"),
}
_TYPE_SPECIFIC = frozenset(k for keys in _GUI_TYPE_KEYS.values() for k in keys) | {
    "constrain", "rescaled", "train_on_input", "unit", "factor", "use_cp", "decompose_both"}
# GUI LoRA_type -> (sd-scripts network_module, LyCORIS algo)
_GUI_TYPES = {"Standard": ("networks.lora", ""), "Kohya LoCon": ("networks.lora", "conv"),
              "LoCon": ("lycoris.kohya", "locon"), "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
              "LyCORIS/LoHa": ("lycoris.kohya", "loha"), "LyCORIS/LoKr": ("lycoris.kohya", "lokr")}
# LyCORIS presets -> the studio's network_target (for LoRA/LoCon; LoKr/LoHa train linear layers only)
_PRESETS = {"full": "all", "full-lin": "attention_ff", "attn-mlp": "attention_ff", "attn-only": "attention",
            "unet-transformer-only": "attention_ff"}
_OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "pagedadamw8bit": "AdamW8bit", "adafactor": "Adafactor",
               "prodigy": "Prodigy", "lion": "Lion", "lion8bit": "Lion", "pagedlion8bit": "Lion"}
# Each optimizer's own weight decay, which kohya uses when optimizer_args has none.
_OPTIMIZER_WEIGHT_DECAY = {"AdamW": 0.01, "AdamW8bit": 0.01, "Adafactor": 0.0, "Prodigy": 0.0, "Lion": 0.0}
_TEXT_ENCODER_KEYS = ("learning_rate", "unet_lr", "text_encoder_lr", "network_train_unet_only",
                      "cache_text_encoder_outputs", "sdxl_cache_text_encoder_outputs")
_DEFAULT_RUN_STEPS = 1600  # sd-scripts' max_train_steps when nothing sets the run's length


class KohyaImport(NamedTuple):
    values: dict[str, Any]  # TrainConfig fields
    ignored: list[tuple[str, Any]]  # (key, value) of settings the studio does not use
    notes: list[str]  # conversions and differences from kohya worth knowing


def import_kohya_file(path: Path) -> KohyaImport:
    """A kohya_ss GUI JSON (.json) or sd-scripts TOML (.toml) config, as TrainConfig fields."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"kohya config not found: {path}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds no settings object (kohya configs are a JSON object or a TOML table)")
    return import_kohya(data, where=str(path))


def import_kohya(data: dict, where: str = "the kohya config") -> KohyaImport:
    """kohya settings (GUI or sd-scripts names) as TrainConfig fields; see the module docstring."""
    # 1. One flat table of settings (sd-scripts ignores its TOML section names)
    read = _Reader(_flatten(data, where), where)
    values: dict[str, Any] = {}
    # 2. Each group of settings, in the order later ones depend on
    _model(read, values)
    _data(read, values)
    _network(read, values)
    _learning_rates(read, values)
    _optimizer(read, values)
    _run_length(read, values)
    _schedule(read, values)
    _outputs(read, values)
    _samples(read, values)
    # 3. What is left is listed, and the result must make a valid TrainConfig
    _check(values, where)
    return KohyaImport(values, read.ignored_list(), read.notes)


def _flatten(data: dict, where: str) -> dict:
    flat: dict = {}
    for key, value in data.items():
        inner = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in inner:
            if name in flat:
                raise ConfigError(f"{where}: {name} is set twice (in two sections); keep one")
            flat[name] = item
    return flat


def _is_set(value: Any) -> bool:
    """False for the GUI's 'not set' forms: None, "", false, 0, "0", empty lists."""
    if value is None or value is False or value == [] or value == {}:
        return False
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return False
        try:
            return float(text) != 0
        except ValueError:
            return True
    return not (isinstance(value, (int, float)) and value == 0)


class _Reader:
    """Typed reads of the settings, remembering which keys were used."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where
        self.used: set[str] = set()
        self.ignored: dict[str, Any] = {}
        self.extra_ignored: list[tuple[str, Any]] = []  # parts of a setting, e.g. one network_args entry
        self.notes: list[str] = []

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key} = {self.data.get(key)!r}: {message}")

    def raw(self, key: str) -> Any:
        """The value, or None when missing or "" (the GUI's empty field)."""
        self.used.add(key)
        value = self.data.get(key)
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    def text(self, key: str) -> str | None:
        value = self.raw(key)
        return None if value is None else str(value).strip()

    def number(self, key: str) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self.error(key, "not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.error(key, "not a number") from None
        if not math.isfinite(number):
            raise self.error(key, "must be a finite number")
        return number

    def integer(self, key: str) -> int | None:
        number = self.number(key)
        if number is not None and number != int(number):
            raise self.error(key, "must be a whole number")
        return None if number is None else int(number)

    def flag(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is None or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise self.error(key, "must be true or false")

    def ignore(self, key: str, note: str | None = None) -> None:
        """Use nothing of `key`; list it (and say why) when it is set."""
        self.used.add(key)
        if key in self.data and _is_set(self.data[key]):
            self.ignored[key] = self.data[key]
            if note:
                self.notes.append(note)

    def drop(self, key: str, note: str) -> None:
        """List `key` as ignored whatever its value, and say why."""
        self.used.add(key)
        self.ignored[key] = self.data.get(key)
        self.notes.append(note)

    def consume(self, *keys: str) -> None:
        self.used.update(keys)

    def ignored_list(self) -> list[tuple[str, Any]]:
        leftovers = [(k, v) for k, v in self.data.items()
                     if k in self.ignored or (k not in self.used and k not in HARMLESS and _is_set(v))]
        return leftovers + self.extra_ignored


# -- the groups of settings -------------------------------------------------------------------------
def _model(read: _Reader, values: dict) -> None:
    if (model := read.text("pretrained_model_name_or_path")) is not None:
        values["pretrained_model"] = model
    if (vae := read.text("vae")) is not None:
        values["vae"] = vae
    for key in ("v_parameterization", "zero_terminal_snr"):
        if (flag := read.flag(key)) is not None:
            values[key] = flag
    sdxl, v2 = read.flag("sdxl"), read.flag("v2")
    if sdxl is False or v2:
        read.notes.append("the kohya config is for an SD 1.x/2.x model (sdxl false or v2 true); the studio trains "
                          "SDXL: check pretrained_model")
    if (skip := read.integer("clip_skip")) and skip > 1:  # sd-scripts does not apply it to SDXL either
        read.ignore("clip_skip", f"clip_skip {skip}: SDXL LoRAs use the penultimate layer of both text encoders")
    if tokens := read.integer("max_token_length"):
        if tokens not in (75, 150, 225):
            raise read.error("max_token_length", f"{tokens}: sd-scripts takes 75, 150 or 225")
        values["max_token_length"] = tokens


def _data(read: _Reader, values: dict) -> None:
    if (folder := read.text("train_data_dir")) is not None:
        values["datasets"] = [{"path": folder}]
        if not Path(folder).is_dir():
            read.notes.append(f"train_data_dir {folder} is not a folder on this machine: give the dataset "
                              "with --dataset")
    read.ignore("reg_data_dir", "regularisation images (reg_data_dir) are not supported; trained without them")
    read.ignore("dataset_config", "sd-scripts dataset_config files are not imported; give the dataset folders "
                                  "with --dataset")
    resolution = read.raw("max_resolution") or read.raw("resolution")
    read.consume("max_resolution", "resolution")
    if resolution is not None:
        values["resolution"] = _resolution(read, resolution)
    if read.flag("enable_bucket") is False:
        read.drop("enable_bucket", "enable_bucket false: the studio always buckets images by aspect ratio")
    for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "keep_tokens"):
        if (number := read.integer(key)) is not None:
            values[key] = number
    if values.get("bucket_reso_steps", 8) < 8:
        read.notes.append(f"bucket_reso_steps {values['bucket_reso_steps']} -> 8, the finest the studio uses")
        values["bucket_reso_steps"] = 8
    for key in ("bucket_no_upscale", "flip_aug", "shuffle_caption", "cache_latents"):
        if (flag := read.flag(key)) is not None:
            values[key] = flag
    if "keep_tokens_separator" in read.data:
        values["keep_tokens_separator"] = read.text("keep_tokens_separator") or ""
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if (rate := read.number(key)) is not None:
            values[key] = rate
    cached = [read.flag(k) for k in ("cache_text_encoder_outputs", "sdxl_cache_text_encoder_outputs")]
    if any(flag is not None for flag in cached):
        values["cache_text_encoder_outputs"] = any(cached)
    if read.text("caption_extension") not in (None, ".txt", "txt"):
        read.ignore("caption_extension", "the studio reads captions from .txt files next to the images")
    for key in ("caption_dropout_every_n_epochs", "color_aug", "random_crop", "weighted_captions"):
        read.ignore(key)


def _resolution(read: _Reader, value: Any) -> int:
    key = "max_resolution" if "max_resolution" in read.data else "resolution"
    parts = value if isinstance(value, list) else str(value).replace("x", ",").split(",")
    try:
        sides = [int(float(str(p).strip())) for p in parts]
    except ValueError:
        raise read.error(key, 'expected "1024,1024" or 1024') from None
    if len(sides) not in (1, 2) or min(sides) < 64:
        raise read.error(key, 'expected "WIDTH,HEIGHT" of at least 64 each, e.g. "1024,1024"')
    if len(sides) == 2 and sides[0] != sides[1]:
        side = round(math.sqrt(sides[0] * sides[1]) / 8) * 8
        read.notes.append(f"{key} {value}: buckets of the same area as {side}x{side} (resolution {side})")
        return side
    return sides[0]


def _network(read: _Reader, values: dict) -> None:
    gui_type = read.text("LoRA_type")
    if gui_type is not None:
        if gui_type not in _GUI_TYPES:
            raise read.error("LoRA_type", f"not supported; the studio trains {', '.join(_GUI_TYPES)}")
        module, algo = _GUI_TYPES[gui_type]
        args = {"preset": read.text("LyCORIS_preset") or "full", "conv_dim": read.data.get("conv_dim"),
                "dora_wd": read.flag("dora_wd") if gui_type in ("LoCon", "LyCORIS/LoCon", "LyCORIS/LoHa",
                                                                "LyCORIS/LoKr") else None}
        relevant = _GUI_TYPE_KEYS[gui_type]
        read.consume(*(k for k in _TYPE_SPECIFIC if k not in relevant), "LyCORIS_preset", "conv_dim", "conv_alpha")
        if gui_type == "LyCORIS/LoKr" and str(read.data.get("factor", -1)).strip() in ("-1", "-1.0", ""):
            read.consume("factor")
    else:
        module = read.text("network_module") or "networks.lora"
        args = _network_args(read)
        algo = str(args.pop("algo", "lora" if module == "lycoris.kohya" else "")).lower()
        if module == "networks.lora" and args.get("conv_dim"):
            algo = "conv"
    read.consume("network_module", "network_args")
    network_type, target = _network_kind(read, module, algo, args)
    values["network_type"], values["network_target"] = network_type, target
    if (dim := read.integer("network_dim")) is not None:
        if dim > 1024:
            raise read.error("network_dim", "the studio trains ranks up to 1024 (LyCORIS' huge-dim 'full matrix' "
                                            "trick for LoKr is not supported)")
        values["network_dim"] = dim
    if (alpha := read.number("network_alpha")) is not None:
        values["network_alpha"] = alpha
    for key in ("network_dropout", "scale_weight_norms", "dim_from_weights"):
        read.ignore(key)
    for key in ("network_weights", "lora_network_weights"):
        read.ignore(key, f"{key}: starting from an existing LoRA is not supported; training starts fresh")


def _network_args(read: _Reader) -> dict:
    raw = read.raw("network_args")
    items = shlex.split(raw) if isinstance(raw, str) else [str(a) for a in (raw or [])]
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise read.error("network_args", f"{item!r} is not key=value")
        args[key.strip()] = value.strip().strip("\"'")
    return args


def _network_kind(read: _Reader, module: str, algo: str, args: dict) -> tuple[str, str]:
    """(network_type, network_target) of kohya's network module and LyCORIS algo."""
    if module not in ("networks.lora", "lycoris.kohya"):
        raise read.error("network_module", "the studio trains networks.lora and lycoris.kohya "
                                           "(LoCon, LoHa, LoKr) networks")
    if algo not in ("", "conv", "lora", "locon", "loha", "lokr"):
        raise read.error("network_args", f"LyCORIS algo {algo!r} is not supported; use lora/locon, loha or lokr")
    dora = str(args.pop("dora_wd", False)).lower() == "true"
    preset = str(args.pop("preset", "full"))
    args.pop("conv_dim", None)
    args.pop("conv_alpha", None)
    for key, value in args.items():
        if _is_set(value) and value != "-1":
            read.extra_ignored.append((f"network_args {key}", value))
    if algo in ("", "conv"):
        if algo == "conv":
            read.notes.append("LoCon (conv_dim): the studio trains the convolutions at network_dim/network_alpha")
        return ("dora" if dora else "lora"), ("all" if algo == "conv" else "attention_ff")
    if preset not in _PRESETS:
        raise read.error("LyCORIS_preset" if "LyCORIS_preset" in read.data else "network_args",
                         f"LyCORIS preset {preset!r} is not supported; use {', '.join(_PRESETS)}")
    target = _PRESETS[preset]
    if algo in ("lora", "locon"):
        if target == "all":  # LyCORIS trains the convolutions too, at conv_dim (default: network_dim)
            read.notes.append("LyCORIS LoCon: the studio trains the convolutions at network_dim/network_alpha")
        return ("dora" if dora else "lora"), target
    if dora:
        raise read.error("dora_wd", f"DoRA weight decomposition is trained with LoRA here, not {algo}")
    if target == "all":
        read.notes.append(f"{algo} with LyCORIS preset {preset}: the studio trains the linear layers only; the "
                          "convolutions are not trained")
        target = "attention_ff"
    return algo, target


def _learning_rates(read: _Reader, values: dict) -> None:
    rate, unet = read.number("learning_rate"), read.number("unet_lr")
    text = _text_encoder_lr(read)
    for key, value in (("learning_rate", rate), ("unet_lr", unet), ("text_encoder_lr", text)):
        if value is not None and value < 0:
            raise read.error(key, "must be positive (or 0 for not set)")
    if read.flag("network_train_text_encoder_only") or (text and unet == 0):
        raise ConfigError(f"{read.where}: training the text encoder alone is not supported: the studio always "
                          "trains the UNet; give unet_lr a value")
    base = rate or unet or text
    if base:
        values["learning_rate"] = base
    elif any(key in read.data for key in ("learning_rate", "unet_lr", "text_encoder_lr")):
        raise ConfigError(f"{read.where}: no learning rate: set learning_rate or unet_lr")
    if "unet_lr" in read.data:
        values["unet_lr"] = unet or None
    if not any(key in read.data for key in _TEXT_ENCODER_KEYS):
        return  # a sparse TOML that says nothing about it leaves the text encoders to the preset
    unet_only = read.flag("network_train_unet_only") or (text == 0 and bool(unet))
    cached = values.get("cache_text_encoder_outputs", False)
    train_text = not unet_only and not cached
    if train_text and values["network_type"] in ("lokr", "loha"):
        read.notes.append(f"{values['network_type']}: the studio trains the UNet only; the text encoders are not "
                          "trained (kohya would train them at text_encoder_lr)")
        train_text = False
    values["train_text_encoder"] = train_text
    if "text_encoder_lr" in read.data:
        values["text_encoder_lr"] = (text or None) if train_text else None
    if train_text:
        read.notes.append("the text encoders are trained too, as kohya does unless text_encoder_lr is 0, "
                          "network_train_unet_only is set or their outputs are cached")


def _text_encoder_lr(read: _Reader) -> float | None:
    value = read.data.get("text_encoder_lr")
    if isinstance(value, list):  # sd-scripts: one LR per SDXL text encoder
        if not value:
            return None
        if len(set(value)) > 1:
            read.notes.append(f"text_encoder_lr {value}: the studio trains both text encoders at {value[0]}")
        read.data["text_encoder_lr"] = value[0]
    return read.number("text_encoder_lr")


def _optimizer(read: _Reader, values: dict) -> None:
    name = read.text("optimizer") or read.text("optimizer_type")
    if read.flag("use_8bit_adam"):
        name = "AdamW8bit"
    if read.flag("use_lion_optimizer"):
        name = "Lion"
    key = "optimizer" if "optimizer" in read.data else "optimizer_type"
    if name is not None:
        short = name.rsplit(".", 1)[-1].lower()
        if short not in _OPTIMIZERS:
            raise read.error(key, f"not supported; choose one of: {', '.join(sorted(set(_OPTIMIZERS.values())))}")
        values["optimizer_type"] = _OPTIMIZERS[short]
        if short.startswith(("paged", "lion8")):
            read.notes.append(f"optimizer {name} -> {_OPTIMIZERS[short]} (same update rule, "
                              f"{'unpaged' if short.startswith('paged') else '32-bit'} states)")
    optimizer = values.get("optimizer_type", "AdamW")
    if name is None and not _is_set(read.data.get("optimizer_args")):
        read.consume("optimizer_args")
        return _max_grad_norm(read, values)  # nothing said about the optimizer: the preset's stays
    args = _optimizer_args(read)
    decay = args.pop("weight_decay", None)
    if isinstance(decay, bool) or not isinstance(decay, (int, float, type(None))):
        raise read.error("optimizer_args", f"weight_decay={decay!r} is not a number")
    values["weight_decay"] = float(decay) if decay is not None else _OPTIMIZER_WEIGHT_DECAY[optimizer]
    if decay is None and name is not None:
        read.notes.append(f"weight_decay {values['weight_decay']}: {optimizer}'s own default, as kohya uses "
                          "when optimizer_args sets none")
    if optimizer == "Adafactor":
        if args.get("relative_step") is True:
            raise read.error("optimizer_args", "Adafactor's relative_step=True sets its own LR, which the studio's "
                                               "scheduler cannot follow; use relative_step=False")
        if "relative_step" not in args:
            read.notes.append("Adafactor: kohya defaults to relative_step=True (its own LR); the studio uses "
                              "relative_step=False with learning_rate")
    values["optimizer_args"] = args
    _max_grad_norm(read, values)


def _max_grad_norm(read: _Reader, values: dict) -> None:
    if (norm := read.number("max_grad_norm")) is not None:
        values["max_grad_norm"] = norm


def _optimizer_args(read: _Reader) -> dict:
    raw = read.raw("optimizer_args")
    items = shlex.split(raw) if isinstance(raw, str) else [str(a) for a in (raw or [])]
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise read.error("optimizer_args", f"{item!r} is not name=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()  # a bare word, e.g. a name
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list) and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise read.error("optimizer_args", f"{key}: a list must hold numbers, got {text!r}")
        if not isinstance(value, (bool, int, float, str, list)):
            raise read.error("optimizer_args", f"{key}={text!r} is not a number, true/false, text or a list")
        args[key] = [float(v) for v in value] if isinstance(value, list) else value
    return args


def _run_length(read: _Reader, values: dict) -> None:
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        if (number := read.integer(key)) is not None:
            values[key] = number
    epochs, steps, gui_epochs = (read.integer(k) for k in ("max_train_epochs", "max_train_steps", "epoch"))
    # max_train_epochs wins over max_train_steps in TrainConfig, so an epoch count leaves the steps alone
    if epochs:
        values["max_train_epochs"] = epochs
    elif steps:
        values.update(max_train_steps=steps, max_train_epochs=None)
        if gui_epochs:
            read.notes.append(f"epoch {gui_epochs} is not used: max_train_steps {steps} sets the run's length, "
                              "as in kohya")
    elif gui_epochs:
        values["max_train_epochs"] = gui_epochs
    if read.integer("stop_text_encoder_training"):
        read.ignore("stop_text_encoder_training", "stop_text_encoder_training is not supported: the text encoders "
                                                  "train to the end")


def _run_steps(read: _Reader, values: dict) -> int:
    """The run's optimizer steps as kohya computes them before training (for percentages)."""
    if values.get("max_train_epochs") is None:
        return values.get("max_train_steps") or _DEFAULT_RUN_STEPS
    folder = values.get("datasets", [{}])[0].get("path")
    samples = _repeated_images(Path(folder)) if folder else 0
    if not samples:
        raise ConfigError(f"{read.where}: the LR warmup is a share of the run's steps, and a run measured in epochs "
                          f"needs train_data_dir's repeat folders to count them ({folder or 'not set'} holds none): "
                          "set lr_warmup_steps in steps, or max_train_steps")
    batch = values.get("train_batch_size", 1) * values.get("gradient_accumulation_steps", 1)
    return math.ceil(samples / batch * values["max_train_epochs"])


def _repeated_images(folder: Path) -> int:
    """images x repeats over the kohya repeat folders (`10_name/`) of a dataset folder."""
    from studio.dataset.images import PRIMARY_EXTENSIONS
    from studio.dataset.model import parse_repeat_folder

    if not folder.is_dir():
        return 0
    total = 0
    for sub in folder.iterdir():
        parsed = parse_repeat_folder(sub.name) if sub.is_dir() else None
        if parsed:
            total += parsed[0] * sum(1 for f in sub.iterdir() if f.suffix.lower() in PRIMARY_EXTENSIONS)
    return total


def _schedule(read: _Reader, values: dict) -> None:
    from studio.training.schedules import SCHEDULER_NAMES

    name = (read.text("lr_scheduler") or "").lower() or None
    if name is not None and name not in SCHEDULER_NAMES:
        hint = " (pair Adafactor with constant_with_warmup)" if name == "adafactor" else ""
        raise read.error("lr_scheduler", f"not supported{hint}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    if name is not None:
        values["lr_scheduler"] = name
    warmup = _warmup_steps(read, values)
    if warmup and values.get("lr_scheduler", "constant") == "constant":
        read.notes.append("lr_scheduler constant has no warmup: constant_with_warmup is used for the warmup")
        values["lr_scheduler"] = "constant_with_warmup"
    if warmup or "lr_warmup" in read.data or "lr_warmup_steps" in read.data:
        values["lr_warmup_steps"] = warmup
    if name == "cosine_with_restarts":
        cycles = read.integer("lr_scheduler_num_cycles")
        if cycles is None and values.get("max_train_epochs"):
            cycles = values["max_train_epochs"]
            read.notes.append(f"lr_scheduler_num_cycles not set: one cycle per epoch ({cycles}), as kohya_ss does")
        values["lr_scheduler_num_cycles"] = cycles or 1
        if warmup:
            read.notes.append("cosine_with_restarts: the studio warms up at the start of every cycle; kohya only "
                              "at the start of the run")
    read.consume("lr_scheduler_num_cycles")
    power = read.number("lr_scheduler_power")
    if name == "polynomial" and power not in (None, 1.0):
        read.ignore("lr_scheduler_power", f"lr_scheduler_power {power}: the studio's polynomial schedule has power 1")
    if (floor := read.number("lr_scheduler_min_lr_ratio")) is not None and values.get("lr_scheduler") in (
            "linear", "cosine", "cosine_with_restarts", "polynomial"):
        values["min_lr_ratio"] = floor
    for key in ("lr_scheduler_args", "lr_scheduler_type"):
        read.ignore(key)


def _warmup_steps(read: _Reader, values: dict) -> int:
    steps, percent = read.number("lr_warmup_steps"), read.number("lr_warmup")
    for key, value, top in (("lr_warmup_steps", steps, None), ("lr_warmup", percent, 100)):
        if value is not None and (value < 0 or (top and value >= top)):
            raise read.error(key, "must be >= 0" + (" and below 100 (a percentage of the run's steps)" if top else ""))
    if steps and steps >= 1:
        if steps != int(steps):
            raise read.error("lr_warmup_steps", "a whole number of steps, or a ratio below 1")
        return int(steps)
    share = steps if steps else (percent or 0) / 100
    if not share:
        return 0
    total = _run_steps(read, values)
    warmup = round(share * total)
    read.notes.append(f"LR warmup {share:.0%} of {total} steps = {warmup} steps (lr_warmup_steps)")
    return warmup


def _outputs(read: _Reader, values: dict) -> None:
    if (name := read.text("output_name")) is not None:
        values["output_name"] = name
    for key in ("save_every_n_epochs", "save_every_n_steps"):
        if (number := read.integer(key)) is not None:
            values[key] = number
    keep_epochs, keep_steps = read.integer("save_last_n_epochs"), read.integer("save_last_n_steps")
    if keep_epochs:
        values["save_last_n"] = keep_epochs
    elif keep_steps and values.get("save_every_n_steps"):
        values["save_last_n"] = max(1, keep_steps // values["save_every_n_steps"])
        read.notes.append(f"save_last_n_steps {keep_steps}: the last {values['save_last_n']} checkpoints are kept")
    if (seed := read.integer("seed")) is not None:
        values["seed"] = seed
    elif "seed" in read.data:
        read.notes.append("seed not set: kohya picks a random one; the studio uses a fixed seed (42 unless set)")
    if (precision := read.text("mixed_precision")) is not None:
        if precision not in ("no", "fp16", "bf16"):
            raise read.error("mixed_precision", "choose no, fp16 or bf16")
        values["mixed_precision"] = precision
    if (flag := read.flag("gradient_checkpointing")) is not None:
        values["gradient_checkpointing"] = flag
    if (flag := read.flag("fp8_base")) is not None:
        values["fp8_base"] = flag
    if (flag := read.flag("torch_compile")) is not None:
        values["torch_compile"] = flag
    _noise(read, values)
    read.ignore("resume", "resume: continue a studio run with --resume RUN_DIR")
    read.ignore("output_dir", "output_dir: the studio writes each run to its own folder (--output-dir)")
    for key in ("save_precision", "full_bf16", "full_fp16", "save_last_n_epochs_state", "save_last_n_steps_state"):
        read.ignore(key)
    if read.text("save_model_as") not in (None, "safetensors"):
        read.ignore("save_model_as", "the studio saves LoRAs as .safetensors (kohya format)")
    if read.text("loss_type") not in (None, "l2"):
        read.ignore("loss_type", f"loss_type {read.data['loss_type']}: the studio trains with the L2 (MSE) loss")
    read.consume("prior_loss_weight", "huber_c", "huber_schedule")  # for reg images / the Huber loss only


def _noise(read: _Reader, values: dict) -> None:
    kind = read.text("noise_offset_type") or "Original"
    offset = read.number("noise_offset")
    if kind == "Original":
        if offset is not None:
            values["noise_offset"] = offset
        read.consume("multires_noise_iterations", "multires_noise_discount")
        read.ignore("adaptive_noise_scale")
    else:
        read.ignore("noise_offset_type", f"noise_offset_type {kind} (multi-resolution noise) is not supported; "
                                         "trained without a noise offset")
        values["noise_offset"] = 0.0
        read.consume("noise_offset", "adaptive_noise_scale")
    if (gamma := read.number("min_snr_gamma")) is not None:
        values["min_snr_gamma"] = gamma or None
    for key, default in (("min_timestep", 0), ("max_timestep", 1000)):
        if read.integer(key) not in (None, default):
            read.ignore(key, f"{key}: the studio samples timesteps over the whole 0-999 range")
    for key in ("ip_noise_gamma", "ip_noise_gamma_random_strength", "noise_offset_random_strength",
                "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss"):
        read.ignore(key)


def _samples(read: _Reader, values: dict) -> None:
    if (every := read.integer("sample_every_n_steps")) is not None:
        values["sample_every_n_steps"] = every or None
    prompts = read.text("sample_prompts")
    if prompts and (prompts.endswith((".txt", ".toml", ".json")) and "\n" not in prompts):
        read.ignore("sample_prompts", "sample_prompts names a prompt file, which is not imported; set sample_prompts "
                                      "in the studio")
    elif prompts:
        lines = [line.strip() for line in prompts.splitlines() if line.strip() and not line.startswith("#")]
        values["sample_prompts"] = [line.split(" --", 1)[0].strip() for line in lines]
        if any(" --" in line for line in lines):
            read.notes.append("sample_prompts: kohya's per-prompt options (--n --w --h --d --l --s) are dropped; the "
                              "studio's sample settings apply")
    read.ignore("sample_every_n_epochs", "sample_every_n_epochs: the studio samples every N steps "
                                         "(sample_every_n_steps)")
    if read.text("sample_sampler") not in (None, "euler_a", "k_euler_a"):
        read.ignore("sample_sampler", "the studio samples with Euler a")


def _check(values: dict, where: str) -> None:
    from studio.presets import merge
    from studio.schemas import validate
    from studio.training.config import TrainConfig
    from studio.training.runs import train_defaults

    try:
        validate(TrainConfig, merge(train_defaults(), values, where=where))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
