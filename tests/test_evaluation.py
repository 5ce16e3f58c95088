"""Checkpoint evaluation end to end on the demo models (a short demo training run with two concepts,
two checkpoints, one seed at 64x64): evaluation.json's shape and the images, a second evaluation
skipping what is done, Stop keeping a consistent partial file, the evaluation during training
equal to the one afterwards, path refusals and the CLI's exit codes. The numbers are noise here;
the mechanics are real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.errors import ConfigError, StudioError
from studio.evaluation.run import (
    EVALUATION_FILE,
    EvaluationConfig,
    evaluate,
    image_settings,
    read_evaluation,
    rescore,
)
from studio.evaluation.scoring import Bounds
from studio.paths import Resolver
from studio.schemas import validate
from tests.evaluation_fixtures import TINY, copy_run, train_run, workspace_with_models

ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_SET = (2 * 6 + 3) * TINY["seeds"]  # two concepts x (trigger, core tags, 4 poses) + 3 trigger-less


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_models_dir):
    return workspace_with_models(tmp_path_factory.mktemp("eval-ws"), demo_models_dir)


@pytest.fixture(scope="module")
def trained(ws):
    """A finished demo run with two concepts (alice, bob) and two checkpoints (step 3, final at 6)."""
    return train_run(ws, "pair")


def run_evaluation(manager, run_dir: Path, ws: Path, **values):
    return evaluate(manager, run_dir, validate(EvaluationConfig, {**TINY, **values}), resolver=Resolver(ws))


# -- end to end (slow) -------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_checkpoints_are_scored_per_concept_and_written_with_their_images(trained, ws, demo_manager):
    from studio.generation.infotext import parse_infotext, read_infotext

    run_dir = copy_run(trained, "pair-shape")
    result = run_evaluation(demo_manager, run_dir, ws)
    assert result.evaluated == ["pair-step00000003.safetensors", "pair.safetensors"] and not result.stopped
    data = json.loads((run_dir / "evaluation" / EVALUATION_FILE).read_text())
    assert data == result.data
    assert {"config", "checkpoints", "base", "recommended", "not_learned", "bounds"} <= set(data)
    assert [(c["file"], c["step"]) for c in data["checkpoints"]] == [("pair-step00000003.safetensors", 3),
                                                                    ("pair.safetensors", 6)]
    assert data["bounds"] == {"max_bleed": 0.25, "min_flexibility": 0.5, "min_fidelity": 0.5}
    assert data["config"]["width"] == 64 and data["config"]["seeds"] == [1000] and data["config"]["tagger"] == "demo-tagger"
    assert [c["name"] for c in data["config"]["concepts"]] == ["alice", "bob"]
    for entry in [data["base"], *data["checkpoints"]]:
        assert set(entry["scores"]) == {"alice", "bob"}
        for scores in entry["scores"].values():
            assert {"fidelity", "bleed", "flexibility"} <= set(scores)
            assert all(v is None or 0.0 <= v <= 1.0 for k, v in scores.items() if k != "images")
        assert len(entry["images"]) == IMAGES_PER_SET
    assert data["recommended"] in (None, "pair-step00000003.safetensors", "pair.safetensors")
    assert set(data["not_learned"]) <= {"alice", "bob"}
    # every image is on disk with the tags the tagger gave it and its infotext (the LoRA in the prompt)
    final = data["checkpoints"][1]["images"]
    assert {i["kind"] for i in final} == {"trigger", "core", "pose", "free"}
    first = run_dir / "evaluation" / final[0]["file"]
    assert Image.open(first).size == (64, 64) and isinstance(final[0]["tags"], list)
    prompt, _, params = parse_infotext(read_infotext(first))
    assert prompt.startswith("alice, ") and "<lora:pair:1>" in prompt and params["Seed"] == "1000"
    base_prompt, _, _ = parse_infotext(read_infotext(run_dir / "evaluation" / data["base"]["images"][0]["file"]))
    assert "<lora:" not in base_prompt

    # the same settings again: nothing is drawn; other bounds re-score what is there
    made = {p: p.stat().st_mtime_ns for p in (run_dir / "evaluation" / "images").rglob("*.png")}
    again = run_evaluation(demo_manager, run_dir, ws, max_bleed=0.0, min_flexibility=1.0)
    assert again.evaluated == [] and again.skipped == ["pair-step00000003.safetensors", "pair.safetensors"]
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "evaluation" / "images").rglob("*.png")} == made
    assert again.data["bounds"]["max_bleed"] == 0.0
    assert again.data["checkpoints"][0]["scores"] == data["checkpoints"][0]["scores"]
    loose = rescore(run_dir, Bounds(max_bleed=1.0, min_flexibility=0.0, min_fidelity=0.0))
    assert loose["recommended"] is not None and loose["not_learned"] == [], "within the loosest bounds"
    assert read_evaluation(run_dir)["bounds"]["max_bleed"] == 1.0


@pytest.mark.slow
def test_stop_keeps_the_finished_sets_and_the_next_evaluation_continues(trained, ws, demo_manager):
    run_dir = copy_run(trained, "pair-stop")
    stop = threading.Event()

    def report(fraction, message):  # Stop once the third set (the final checkpoint) is being drawn
        if message.startswith("3/3"):
            stop.set()

    config = validate(EvaluationConfig, TINY)
    result = evaluate(demo_manager, run_dir, config, resolver=Resolver(ws), report=report, stop=stop)
    assert result.stopped and result.evaluated == ["pair-step00000003.safetensors"]
    data = json.loads((run_dir / "evaluation" / EVALUATION_FILE).read_text())  # whole, valid JSON
    assert [c["file"] for c in data["checkpoints"]] == ["pair-step00000003.safetensors"]
    assert len(data["base"]["images"]) == IMAGES_PER_SET
    assert all((run_dir / "evaluation" / i["file"]).is_file() for i in data["checkpoints"][0]["images"])
    assert data["recommended"] in (None, "pair-step00000003.safetensors")
    # evaluating again draws only what was missing
    again = evaluate(demo_manager, run_dir, config, resolver=Resolver(ws))
    assert again.evaluated == ["pair.safetensors"] and again.skipped == ["pair-step00000003.safetensors"]
    assert len(again.data["checkpoints"]) == 2
    # other settings start over; the earlier evaluation is kept aside, not mixed in
    other = run_evaluation(demo_manager, run_dir, ws, seed=2000, checkpoints=["pair-step00000003.safetensors"])
    assert other.evaluated == ["pair-step00000003.safetensors"] and other.data["config"]["seeds"] == [2000]
    assert [c["file"] for c in other.data["checkpoints"]] == ["pair-step00000003.safetensors"]
    kept = json.loads((run_dir / "evaluation-previous" / EVALUATION_FILE).read_text())
    assert kept["config"]["seeds"] == [1000] and len(kept["checkpoints"]) == 2


@pytest.mark.slow
def test_evaluation_at_each_save_equals_the_evaluation_afterwards_and_leaves_training_alone(ws, demo_manager):
    """evaluate_every_save draws with the trainer's own model: the same pixels as evaluating the saved
    file afterwards (its base set too, with the adapters off), and the losses of a run without it."""
    from studio.training.loop import read_events

    evaluated = train_run(ws, "during", max_train_steps=2, save_every_n_steps=1, evaluate_every_save=True)
    plain = train_run(ws, "plain", max_train_steps=2, save_every_n_steps=1)
    losses = [[e["loss"] for e in read_events(run) if e["kind"] == "step"] for run in (evaluated, plain)]
    assert losses[0] == losses[1]
    messages = [e.get("text", "") for e in read_events(evaluated) if e["kind"] == "message"]
    assert any(m.startswith("evaluated during-step00000001.safetensors") for m in messages), messages
    during = read_evaluation(evaluated)
    assert [c["file"] for c in during["checkpoints"]] == ["during-step00000001.safetensors", "during.safetensors"]

    # afterwards, on a copy without the final checkpoint's entry: the base set is reused, the final redrawn
    copy = copy_run(evaluated, "during-after")
    shutil.copytree(evaluated / "evaluation", copy / "evaluation")
    partial = {**during, "checkpoints": during["checkpoints"][:1]}
    (copy / "evaluation" / EVALUATION_FILE).write_text(json.dumps(partial))
    after = evaluate(demo_manager, copy, EvaluationConfig(), resolver=Resolver(ws))
    assert after.evaluated == ["during.safetensors"] and after.data["config"] == during["config"]
    theirs, ours = during["checkpoints"][1], after.data["checkpoints"][1]
    assert theirs["scores"] == ours["scores"]
    for a, b in zip(theirs["images"], ours["images"]):
        pixels = [np.asarray(Image.open(root / "evaluation" / i["file"]), dtype=np.int16)
                  for root, i in ((evaluated, a), (copy, b))]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1 and a["tags"] == b["tags"]


@pytest.mark.slow
def test_anima_runs_are_evaluated_the_same_during_training_and_afterwards(tmp_path):
    from studio.models.demo_anima import ensure_demo_anima
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    ws = workspace_with_models(tmp_path / "ws", ensure_demo_anima(tmp_path / "models").parent)
    run_dir = train_run(ws, "an", pretrained_model="demo-anima", caption_scheme="mixed", max_train_steps=2,
                        save_every_n_steps=0, evaluate_every_save=True)
    during = read_evaluation(run_dir)
    assert [c["file"] for c in during["checkpoints"]] == ["an.safetensors"]
    assert (during["config"]["family"], during["config"]["sampler"]) == ("anima", "Euler")
    copy = copy_run(run_dir, "an-after")  # the base set kept, the checkpoint drawn again from its file
    shutil.copytree(run_dir / "evaluation", copy / "evaluation")
    (copy / "evaluation" / EVALUATION_FILE).write_text(json.dumps({**during, "checkpoints": []}))
    manager = ModelManager(ws / "models", requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    after = evaluate(manager, copy, EvaluationConfig(), resolver=Resolver(ws))
    assert after.evaluated == ["an.safetensors"]
    theirs, ours = during["checkpoints"][0], after.data["checkpoints"][0]
    assert theirs["scores"] == ours["scores"]
    for a, b in zip(theirs["images"], ours["images"]):
        pixels = [np.asarray(Image.open(root / "evaluation" / i["file"]), dtype=np.int16)
                  for root, i in ((run_dir, a), (copy, b))]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1


@pytest.mark.slow
def test_the_cli_prints_the_table_and_ctrl_c_stops_keeping_what_was_finished(trained, ws):
    from studio.__main__ import main

    run_dir = copy_run(trained, "pair-cli")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "studio", "evaluate", str(run_dir), "--workspace", str(ws), "--seeds", "1",
            "--steps", "1", "--cfg", "1", "--vram", "cpu"]
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "evaluation" / EVALUATION_FILE).is_file() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # Ctrl-C once the base model's set is written
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "stopped: run the same command again to continue" in err
    assert len(read_evaluation(run_dir)["checkpoints"]) < 2
    assert main(["evaluate", run_dir.name, "--workspace", str(ws), "--seeds", "1", "--steps", "1", "--cfg", "1",
                 "--vram", "cpu"]) == 0, "a run's name is looked for in WORKSPACE/runs"
    data = read_evaluation(run_dir)
    assert [c["step"] for c in data["checkpoints"]] == [3, 6]


@pytest.mark.slow
def test_the_cli_table_names_concepts_checkpoints_and_the_verdict(trained, ws, capsys):
    from studio.__main__ import main

    run_dir = copy_run(trained, "pair-table")
    assert main(["evaluate", str(run_dir), "--workspace", str(ws), "--seeds", "1", "--steps", "1", "--cfg", "1",
                 "--vram", "cpu", "--checkpoint", "pair.safetensors", "--max-bleed", "1", "--min-flexibility", "0"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("concept"))
    assert header.split() == ["concept", "score", "base", "final", "(step", "6)"]
    assert sum(line.startswith(("alice ", "bob ")) for line in out.splitlines()) == 6  # 2 concepts x 3 scores
    assert "Recommended checkpoint: pair.safetensors (step 6)" in out
    assert "1 checkpoint(s) evaluated; written:" in out


# -- refusals, limits and exit codes (quick: nothing loads) ------------------------------------------------
def fake_run(ws: Path, name: str = "fake", model: str = "demo-sdxl", concepts: bool = True) -> Path:
    """A run folder as the trainer leaves it (config, concepts, one checkpoint file), without training."""
    from studio.training.runs import write_run_config
    from tests.train_fixtures import fast_config

    run_dir = ws / "runs" / name
    write_run_config(run_dir, fast_config(ws / "datasets" / "none", pretrained_model=model))
    if concepts:
        rows = [{"name": "alice", "triggers": ["alice"], "core_tags": ["long hair"]}]
        (run_dir / "concepts.json").write_text(json.dumps(rows))
    (run_dir / "loras").mkdir(exist_ok=True)
    (run_dir / "loras" / f"{name}-step00000002.safetensors").write_bytes(b"not loaded in these tests")
    return run_dir


def test_requests_name_only_runs_of_the_workspace(tmp_path):
    from types import SimpleNamespace

    from studio.settings import Settings
    from studio.ui.evaluation_view import run_dir_for

    ws = tmp_path / "ws"
    ctx = SimpleNamespace(settings=Settings(workspace=ws))
    good = fake_run(ws)
    assert run_dir_for(ctx, "fake") == run_dir_for(ctx, None) == good.resolve(), "none named: the latest run"
    outside = fake_run(tmp_path / "elsewhere", "outside")
    (ws / "runs" / "link").symlink_to(outside, target_is_directory=True)
    (ws / "datasets" / "lookalike").mkdir(parents=True)
    shutil.copy(good / "config.toml", ws / "datasets" / "lookalike" / "config.toml")
    with pytest.raises(ConfigError, match="is not usable"):
        run_dir_for(ctx, None)  # the latest run is the link: refused like any other name
    for value, message in (("../../etc", "is not usable"), ("/etc", "is not usable"), ("link", "is not usable"),
                           (str(outside), "is not usable"), ("../datasets/lookalike", "is not usable"),
                           ("nope", "there is no training run 'nope'"), ("x" * 5000, r"x\.\.\.")):
        with pytest.raises(ConfigError, match=message):
            run_dir_for(ctx, value)


def test_links_out_of_the_workspace_are_refused_before_any_model_loads(tmp_path):
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    demo_manager = ModelManager(tmp_path / "models", requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    ws = tmp_path / "ws"
    run_dir = fake_run(ws)
    secret = tmp_path / "secret"
    secret.mkdir()
    (run_dir / "evaluation").symlink_to(secret, target_is_directory=True)
    with pytest.raises(ConfigError, match="link out of the workspace"):
        run_evaluation(demo_manager, run_dir, ws)
    assert list(secret.iterdir()) == []
    (run_dir / "evaluation").unlink()
    (secret / "other.safetensors").write_bytes(b"x")
    (run_dir / "loras" / "evil.safetensors").symlink_to(secret / "other.safetensors")
    with pytest.raises(ConfigError, match="evil.safetensors is not usable"):
        run_evaluation(demo_manager, run_dir, ws, checkpoints=["evil.safetensors"])
    with pytest.raises(ConfigError, match="has no checkpoint 'gone.safetensors' in loras/"):
        run_evaluation(demo_manager, run_dir, ws, checkpoints=["gone.safetensors"])


@pytest.mark.parametrize("values, message", [
    ({"seeds": 9}, "seeds: Input should be less than or equal to 8"),
    ({"width": 5000}, "width: Input should be less than or equal to 2048"),
    ({"height": 100}, "height: 100 is not a multiple of 8"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"checkpoints": ["../x.safetensors"]}, "is not a checkpoint's file name"),
    ({"checkpoints": ["x.ckpt"]}, "is not a checkpoint's file name"),
    ({"checkpoints": [f"c{i}.safetensors" for i in range(65)]}, "at most 64 items"),
    ({"max_bleed": float("nan")}, "max_bleed"),
    ({"prompts": ["anything"]}, "Extra inputs are not permitted"),
])
def test_settings_have_limits(values, message):
    with pytest.raises(ConfigError, match=message):
        validate(EvaluationConfig, values)


def test_an_evaluation_too_large_is_refused_with_what_to_change():
    from studio.models.catalog import load_catalog, resolve_reference

    source = resolve_reference("animagine-xl-3.1", load_catalog())
    concepts = [{"name": f"c{i}", "triggers": [f"c{i}"], "core_tags": ["hat"]} for i in range(60)]
    with pytest.raises(ConfigError, match=r"x 4 seed\(s\) make 1452 images per checkpoint; the limit is 1300: use "
                                          "fewer seeds"):
        image_settings(EvaluationConfig(seeds=4), source, "wd-vit-tagger-v3", concepts)
    assert image_settings(EvaluationConfig(seeds=3), source, "wd-vit-tagger-v3", concepts)["seeds"] == [1000, 1001, 1002]
    settings = image_settings(EvaluationConfig(), source, "wd-vit-tagger-v3", concepts[:2])
    assert (settings["width"], settings["height"], settings["steps"], settings["cfg_scale"]) == (832, 1216, 28, 6.0)
    assert settings["sampler"] == "Euler a" and settings["seeds"] == [1000, 1001]


def test_cli_exit_codes_for_bad_arguments_and_failures(tmp_path, capsys):
    from studio.__main__ import main

    ws = tmp_path / "ws"
    fake_run(ws)
    fake_run(ws, "old", concepts=False)
    fake_run(ws, "offline", model="nobody/no-such-model")
    common = ["--workspace", str(ws), "--vram", "cpu"]
    assert main(["evaluate", "nope", *common]) == 2
    assert "nope is not a training run folder" in capsys.readouterr().err
    assert main(["evaluate", "fake", "--seeds", "0", *common]) == 2
    assert main(["evaluate", "fake", "--checkpoint", "missing.safetensors", *common]) == 2
    assert "has no checkpoint 'missing.safetensors'" in capsys.readouterr().err
    assert main(["evaluate", "old", *common]) == 2
    assert "has no concepts.json" in capsys.readouterr().err
    assert main(["evaluate", "offline", *common]) == 1  # the base model cannot be loaded: the work failed
    assert "offline" in capsys.readouterr().err


def test_the_table_plot_and_verdict_read_an_evaluation():
    from studio.evaluation.report import plot_rows, table, verdict_lines
    from studio.ui.evaluation_view import frames, series_colors

    scores = {"alice": {"fidelity": 0.75, "bleed": 0.1, "flexibility": 0.5}, "bob": {"fidelity": None, "bleed": None,
                                                                                       "flexibility": 1.0}}
    data = {"config": {"concepts": [{"name": "alice"}, {"name": "bob"}]},
            "base": {"scores": {"alice": {"fidelity": 0.0, "bleed": 0.0, "flexibility": 0.5}}},
            "checkpoints": [{"file": "r-step00000010.safetensors", "step": 10, "scores": scores},
                            {"file": "r.safetensors", "step": 20, "scores": scores, "missing": True}],
            "recommended": "r-step00000010.safetensors", "recommended_step": 10, "not_learned": ["bob"],
            "bounds": {"max_bleed": 0.25, "min_flexibility": 0.5, "min_fidelity": 0.5}, "notes": ["a note"]}
    headers, rows = table(data)
    assert headers == ["concept", "score", "base", "step 10", "final (step 20) (pruned)"]
    assert rows[0] == ["alice", "fidelity", "0.00", "0.75", "0.75"] and rows[1][2] == "–", "the base's bleed is the reference"
    assert rows[3] == ["bob", "fidelity", "–", "–", "–"]
    assert plot_rows(data) == [(10, 0.75, "fidelity · alice"), (10, 0.1, "bleed · alice"),
                               (20, 0.75, "fidelity · alice"), (20, 0.1, "bleed · alice")]
    assert verdict_lines(data)[:2] == ["Recommended checkpoint: r-step00000010.safetensors (step 10)",
                                       "Did not learn: bob"] and verdict_lines(data)[-1] == "note: a note"
    colors = series_colors(["fidelity · alice", "bleed · alice", "fidelity · bob"])
    assert colors["fidelity · alice"] != colors["bleed · alice"] and colors["fidelity · bob"] != colors["fidelity · alice"]
    plot, frame, verdict = frames(None)
    assert plot.value is None, "no points: no frame (an empty one stops the browser plot drawing later lines)"
    assert verdict.startswith("Not evaluated yet") and list(frame.columns) == ["concept", "score", "base"]


def test_an_unreadable_evaluation_file_is_named(tmp_path):
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / EVALUATION_FILE).write_text("{torn")
    with pytest.raises(StudioError, match="not readable JSON"):
        read_evaluation(tmp_path)
