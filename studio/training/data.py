"""Training data: dataset folders -> samples with their captions and aspect-ratio buckets, and a
deterministic batch plan (the same seed and epoch give the same batches, which is what makes an
exact resume possible without saving a data-loader state)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from studio.errors import DatasetError
from studio.training.config import TrainConfig

Size = tuple[int, int]


@dataclass(frozen=True)
class TrainSample:
    image: Path
    tags: tuple[str, ...]
    nl: str
    repeats: int
    original: Size  # (width, height) of the image file
    bucket: Size  # (width, height) trained at
    resized: Size  # the image is resized to this, then cropped to the bucket
    crop: Size  # (left, top) of the crop in resized pixels
    resolution: int

    @property
    def bucket_key(self) -> tuple[int, int, int]:
        return (self.resolution, *self.bucket)


@dataclass
class DataReport:
    train: list[TrainSample]
    validation: list[TrainSample]
    warnings: list[str]
    tag_frequency: dict[str, dict[str, int]]  # {dataset_dir: {tag: count}}, for ss_tag_frequency

    @property
    def images(self) -> int:
        return len({s.image for s in self.train})


def _balanced_repeats(dataset, warnings: list[str], character_tags) -> dict[str, int]:
    """{image rel: repeats} that give each of the dataset's concepts its target share of an epoch;
    an image of several concepts takes the largest; images of no concept keep their own."""
    from studio.dataset.concepts import dataset_concepts

    report = dataset_concepts(dataset, character_tags=character_tags)
    repeats = report.balanced_repeats()
    out: dict[str, int] = {}
    for concept in report.concepts:
        for rel in concept.images:
            out[rel] = max(out.get(rel, 0), repeats[concept.name])
    warnings.append(f"{dataset.root.name}: concepts balanced: " + ", ".join(
        f"{c.name} {len(c.images)} images x{repeats[c.name]}" for c in report.concepts))
    return out


def collect_samples(config: TrainConfig, character_tags: frozenset[str] = frozenset()) -> DataReport:
    """Every usable image of every dataset, at every training resolution, with its bucket.
    `character_tags`: the tagger's character tags, for finding concepts (balance_concepts)."""
    from studio.dataset.buckets import Bucketer
    from studio.dataset.config import BucketConfig
    from studio.dataset.dataset import Dataset

    if not config.datasets:
        raise DatasetError("no dataset given: add a dataset folder (the Caption tab prepares one)")
    bucketers = {
        r: Bucketer(BucketConfig(resolution=r, min_bucket_reso=config.min_bucket_reso,
                                 max_bucket_reso=config.max_bucket_reso, bucket_reso_steps=config.bucket_reso_steps,
                                 no_upscale=config.bucket_no_upscale))
        for r in config.resolutions
    }
    images, warnings, frequency = [], [], {}
    for source in config.datasets:
        dataset = Dataset.open(Path(source.path))
        warnings += [f"{p.path.name}: {p.reason}" for p in dataset.report.problems if p.severity == "skip"]
        counts: dict[str, int] = defaultdict(int)
        balanced = _balanced_repeats(dataset, warnings, character_tags) if config.balance_concepts else {}
        for item in dataset.items:
            tags, nl = dataset.read_tags(item), dataset.read_nl(item)
            if not tags and not nl:
                if not config.allow_empty_captions:
                    warnings.append(f"{item.rel}: no caption file; skipped (allow_empty_captions trains it on '')")
                    continue
                warnings.append(f"{item.rel}: no caption; trained with an empty caption")
            for tag in tags:
                counts[tag] += 1
            repeats = source.num_repeats if source.num_repeats and dataset.report.layout == "flat" else item.repeats
            repeats = balanced.get(item.rel, repeats)
            images.append((item, tuple(tags), nl, repeats))
        frequency[Path(source.path).name] = dict(counts)
    if not images:
        raise DatasetError("the datasets hold no trainable image (see the warnings: missing captions or bad files)")
    validation_paths = _validation_images([item.image for item, *_ in images], config.validation_images, config.seed)
    train, validation = [], []
    for item, tags, nl, repeats in images:
        for resolution, bucketer in bucketers.items():
            chosen = bucketer.select(item.width, item.height)
            sample = TrainSample(item.image, tags, nl, repeats, (item.width, item.height), chosen.bucket,
                                 chosen.resized, chosen.crop, resolution)
            (validation if item.image in validation_paths else train).append(sample)
    if not train:
        raise DatasetError(f"all {len(images)} images are held out for validation: lower validation_images")
    return DataReport(train, validation, warnings, frequency)


def _validation_images(paths: list[Path], count: int, seed: int) -> set[Path]:
    if count <= 0:
        return set()
    if count >= len(paths):
        raise DatasetError(f"validation_images={count} would hold out every one of the {len(paths)} images")
    return set(random.Random(seed).sample(sorted(paths), count))


class BatchPlan:
    """Batches of sample indices for each epoch, kohya-style: each sample repeated `repeats` times,
    grouped by bucket, shuffled within buckets, cut into batches, batch order shuffled. Depends only
    on (seed, epoch), so any step of any epoch can be recomputed."""

    def __init__(self, samples: list[TrainSample], batch_size: int, seed: int, keep_partial: bool = True):
        self.samples, self.batch_size, self.seed, self.keep_partial = samples, batch_size, seed, keep_partial
        self._cache: dict[int, list[list[int]]] = {}
        if not self.epoch(0):
            raise DatasetError(f"no bucket holds a full batch of {batch_size}: lower the batch size")

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            by_bucket: dict[tuple, list[int]] = defaultdict(list)
            for index, sample in enumerate(self.samples):
                by_bucket[sample.bucket_key] += [index] * sample.repeats
            batches = []
            for key in sorted(by_bucket):
                indices = by_bucket[key]
                rng.shuffle(indices)
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    if len(batch) == self.batch_size or self.keep_partial:
                        batches.append(batch)
            rng.shuffle(batches)
            self._cache = {epoch: batches}  # only the current epoch is kept
        return self._cache[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))


def load_pixels(sample: TrainSample, flip: bool):
    """The sample's image resized and cropped into its bucket, as a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    from studio.dataset.images import load_rgb

    image = load_rgb(sample.image).resize(sample.resized, Image.LANCZOS)
    left, top = sample.crop
    image = image.crop((left, top, left + sample.bucket[0], top + sample.bucket[1]))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def crop_for(sample: TrainSample, flip: bool) -> Size:
    """(left, top) crop offsets as SDXL's time ids see them; a flip mirrors the left offset."""
    left, top = sample.crop
    return (sample.resized[0] - sample.bucket[0] - left if flip else left, top)
