"""`kill -9` in the middle of training, then `--resume`: the final LoRA is bit-identical to an
uninterrupted run. Real processes (`python -m studio train`), killed by SIGKILL at chosen
moments: between checkpoints, and while a checkpoint is being written (tests/slow_save makes each
save last a second, so that moment can be caught)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.train_fixtures import make_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """pretrained_model = "demo-sdxl"
resolution = 64
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32
network_dim = 4
network_alpha = 2.0
learning_rate = 1e-3
max_train_steps = 6
train_batch_size = 2
mixed_precision = "no"
save_every_n_steps = 2
save_every_n_epochs = 0
sample_every_n_steps = 0
shuffle_caption = true
caption_tag_dropout_rate = 0.2
flip_aug = true
seed = 7

[[datasets]]
path = "{dataset}"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_models_dir):
    root = tmp_path_factory.mktemp("kill")
    dataset = make_dataset(root / "data")
    (root / "ws").mkdir()
    (root / "ws" / "models").symlink_to(demo_models_dir, target_is_directory=True)
    (root / "cfg.toml").write_text(CONFIG.format(dataset=dataset))
    whole = root / "whole"
    subprocess.run(train_command(root, whole), cwd=ROOT, check=True, capture_output=True, timeout=600)
    return root, load_file(str(whole / "loras" / "lora.safetensors"))


def train_command(root: Path, run_dir: Path, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "studio", "train", "--workspace", str(root / "ws")]
    return command + (["--resume", str(run_dir)] if resume else [str(root / "cfg.toml"), "--output-dir", str(run_dir)])


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("kind") == "step":
            steps.append(event["step"])
    return steps


def writing_a_checkpoint(run_dir: Path) -> bool:
    """A temporary file of a save in progress (the state folder or the LoRA) exists."""
    return any(".tmp" in p.name for p in run_dir.rglob("*"))


@pytest.mark.parametrize("moment", [pytest.param("after step 3", marks=pytest.mark.slow),  # -m slow
                                    "while writing a checkpoint"])
def test_kill_9_then_resume_gives_the_uninterrupted_lora(setup, moment):
    root, expected = setup
    run_dir = root / moment.replace(" ", "-")
    slow_saves = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "slow_save"), str(ROOT)]))
    process = subprocess.Popen(train_command(root, run_dir), cwd=ROOT, env=slow_saves, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if moment == "after step 3" and 3 in steps_logged(run_dir):
            break
        if moment != "after step 3" and max(steps_logged(run_dir), default=0) >= 3 and writing_a_checkpoint(run_dir):
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before the moment ({moment}) was caught"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "loras" / "lora.safetensors").exists(), "it was killed before the end"
    resumed = subprocess.run(train_command(root, run_dir, resume=True), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_file(str(run_dir / "loras" / "lora.safetensors"))
    assert final.keys() == expected.keys()
    assert all(np.array_equal(final[key], expected[key]) for key in expected), "bit-identical to the whole run"
    assert sorted(set(steps_logged(run_dir))) == list(range(1, 7))
    messages = [json.loads(line).get("text") for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "resumed at step 2" in messages, "it continued from the last complete checkpoint, not from scratch"
