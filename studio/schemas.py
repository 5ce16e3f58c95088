"""Validated configuration objects, one per action. UI forms and CLI flags are turned into these
at the boundary; domain code only ever sees a validated config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from studio.errors import ConfigError
from studio.generation.samplers import DEFAULT_SAMPLER, SAMPLERS

# Animagine XL 3.1's recommended resolutions (width, height): about one megapixel each.
ANIMAGINE_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)

AESTHETIC_TAGS = ("very aesthetic", "aesthetic", "displeasing", "very displeasing")
SCORE_TAGS = tuple(f"score_{n}" for n in range(9, 0, -1))  # Anima rates with score_9 (best) .. score_1
YEAR_TAGS = ("newest", "recent", "mid", "early", "oldest")
RATING_TAGS = ("safe", "sensitive", "nsfw", "explicit")
MAX_SEED = 2**32 - 1
# Prompts past this are refused before any tokenizer sees them (a 1 MB prompt cost minutes of CPU)
MAX_PROMPT_CHARS = 6000


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PromptStyle(_Config):
    """The special tags Animagine XL 3.1 was trained on, added around the user's prompt."""

    quality_tags: bool = True  # "masterpiece, best quality, very aesthetic, absurdres"
    aesthetic: Literal["", "very aesthetic", "aesthetic", "displeasing", "very displeasing"] = ""
    year: Literal["", "newest", "recent", "mid", "early", "oldest"] = ""
    rating: Literal["", "safe", "sensitive", "nsfw", "explicit"] = ""
    default_negative: bool = True  # merge the model's recommended negative prompt
    # Anima's own: a score tag in place of the default score_7, and an artist (written `@name`)
    score: Literal["", *SCORE_TAGS] = ""
    artist: str = Field("", max_length=100, pattern=r"^[^,\n]*$")


class LoraSpec(_Config):
    path: str = Field(min_length=1)
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class HiresConfig(_Config):
    """A1111-style hires fix: upscale the first-pass image, then img2img at `denoise`."""

    scale: float = Field(1.5, gt=1.0, le=4.0)
    denoise: float = Field(0.55, gt=0.0, le=1.0)
    steps: int = Field(15, ge=1, le=150)


class GenerateConfig(_Config):
    model: str = ""  # catalog name, hub id, folder or .safetensors file; "" = the app's default
    vae: str = ""  # optional separate VAE (e.g. an fp16-fix VAE): folder, .safetensors or hub id
    prompt: str
    negative_prompt: str = ""
    style: PromptStyle = PromptStyle()
    width: int = Field(1024, ge=64, le=4096)
    height: int = Field(1024, ge=64, le=4096)
    steps: int = Field(28, ge=1, le=200)
    cfg_scale: float = Field(6.0, ge=0.0, le=30.0)
    sampler: str = DEFAULT_SAMPLER
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=8)
    batch_count: int = Field(1, ge=1, le=32)
    loras: list[LoraSpec] = []
    hires: HiresConfig | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty: describe the image, e.g. '1girl, solo'")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_not_huge(cls, value: str) -> str:
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS} (about "
                             f"{MAX_PROMPT_CHARS // 4} tokens, {MAX_PROMPT_CHARS // 300} CLIP chunks)")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (try {round(value / 8) * 8})")
        return value

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; choose one of: {', '.join(SAMPLERS)}")
        return value


GridAxisKind = Literal["lora", "lora_weight", "seed", "cfg", "steps"]


class GridAxis(_Config):
    """One axis of a comparison grid: what varies and its values, in order."""

    kind: GridAxisKind
    values: list[str | float | int] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _values_fit_kind(self) -> GridAxis:
        converters = {"lora": str, "lora_weight": float, "seed": int, "cfg": float, "steps": int}
        try:
            converted = [converters[self.kind](v) for v in self.values]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.kind} values must be {converters[self.kind].__name__}s: {exc}") from exc
        object.__setattr__(self, "values", converted)
        return self


def field_range(model_cls: type[BaseModel], name: str) -> str:
    """'1 to 200' from a field's ge/le (gt/lt) constraints."""
    bounds = {}
    for item in model_cls.model_fields[name].metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(item, attr, None) is not None:
                bounds[attr] = getattr(item, attr)
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    return f"{low} to {high}" if low is not None and high is not None else "see the form"


# The GenerateConfig field each grid axis sets (the LoRA axes act on the LoRA list)
AXIS_FIELDS = {"seed": "seed", "cfg": "cfg_scale", "steps": "steps"}
# A grid's whole cost: sampling steps summed over its cells, each weighted by its megapixels
# (the hires pass included): 16 x 8 cells of 28 steps at one megapixel fit; a grid past it is refused.
MAX_GRID_STEP_MEGAPIXELS = 4000.0


def step_megapixels(config: GenerateConfig) -> float:
    """Sampling steps x megapixels of one image of `config` (the hires pass included)."""
    pixels = config.width * config.height / 1024**2
    cost = config.steps * pixels
    if config.hires is not None:
        cost += config.hires.steps * pixels * config.hires.scale**2
    return cost


class GridConfig(_Config):
    base: GenerateConfig
    x: GridAxis
    y: GridAxis | None = None

    @model_validator(mode="after")
    def _distinct_axes(self) -> GridConfig:
        if self.y is not None and self.y.kind == self.x.kind:
            raise ValueError(f"both axes vary {self.x.kind}: pick two different things to compare")
        return self

    @model_validator(mode="after")
    def _cells_within_limits(self) -> GridConfig:
        """Each axis value passes the same limits as the form (steps 1-200, CFG 0-30, ...), and the
        whole grid's cost has a ceiling."""
        for name, axis in (("x", self.x), ("y", self.y)):
            if axis is None or axis.kind not in AXIS_FIELDS:
                continue
            field = AXIS_FIELDS[axis.kind]
            for value in axis.values:
                try:
                    GenerateConfig.model_validate({**self.base.model_dump(), field: value})
                except ValidationError as exc:
                    message = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{name} axis ({axis.kind}) value {value!r}: {message} "
                                     f"(allowed: {field_range(GenerateConfig, field)})") from None
        cells = len(self.x.values) * (len(self.y.values) if self.y else 1)
        steps = [self.base.steps]
        for axis in (self.x, self.y):
            if axis is not None and axis.kind == "steps":
                steps = axis.values
        cost = cells * max(step_megapixels(self.base.model_copy(update={"steps": s})) for s in steps)
        if cost > MAX_GRID_STEP_MEGAPIXELS:
            raise ValueError(f"this grid is too large: {cells} cells of up to {max(steps)} steps at "
                             f"{self.base.width}x{self.base.height} cost {cost:.0f} step-megapixels; the limit is "
                             f"{MAX_GRID_STEP_MEGAPIXELS:.0f}. Use fewer values, fewer steps or a smaller size.")
        return self


def validate(model_cls: type[_Config], data: dict) -> _Config:
    """Build a config, turning pydantic's error list into one readable ConfigError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or model_cls.__name__
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None
