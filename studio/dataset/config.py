"""Validated options for the dataset actions (same style as studio/schemas.py: pydantic,
extra="forbid"; build them from a form with `studio.schemas.validate` to get a ConfigError)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from studio.dataset.images import DEFAULT_MAX_PIXELS

GiB = 1024**3


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScanOptions(_Config):
    # "quick": tail check per format, decode only suspicious files; "full": decode every image;
    # "none": trust the headers (fastest, misses truncated files).
    check: Literal["none", "quick", "full"] = "quick"
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # declared sizes above this are skipped unread


class ImportLimits(_Config):
    """Refuse uploads and archives beyond these (a zip bomb, a mistaken drop of a whole drive)."""

    max_files: int = Field(20_000, ge=1)
    max_total_bytes: int = Field(20 * GiB, ge=1)  # uncompressed


class BucketConfig(_Config):
    """kohya's bucketing options (sd-scripts names: resolution, min_bucket_reso, max_bucket_reso,
    bucket_reso_steps, bucket_no_upscale). `resolution` is one side or (width, height); the bucket
    area is width * height."""

    resolution: int | tuple[int, int] = 1024
    min_bucket_reso: int = Field(256, ge=8)
    max_bucket_reso: int = Field(2048, ge=8)
    bucket_reso_steps: int = Field(64, ge=8)
    no_upscale: bool = False

    @field_validator("resolution")
    @classmethod
    def _positive(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        sides = value if isinstance(value, tuple) else (value,)
        if any(side < 64 for side in sides):
            raise ValueError(f"resolution {value} is too small: use at least 64 (typically 1024)")
        return value

    @property
    def max_reso(self) -> tuple[int, int]:
        """(width, height) whose product is the largest bucket area."""
        res = self.resolution
        return res if isinstance(res, tuple) else (res, res)

    @model_validator(mode="after")
    def _consistent(self) -> BucketConfig:
        step = self.bucket_reso_steps
        if step % 8:
            raise ValueError(f"bucket_reso_steps {step} must be a multiple of 8 (the VAE's scale), e.g. 64")
        for name in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, name)
            if value % step:
                raise ValueError(f"{name} {value} must be a multiple of bucket_reso_steps {step}, "
                                 f"e.g. {value - value % step or step}")
        if self.min_bucket_reso > min(self.max_reso):
            raise ValueError(f"min_bucket_reso {self.min_bucket_reso} is above the resolution {self.max_reso}")
        if self.max_bucket_reso < max(self.max_reso):
            raise ValueError(f"max_bucket_reso {self.max_bucket_reso} is below the resolution {self.max_reso}")
        return self
