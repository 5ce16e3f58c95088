"""The Train tab's form: its components (the essentials up front, the rest under Advanced) and
its values <-> one TrainConfig. The form's names are TrainConfig's (kohya's) where it has them."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.context import AppContext
from studio.errors import ConfigError
from studio.settings import Settings
from studio.training.config import NetworkTarget, NetworkType, TrainConfig
from studio.training.optim import OPTIMIZER_NAMES
from studio.training.schedules import SCHEDULER_NAMES
from studio.ui.caption_form import dataset_choices, dataset_path

LOKR_NOTE = ("LoKr and LoHa are saved in peft/diffusers format only (the run's `diffusers/` folder), not as "
             "kohya `.safetensors` files: A1111, Forge and ComfyUI cannot load them, and the checkpoint list "
             "below stays empty. LoRA and DoRA are saved as kohya files.")
MIXED_KEYS = ("weight_tags", "weight_nl", "weight_tags_nl", "weight_nl_tags", "tag_dropout", "keep_first")
# The form, in the order the Start handler receives it; names are TrainConfig's (kohya's) except
# the preset, the dataset folders, their repeats and the mixed-caption weights (mixed_<key>).
TRAIN_FIELDS: tuple[str, ...] = (
    "datasets", "num_repeats", "balance_concepts", "preset", "pretrained_model", "output_name", "network_dim", "network_alpha",
    "learning_rate", "max_train_steps", "max_train_epochs", "train_batch_size", "resolution", "shuffle_caption",
    "keep_tokens", "caption_tag_dropout_rate",
    # advanced
    "network_type", "network_target", "optimizer_type", "lr_scheduler", "lr_warmup_steps",
    "lr_scheduler_num_cycles", "lr_cycle_decay", "min_lr_ratio", "weight_decay", "gradient_accumulation_steps",
    "noise_offset", "min_snr_gamma", "mixed_precision", "gradient_checkpointing", "fp8_base", "torch_compile",
    "cache_latents", "cache_text_encoder_outputs", "flip_aug", "max_token_length", "caption_scheme",
    *(f"mixed_{key}" for key in MIXED_KEYS),
    "validation_images", "validate_every_n_steps", "save_every_n_steps", "save_every_n_epochs", "save_last_n",
    "sample_prompts", "sample_every_n_steps", "sample_steps", "sample_size", "evaluate_every_save", "seed",
)
# What a preset fills in: everything but the dataset choice and the run's name.
PRESET_FIELDS = tuple(n for n in TRAIN_FIELDS if n not in ("datasets", "num_repeats", "preset", "output_name"))
_TEXT_FIELDS = ("resolution", "sample_prompts", "sample_size")
_PLAIN_FIELDS = {"pretrained_model", "output_name", "network_type", "network_target", "optimizer_type", "lr_scheduler",
                 "mixed_precision", "caption_scheme", "shuffle_caption", "gradient_checkpointing", "fp8_base",
                 "torch_compile", "cache_latents", "cache_text_encoder_outputs", "flip_aug", "balance_concepts",
                 "evaluate_every_save"}
_FLOAT_FIELDS = {"network_alpha", "learning_rate", "caption_tag_dropout_rate", "lr_cycle_decay", "min_lr_ratio",
                 "weight_decay", "noise_offset", "min_snr_gamma", *(f"mixed_{k}" for k in MIXED_KEYS[:5])}

# Number boxes cannot be empty in the browser: for these settings 0 means "not set" (the folder's
# own repeats, by steps rather than epochs, off); the *_every_n_* settings take 0 as "never" themselves.
ZERO_IS_UNSET = {"num_repeats", "max_train_steps", "max_train_epochs", "min_snr_gamma"}
_SHOWN_AS_ZERO = ZERO_IS_UNSET | {"validate_every_n_steps", "save_every_n_steps", "save_every_n_epochs",
                                  "sample_every_n_steps"}


# -- the form -------------------------------------------------------------------------------------
def _number(name: str, value):
    if value is None or value == "" or (name in ZERO_IS_UNSET and not value):
        return None
    return float(value) if name in _FLOAT_FIELDS else round(float(value))


def parse_resolution(text) -> int | list[int]:
    values = [v for v in str(text or "").replace(",", " ").split() if v]
    if not values or not all(v.isdigit() for v in values):
        raise ConfigError(f"resolution {text!r}: give a number such as 1024, or several such as '768, 1024'")
    numbers = [int(v) for v in values]
    return numbers[0] if len(numbers) == 1 else numbers


def parse_size(text) -> list[int]:
    parts = str(text or "").lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"sample size {text!r}: write it as WIDTHxHEIGHT, e.g. 832x1216")
    return [int(p) for p in parts]


def form_overrides(values: dict, dataset_paths: list[Path]) -> tuple[str, dict]:
    """The form as (preset, overrides): the preset supplies what the form does not show
    (bucket limits, sample CFG, ...), the form's values override it."""
    repeats = _number("num_repeats", values["num_repeats"])
    overrides: dict = {
        "datasets": [{"path": str(p), **({"num_repeats": repeats} if repeats else {})} for p in dataset_paths],
        "resolution": parse_resolution(values["resolution"]),
        "sample_prompts": [line.strip() for line in (values["sample_prompts"] or "").splitlines() if line.strip()],
        "sample_size": parse_size(values["sample_size"]),
        "mixed_captions": {key: _number(f"mixed_{key}", values[f"mixed_{key}"]) for key in MIXED_KEYS
                           if values[f"mixed_{key}"] is not None},
    }
    for name in PRESET_FIELDS + ("output_name",):
        if name in _TEXT_FIELDS or name.startswith("mixed_"):
            continue
        overrides[name] = values[name] if name in _PLAIN_FIELDS else _number(name, values[name])
    return values["preset"], overrides


def default_preset(settings: Settings) -> str:
    return "demo-sdxl" if settings.demo else "animagine-xl-3.1-character"


def preset_store(settings: Settings):
    from studio.presets import PresetStore

    return PresetStore("train", user_root=settings.workspace / "presets")


def preset_config(settings: Settings, preset: str, overrides: dict | None = None) -> TrainConfig:
    from studio.training.runs import resolve_config

    return resolve_config(preset=preset or None, overrides=overrides, presets_root=settings.workspace / "presets")


def config_from_form(values: dict, settings: Settings) -> TrainConfig:
    """The whole form (TRAIN_FIELDS) as one validated TrainConfig."""
    names = values["datasets"] or []
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise ConfigError("choose a dataset folder first (the Caption tab prepares one in workspace/datasets)")
    preset, overrides = form_overrides(values, [dataset_path(settings, name) for name in names])
    return preset_config(settings, preset, overrides)


def run_name(dataset: str) -> str:
    """An output name from a dataset folder's name (what TrainConfig.output_name accepts)."""
    name = "".join(ch if ch.isalnum() or ch in "._- " else "_" for ch in Path(dataset).name).strip(" .")
    return name or "lora"


def form_values(config: TrainConfig) -> dict:
    """A config as the form shows it (every PRESET_FIELDS name)."""
    data = config.model_dump(mode="json")
    values = {name: data[name] for name in PRESET_FIELDS if name in data}
    values.update({name: 0 for name in _SHOWN_AS_ZERO if values.get(name, 0) is None})
    values.update(resolution=", ".join(str(r) for r in config.resolutions),
                  sample_prompts="\n".join(config.sample_prompts), sample_size="{}x{}".format(*config.sample_size))
    values.update({f"mixed_{key}": data["mixed_captions"][key] for key in MIXED_KEYS})
    return values


def save_preset(values: dict, settings: Settings, name: str) -> Path:
    """Save the form as the user's train preset `name`: the recipe (what differs from the
    defaults), not this run's datasets and name. No dataset needs to be chosen for it."""
    from studio.models.catalog import load_catalog
    from studio.paths import Resolver

    preset, overrides = form_overrides(values, [])
    config = Resolver.for_settings(settings).train_config(preset_config(settings, preset, overrides), load_catalog())
    recipe = config.model_dump(mode="json", exclude_none=True)  # its model paths lie in the workspace
    defaults = preset_config(settings, "").model_dump(mode="json", exclude_none=True)
    for key in ("datasets", "output_name"):
        recipe.pop(key), defaults.pop(key)
    return preset_store(settings).save(name, recipe, defaults)



# -- the components ------------------------------------------------------------------------------
def build_essentials(ctx: AppContext, f: dict, c: dict, d: dict, preset: str) -> None:
    """The preset, the datasets (with their summary) and the settings most runs change."""
    if ctx.settings.zero_gpu:
        gr.Markdown("⚠ On a ZeroGPU Space each GPU call is capped at a few minutes: train on a dedicated GPU Space "
                    "or your own machine.")
    f["preset"] = gr.Dropdown(preset_store(ctx.settings).names(), value=preset, label="Preset",
                              info="fills the form; its other settings (bucket sizes, sample CFG) apply as they are",
                              elem_id="train-preset")
    with gr.Row(equal_height=False):
        f["datasets"] = gr.Dropdown(dataset_choices(ctx.settings), value=[], multiselect=True, label="Datasets",
                                    info="folders in workspace/datasets (the Caption tab makes them); several combine",
                                    scale=4, elem_id="train-datasets")
        f["num_repeats"] = gr.Number(0, label="Repeats", precision=0, minimum=0, scale=1, min_width=90,
                                     info="0: as the folders say")
        c["datasets_refresh"] = gr.Button("↻", size="sm", scale=0, min_width=40, elem_id="train-datasets-refresh")
    f["balance_concepts"] = gr.Checkbox(d["balance_concepts"], label="Balance concepts",
                                        info="give each concept its share of an epoch (equal unless the Caption "
                                             "tab's concept list sets one)", elem_id="train-balance")
    c["summary"] = gr.Markdown("Choose a dataset to see its images, buckets and steps.", elem_id="train-summary")
    with gr.Row():
        c["plan_button"] = gr.Button("Plan memory", scale=1, min_width=120, elem_id="train-plan-button")
        c["plan"] = gr.Markdown("How much GPU memory (or RAM) this run needs, and what would lower it: nothing is "
                                "loaded to tell.", elem_id="train-plan")
    with gr.Accordion("Buckets", open=False):
        c["buckets"] = gr.Dataframe(headers=["resolution", "bucket", "images", "with repeats"], interactive=False,
                                    max_height=240)
    with gr.Row():
        from studio.ui.generate_tab import model_choices

        f["pretrained_model"] = gr.Dropdown(model_choices(ctx, "sdxl"), value=d["pretrained_model"],
                                            label="Base model", scale=3,
                                            allow_custom_value=True, info="catalog name, hub id or a workspace path")
        f["output_name"] = gr.Textbox("lora", label="Output name", info="LoRA file and run folder name", scale=2,
                                      elem_id="train-output-name")
    with gr.Row():
        f["network_dim"] = gr.Slider(1, 128, value=d["network_dim"], step=1, label="Network dim (rank)",
                                     elem_id="train-network-dim")
        f["network_alpha"] = gr.Number(d["network_alpha"], label="Network alpha", minimum=0)
        f["learning_rate"] = gr.Number(d["learning_rate"], label="Learning rate", minimum=0)
    with gr.Row():
        f["max_train_steps"] = gr.Number(d["max_train_steps"], label="Max steps", precision=0, minimum=0,
                                         elem_id="train-max-steps")
        f["max_train_epochs"] = gr.Number(d["max_train_epochs"], label="Max epochs", precision=0, minimum=0,
                                          info="0: by steps; else wins")
        f["train_batch_size"] = gr.Slider(1, 16, value=d["train_batch_size"], step=1, label="Batch size")
        f["resolution"] = gr.Textbox(d["resolution"], label="Resolution", info="e.g. 1024, or 768, 1024")
    with gr.Row():
        f["shuffle_caption"] = gr.Checkbox(d["shuffle_caption"], label="Shuffle tags")
        f["keep_tokens"] = gr.Number(d["keep_tokens"], label="Keep tokens", precision=0, minimum=0,
                                     info="first tags kept in place: the trigger word")
        f["caption_tag_dropout_rate"] = gr.Slider(0, 0.5, value=d["caption_tag_dropout_rate"], step=0.01,
                                                  label="Tag dropout", scale=2, min_width=260,
                                                  info="share of tags left out each step", elem_id="train-tag-dropout")


def build_advanced(f: dict, c: dict, d: dict) -> None:
    """Everything else a run can change, under the Advanced accordion."""
    with gr.Row():
        f["network_type"] = gr.Dropdown(list(NetworkType.__args__), value=d["network_type"], label="Network type")
        f["network_target"] = gr.Dropdown(list(NetworkTarget.__args__), value=d["network_target"],
                                          label="Trained layers")
    gr.Markdown(LOKR_NOTE)
    with gr.Row():
        f["optimizer_type"] = gr.Dropdown(list(OPTIMIZER_NAMES), value=d["optimizer_type"], label="Optimizer",
                                          info="AdamW8bit, Prodigy, Lion need their packages")
        f["lr_scheduler"] = gr.Dropdown(list(SCHEDULER_NAMES), value=d["lr_scheduler"], label="LR scheduler")
        f["lr_warmup_steps"] = gr.Number(d["lr_warmup_steps"], label="Warmup steps", precision=0, minimum=0)
    with gr.Row():
        f["lr_scheduler_num_cycles"] = gr.Number(d["lr_scheduler_num_cycles"], label="Restarts (cycles)", precision=0,
                                                 minimum=1)
        f["lr_cycle_decay"] = gr.Number(d["lr_cycle_decay"], label="Cycle decay", info="each restart's peak")
        f["min_lr_ratio"] = gr.Number(d["min_lr_ratio"], label="Min LR ratio")
        f["weight_decay"] = gr.Number(d["weight_decay"], label="Weight decay", minimum=0)
    with gr.Row():
        f["gradient_accumulation_steps"] = gr.Number(d["gradient_accumulation_steps"], label="Gradient accumulation",
                                                     precision=0, minimum=1)
        f["noise_offset"] = gr.Number(d["noise_offset"], label="Noise offset", minimum=0)
        f["min_snr_gamma"] = gr.Number(d["min_snr_gamma"], label="Min-SNR gamma", minimum=0, info="0: off")
        f["mixed_precision"] = gr.Dropdown(["no", "fp16", "bf16"], value=d["mixed_precision"], label="Precision")
    with gr.Row():
        f["gradient_checkpointing"] = gr.Checkbox(d["gradient_checkpointing"], label="Gradient checkpointing")
        f["fp8_base"] = gr.Checkbox(d["fp8_base"], label="fp8 base", info="the frozen model in float8: less memory")
        f["torch_compile"] = gr.Checkbox(d["torch_compile"], label="torch.compile",
                                         info="faster GPU steps after minutes of compiling")
        f["cache_latents"] = gr.Checkbox(d["cache_latents"], label="Cache latents")
        f["cache_text_encoder_outputs"] = gr.Checkbox(d["cache_text_encoder_outputs"], label="Cache text encoder")
        f["flip_aug"] = gr.Checkbox(d["flip_aug"], label="Flip images")
        f["max_token_length"] = gr.Dropdown([75, 150, 225], value=d["max_token_length"], label="Caption tokens",
                                            info="SDXL: longer tag lists in 75-token chunks, as generation reads "
                                                 "prompts (kohya's max_token_length)")
    f["caption_scheme"] = gr.Radio(["kohya", "mixed"], value=d["caption_scheme"], label="Captions",
                                   info="kohya: the tag file; mixed: tags and NL captions (_nl.txt) by weight")
    with gr.Row(visible=d["caption_scheme"] == "mixed") as c["mixed_row"]:  # shown for the mixed scheme
        for key, label in (("weight_tags", "tags"), ("weight_nl", "NL"), ("weight_tags_nl", "tags + NL"),
                           ("weight_nl_tags", "NL + tags"), ("tag_dropout", "tag dropout"),
                           ("keep_first", "keep first")):
            f[f"mixed_{key}"] = gr.Number(d[f"mixed_{key}"], label=f"Mixed: {label}", min_width=90,
                                          precision=0 if key == "keep_first" else None)
    with gr.Row():
        f["validation_images"] = gr.Number(d["validation_images"], label="Validation images", precision=0, minimum=0,
                                           info="held out")
        f["validate_every_n_steps"] = gr.Number(d["validate_every_n_steps"], label="Validate every N steps",
                                                precision=0, minimum=0, info="0: never")
        f["save_every_n_steps"] = gr.Number(d["save_every_n_steps"], label="Save every N steps", precision=0,
                                            minimum=0, info="0: never")
        f["save_every_n_epochs"] = gr.Number(d["save_every_n_epochs"], label="Save every N epochs", precision=0,
                                             minimum=0, info="0: never")
        f["save_last_n"] = gr.Number(d["save_last_n"], label="Keep last", precision=0, minimum=1, info="checkpoints")
    f["sample_prompts"] = gr.Textbox(d["sample_prompts"], label="Sample prompts (one per line)", lines=2)
    with gr.Row():
        f["sample_every_n_steps"] = gr.Number(d["sample_every_n_steps"], label="Sample every N steps", precision=0,
                                              minimum=0, info="0: at the end only")
        f["sample_steps"] = gr.Number(d["sample_steps"], label="Sample steps", precision=0, minimum=1)
        f["sample_size"] = gr.Textbox(d["sample_size"], label="Sample size", info="WIDTHxHEIGHT")
        f["evaluate_every_save"] = gr.Checkbox(d["evaluate_every_save"], label="Evaluate each save",
                                               info="per concept: fidelity, bleed, flexibility",
                                               elem_id="train-evaluate-every-save")
        f["seed"] = gr.Number(d["seed"], label="Seed", precision=0, minimum=0)


