"""A tiny captioned dataset and a fast TrainConfig for training tests on demo-sdxl."""

from pathlib import Path

import numpy as np
from PIL import Image

from studio.training.config import TrainConfig

TAGS = ["1girl, solo, red hair, smile", "1girl, solo, blue hair", "1boy, solo, hat", "1girl, long hair, outdoors"]


def make_dataset(folder: Path, count: int = 4, size=(96, 96)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(TAGS[i % len(TAGS)])
    return folder


def fast_config(dataset: Path, **overrides) -> TrainConfig:
    values = dict(
        pretrained_model="demo-sdxl", datasets=[{"path": str(dataset)}], resolution=64, min_bucket_reso=64,
        max_bucket_reso=128, bucket_reso_steps=32, network_dim=4, network_alpha=2.0, learning_rate=1e-3,
        optimizer_type="AdamW", max_train_steps=6, train_batch_size=2, mixed_precision="no",
        save_every_n_epochs=0, tensorboard=False, seed=7,
    )
    values.update(overrides)
    return TrainConfig(**values)
