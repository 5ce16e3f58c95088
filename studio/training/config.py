"""TrainConfig: one validated object for a LoRA training run. Key names follow kohya sd-scripts
where users know them (network_dim, learning_rate, train_batch_size, ...). Presets are sparse TOML
files merged over these defaults (see studio.presets)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from studio.training.captions import KohyaCaptionConfig, MixedCaptionConfig

NetworkType = Literal["lora", "dora", "lokr", "loha"]
NetworkTarget = Literal["attention", "attention_ff", "all"]
# What changing would make a resumed run differ from the one it continues (anything else, such as
# how often to sample or save, may change between stop and resume).
RESUME_INVARIANT = (
    "pretrained_model", "vae", "datasets", "resolution", "min_bucket_reso", "max_bucket_reso",
    "bucket_reso_steps", "bucket_no_upscale", "flip_aug", "caption_scheme", "shuffle_caption", "keep_tokens",
    "keep_tokens_separator", "caption_tag_dropout_rate", "caption_dropout_rate", "mixed_captions", "max_token_length",
    "network_type", "network_target", "network_dim", "network_alpha", "train_text_encoder", "train_llm_adapter", "learning_rate",
    "unet_lr", "text_encoder_lr", "llm_adapter_lr", "optimizer_type", "optimizer_args", "weight_decay", "lr_scheduler",
    "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_cycle_decay", "min_lr_ratio", "max_train_steps",
    "max_train_epochs", "train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "noise_offset",
    "min_snr_gamma", "v_parameterization", "zero_terminal_snr", "mixed_precision", "seed", "validation_images",
    "balance_concepts",
)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(_Config):
    """A dataset folder (flat, or kohya repeat folders `10_name/`); num_repeats overrides a flat
    folder's repeats (repeat folders keep their own)."""

    path: str = Field(min_length=1)
    num_repeats: int | None = Field(None, ge=1, le=1000)


MAX_SIDE = 4096  # training resolutions and buckets (SDXL and Anima train at 1024-1536)
MAX_SAMPLE_SIDE = 2048  # sample images during training


class TrainConfig(_Config):
    # -- model --------------------------------------------------------------------------------
    pretrained_model: str = "animagine-xl-3.1"
    vae: str = ""
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    # -- data -----------------------------------------------------------------------------------
    datasets: list[DataSource] = []
    resolution: int | list[int] = 1024  # a list trains at several resolutions (multi-res buckets)
    min_bucket_reso: int = Field(256, ge=64, le=MAX_SIDE)
    max_bucket_reso: int = Field(2048, ge=64, le=MAX_SIDE)
    bucket_reso_steps: int = Field(64, ge=8, le=512)
    bucket_no_upscale: bool = False
    flip_aug: bool = False
    allow_empty_captions: bool = False  # images without a caption file train on "" only if asked
    validation_images: int = Field(0, ge=0)  # held out from training, for the validation loss
    # each dataset's concepts (studio.dataset.concepts: repeat folders, triggers, character tags, or
    # the list saved in the Caption tab) get their target share of an epoch (equal by default):
    # each image's repeats become its concept's balanced repeats
    balance_concepts: bool = False
    caption_scheme: Literal["kohya", "mixed"] = "kohya"
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0)
    keep_tokens_separator: str = "|||"
    caption_tag_dropout_rate: float = Field(0.0, ge=0, lt=1)
    caption_dropout_rate: float = Field(0.0, ge=0, lt=1)
    # SDXL: captions up to 75 (one CLIP window), 150 or 225 tokens, in 75-token chunks as generation
    # encodes prompts (kohya's max_token_length); Anima's Qwen3 encoder takes long captions anyway
    max_token_length: Literal[75, 150, 225] = 75
    mixed_captions: MixedCaptionConfig = MixedCaptionConfig()
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = False
    # -- network --------------------------------------------------------------------------------
    network_type: NetworkType = "lora"
    network_target: NetworkTarget = "attention_ff"
    network_dim: int = Field(16, ge=1, le=1024)
    network_alpha: float = Field(8.0, gt=0)
    train_text_encoder: bool = False
    train_llm_adapter: bool = False  # Anima: LoRA on the text conditioner ("LLM adapter") as well
    # -- optimisation ---------------------------------------------------------------------------
    learning_rate: float = Field(1e-4, gt=0)
    unet_lr: float | None = Field(None, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0)
    llm_adapter_lr: float | None = Field(None, gt=0)  # Anima: the LLM adapter's own LR (else text_encoder_lr)
    optimizer_type: str = "AdamW"
    optimizer_args: dict[str, float | int | bool | str | list[float]] = {}
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    lr_cycle_decay: float = Field(1.0, gt=0, le=1)  # each restart's peak = previous peak * decay (Animagine: 0.9)
    min_lr_ratio: float = Field(0.0, ge=0, lt=1)
    max_train_steps: int | None = Field(1600, ge=1, le=1_000_000)
    max_train_epochs: int | None = Field(None, ge=1, le=100_000)  # when set, wins over max_train_steps
    train_batch_size: int = Field(1, ge=1, le=256)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    noise_offset: float = Field(0.0, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = False
    # kohya's fp8_base: the frozen denoiser stored in float8 (e4m3), each layer cast up to the
    # compute dtype as it runs (network.store_in_fp8); the network stays fp32. Saves about half the
    # base weights' memory; best with gradient checkpointing.
    fp8_base: bool = False
    # torch.compile the denoiser (TorchInductor): faster steps on a GPU once compiled; the first
    # step(s) take minutes while it compiles, which the run log reports
    torch_compile: bool = False
    seed: int = Field(42, ge=0, le=2**32 - 1)
    # -- outputs --------------------------------------------------------------------------------
    output_name: str = Field("lora", min_length=1, pattern=r"^[\w.\- ]+$")
    save_every_n_steps: int | None = Field(None, ge=0)  # 0 or None: never
    save_every_n_epochs: int | None = Field(1, ge=0)  # 0 or None: never
    save_last_n: int = Field(3, ge=1)
    save_diffusers_format: bool = False
    sample_every_n_steps: int | None = Field(None, ge=0)  # 0 or None: never
    sample_prompts: list[str] = Field([], max_length=16)
    sample_seed: int = 1234
    sample_steps: int = Field(20, ge=1, le=150)
    sample_size: tuple[int, int] = (832, 1216)  # each side 64 to MAX_SAMPLE_SIDE
    sample_cfg: float = Field(6.0, ge=0, le=30)
    # evaluate each checkpoint as it is saved (studio.evaluation.in_training): the fixed prompt set
    # per concept on the model being trained, tagged and scored into RUN/evaluation/
    evaluate_every_save: bool = False
    validate_every_n_steps: int | None = Field(None, ge=0)  # 0 or None: never
    log_every_n_steps: int = Field(1, ge=1)
    tensorboard: bool = True

    @field_validator("resolution")
    @classmethod
    def _resolutions(cls, value: int | list[int]) -> int | list[int]:
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > 8 or any(v < 64 or v > MAX_SIDE or v % 8 for v in values):
            raise ValueError(f"resolution {value}: each must be a multiple of 8 from 64 to {MAX_SIDE} (typically "
                             "1024), at most 8 of them")
        return value

    @field_validator("sample_size")
    @classmethod
    def _sample_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(v < 64 or v > MAX_SAMPLE_SIDE or v % 8 for v in value):
            raise ValueError(f"sample_size {list(value)}: each side must be a multiple of 8 from 64 to "
                             f"{MAX_SAMPLE_SIDE}")
        return value

    @field_validator("sample_prompts")
    @classmethod
    def _sample_prompts(cls, value: list[str]) -> list[str]:
        from studio.schemas import MAX_PROMPT_CHARS

        for prompt in value:
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"a sample prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.max_train_steps is None and self.max_train_epochs is None:
            raise ValueError("set max_train_steps or max_train_epochs: the run needs an end")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(f"min_bucket_reso {self.min_bucket_reso} is above max_bucket_reso {self.max_bucket_reso}")
        if self.cache_text_encoder_outputs and self.train_text_encoder:
            raise ValueError("cache_text_encoder_outputs cannot be used while training the text encoder")
        if self.cache_text_encoder_outputs and self.train_llm_adapter:
            raise ValueError("cache_text_encoder_outputs cannot be used while training the LLM adapter")
        if self.network_type in ("lokr", "loha") and self.network_target == "all":
            raise ValueError(f"{self.network_type} is trained on linear layers here; use network_target attention_ff")
        return self

    @property
    def resolutions(self) -> list[int]:
        return self.resolution if isinstance(self.resolution, list) else [self.resolution]

    def caption_config(self) -> KohyaCaptionConfig | MixedCaptionConfig:
        if self.caption_scheme == "mixed":
            return self.mixed_captions
        return KohyaCaptionConfig(shuffle_caption=self.shuffle_caption, keep_tokens=self.keep_tokens,
                                  keep_tokens_separator=self.keep_tokens_separator,
                                  caption_tag_dropout_rate=self.caption_tag_dropout_rate,
                                  caption_dropout_rate=self.caption_dropout_rate)

    def resume_fingerprint(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        data = self.model_dump(mode="json")
        return {key: data[key] for key in RESUME_INVARIANT}

    def fingerprint_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.resume_fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def changed_settings(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two resume fingerprints. A setting added to the studio
    after a run started is missing from its fingerprint: its default is what that run used."""
    defaults = TrainConfig().model_dump(mode="json")

    def filled(key: str, value):  # settings added inside a group (mixed_captions) since, likewise
        default = defaults.get(key)
        return {**default, **value} if isinstance(value, dict) and isinstance(default, dict) else value

    old = {key: filled(key, old.get(key, defaults.get(key))) for key in set(old) | set(new)}
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]
