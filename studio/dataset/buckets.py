"""Aspect-ratio bucketing, exactly as kohya sd-scripts does it (library/train_util.py BucketManager
and make_bucket_resolutions), so that a preview here is what training does.

The buckets (upscale mode, the default). With area A = width * height of `resolution` and step s:
  1. the square bucket: side = floor(sqrt(A) / s) * s, the largest multiple of s whose square
     fits in A;
  2. for every width w = min_bucket_reso, min + s, ..., up to max_bucket_reso: the tallest height
     that fits, h = min(max_bucket_reso, floor(A // w / s) * s); if h >= min_bucket_reso, both
     (w, h) and (h, w) are buckets.
  The set is sorted by (width, height). It is not every (w, h) under the area: only, per width,
  the tallest height that fits, so every bucket is about A pixels.

Choosing a bucket for a W x H image:
  - if (W, H) is itself a bucket, that one;
  - else the bucket whose aspect ratio w/h is closest to W/H (absolute difference), ties going to
    the first in sorted order (numpy argmin);
  - the image is resized to cover the bucket (matching heights when the image is wider than the
    bucket, else widths), each side rounded half up (int(x + 0.5)), then cropped to the bucket,
    centred (sd-scripts: trim // 2; random_crop is a training option).
No-upscale mode (bucket_no_upscale): no predefined buckets, min/max are ignored. An image larger
than A is first scaled to area A keeping its aspect ratio (rounding the side that keeps the aspect
ratio closest, see `_no_upscale_size`); the bucket is that size rounded down to multiples of s.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from studio.dataset.config import BucketConfig
from studio.dataset.model import DatasetItem

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketAssignment:
    bucket: Size
    resized: Size  # the image is resized to this before cropping
    crop: Size  # (left, top) of the centred crop, in resized pixels
    ar_error: float  # bucket aspect ratio minus image aspect ratio


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            step: int = 64) -> list[Size]:
    """kohya's predefined buckets for a `max_reso` area (see the module docstring)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


class Bucketer:
    """Assigns images to buckets for one BucketConfig."""

    def __init__(self, config: BucketConfig):
        self.config = config
        self.step = config.bucket_reso_steps
        self.max_area = config.max_reso[0] * config.max_reso[1]
        if config.no_upscale:
            self.resolutions: tuple[Size, ...] = ()
        else:
            self.resolutions = tuple(make_bucket_resolutions(
                config.max_reso, config.min_bucket_reso, config.max_bucket_reso, self.step))
        self._known = frozenset(self.resolutions)
        self._ratios = [w / h for w, h in self.resolutions]

    def select(self, width: int, height: int) -> BucketAssignment:
        if width < 1 or height < 1:
            raise ValueError(f"image size {width}x{height} is empty")
        aspect = width / height
        if self.config.no_upscale:
            resized = self._no_upscale_size(width, height, aspect)
            bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
            if 0 in bucket:
                raise ValueError(f"{width}x{height} has a side under the bucket step {self.step}: "
                                 "without upscaling it fits no bucket")
        else:
            bucket = (width, height) if (width, height) in self._known else self._closest(aspect)
            # cover the bucket: match heights when the image is wider than the bucket
            scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        crop = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
        return BucketAssignment(bucket, resized, crop, bucket[0] / bucket[1] - aspect)

    def _closest(self, aspect: float) -> Size:
        errors = [abs(ratio - aspect) for ratio in self._ratios]
        return self.resolutions[errors.index(min(errors))]  # first minimum, as numpy's argmin

    def _no_upscale_size(self, width: int, height: int, aspect: float) -> Size:
        if width * height <= self.max_area:
            return width, height
        # Scale to the bucket area, then round one side to the step and derive the other; keep the
        # rounding (by width or by height) whose aspect ratio is closer to the image's.
        scaled_w = math.sqrt(self.max_area * aspect)
        scaled_h = self.max_area / scaled_w
        by_w = self._round_to_step(scaled_w)
        h_for_w = self._round_to_step(by_w / aspect)
        by_h = self._round_to_step(scaled_h)
        w_for_h = self._round_to_step(by_h * aspect)
        error_w = abs(by_w / h_for_w - aspect) if h_for_w else math.inf
        error_h = abs(w_for_h / by_h - aspect) if by_h else math.inf
        if error_w < error_h:
            return by_w, int(by_w / aspect + 0.5)
        return int(by_h * aspect + 0.5), by_h

    def _round_to_step(self, x: float) -> int:
        rounded = int(x + 0.5)
        return rounded - rounded % self.step


@dataclass(frozen=True)
class BucketPreview:
    assignments: dict[str, BucketAssignment]  # by item rel
    images: dict[Size, int]  # images per bucket, buckets sorted
    samples: dict[Size, int]  # images x repeats per bucket: what one epoch sees
    unbucketable: tuple[tuple[str, str], ...] = ()  # (rel, why): only in no-upscale mode

    def table(self) -> list[tuple[str, int, int]]:
        """('832x1216', images, samples per epoch) rows for the UI."""
        return [(f"{w}x{h}", n, self.samples[(w, h)]) for (w, h), n in self.images.items()]


def preview_buckets(items: Iterable[DatasetItem], config: BucketConfig) -> BucketPreview:
    bucketer = Bucketer(config)
    assignments: dict[str, BucketAssignment] = {}
    images: Counter[Size] = Counter()
    samples: Counter[Size] = Counter()
    unbucketable = []
    for item in items:
        try:
            assignment = bucketer.select(item.width, item.height)
        except ValueError as exc:
            unbucketable.append((item.rel, str(exc)))
            continue
        assignments[item.rel] = assignment
        images[assignment.bucket] += 1
        samples[assignment.bucket] += item.repeats
    return BucketPreview(assignments, dict(sorted(images.items())), dict(sorted(samples.items())),
                         tuple(unbucketable))
