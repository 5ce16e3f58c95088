"""A demo training run with two concepts (kohya folders 2_alice and 2_bob) and two checkpoints, for the
checkpoint evaluation's tests; a workspace whose models/ is the session's demo models cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

TINY = {"seeds": 1, "steps": 1, "cfg_scale": 1.0}  # 64x64 (the demo models' default), one step, no CFG
CONCEPTS = {"2_alice": "alice, 1girl, solo, long hair, blue eyes, shirt", "2_bob": "bob, 1boy, solo, short hair, hat"}


def make_concept_dataset(folder: Path) -> Path:
    for sub, caption in CONCEPTS.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(sub))
        for i in range(2):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(folder / sub / f"i{i}.png")
            (folder / sub / f"i{i}.txt").write_text(caption)
    return folder


def workspace_with_models(root: Path, models: Path) -> Path:
    """`root` as a workspace whose models/ is `models` (the demo models, built once per session)."""
    (root / "runs").mkdir(parents=True, exist_ok=True)
    if not (root / "models").exists():
        (root / "models").symlink_to(models, target_is_directory=True)
    return root


def train_run(ws: Path, name: str, **overrides) -> Path:
    """A finished run in ws/runs/<name>: checkpoints at step 3 and the final one at step 6 by default."""
    from studio.training.runs import write_run_config
    from studio.training.trainer import train
    from tests.train_fixtures import fast_config

    dataset = make_concept_dataset(ws / "datasets" / "pair")
    config = fast_config(dataset, **{"save_every_n_steps": 3, "max_train_steps": 6, "output_name": name,
                                     **overrides})
    run_dir = ws / "runs" / name
    write_run_config(run_dir, config)
    result = train(config, run_dir=run_dir, models_dir=ws / "models", cache_dir=ws / "cache")
    assert result.status == "done", result.message
    return run_dir


def copy_run(run_dir: Path, name: str) -> Path:
    """A copy of a run (without its evaluation) beside it."""
    target = run_dir.parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("evaluation*"))
    return target
