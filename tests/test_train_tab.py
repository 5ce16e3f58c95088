"""Train-tab handlers without a browser: the form <-> TrainConfig, the dataset summary's numbers,
plot frames and the status line from a run's events, the run view after a page reload, checkpoints
copied to workspace/loras, and Start/Stop/Resume of a real (tiny) run."""

import json
import math
import time

import gradio as gr
import pytest

from studio.context import AppContext
from studio.errors import ConfigError
from studio.jobs import JobRunner
from studio.models.devices import DeviceInfo
from studio.models.manager import ModelManager
from studio.settings import Settings
from studio.training.runs import write_run_config
from studio.ui import train_form as form
from studio.ui import train_tab as tab
from studio.ui import train_view as view
from tests.train_fixtures import fast_config, make_dataset


@pytest.fixture
def ctx(tmp_path, demo_models_dir):
    settings = Settings(workspace=tmp_path / "workspace", demo=True)
    settings.ensure_workspace()
    (settings.workspace / "models").rmdir()
    (settings.workspace / "models").symlink_to(demo_models_dir)  # the demo model, built once per session
    manager = ModelManager(demo_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    return AppContext(settings, manager, JobRunner())


def form_dict(ctx, preset="demo-sdxl", **changes) -> dict:
    """The whole form as the browser sends it after choosing `preset`."""
    values = form.form_values(form.preset_config(ctx.settings, preset))
    values.update(datasets=["chars"], num_repeats=0, preset=preset, output_name="mychar")
    values.update(changes)
    return values


def form_tuple(values: dict) -> tuple:
    return tuple(values[name] for name in form.TRAIN_FIELDS)


def test_form_becomes_one_config_over_its_preset(ctx):
    make_dataset(ctx.settings.datasets_dir / "chars")
    config = form.config_from_form(
        form_dict(ctx, network_dim=8, max_train_epochs=0, min_snr_gamma=0, resolution="96, 128",
                  sample_prompts="1girl, solo\n\n  mychar, smile  ", sample_size="96x128", caption_scheme="mixed",
                  mixed_weight_nl=0.0, num_repeats=3),
        ctx.settings)
    assert config.datasets[0].path == str((ctx.settings.datasets_dir / "chars").resolve())
    assert config.datasets[0].num_repeats == 3
    assert (config.network_dim, config.output_name, config.resolution) == (8, "mychar", [96, 128])
    assert config.max_train_epochs is None and config.min_snr_gamma is None, "0 in a number box means unset"
    assert config.sample_prompts == ["1girl, solo", "mychar, smile"] and config.sample_size == (96, 128)
    assert config.caption_scheme == "mixed" and config.mixed_captions.weight_nl == 0.0
    assert config.min_bucket_reso == 64 and config.bucket_reso_steps == 32, "what the form lacks comes from the preset"
    shown = form.form_values(config)
    assert shown["resolution"] == "96, 128" and shown["max_train_epochs"] == 0 and shown["sample_size"] == "96x128"


@pytest.mark.parametrize("changes, message", [
    ({"datasets": []}, "choose a dataset folder"),
    ({"datasets": ["nope"]}, "no dataset folder 'nope'"),
    ({"datasets": ["../../etc"]}, "outside the workspace"),
    ({"resolution": "big"}, "resolution 'big'"),
    ({"sample_size": "128"}, "WIDTHxHEIGHT"),
    ({"max_train_steps": 0, "max_train_epochs": 0}, "set max_train_steps or max_train_epochs"),
    ({"network_type": "lokr", "network_target": "all"}, "use network_target attention_ff"),
])
def test_bad_forms_say_what_to_fix(ctx, changes, message):
    make_dataset(ctx.settings.datasets_dir / "chars")
    with pytest.raises(ConfigError, match=message):
        form.config_from_form(form_dict(ctx, **changes), ctx.settings)


def test_choosing_a_preset_fills_the_form_and_the_dataset_names_the_run(ctx):
    values = dict(zip(form.PRESET_FIELDS, tab.on_preset(ctx, "animagine-xl-3.1-style")))
    assert values["network_dim"] == 32 and values["lr_scheduler"] == "cosine_with_restarts"
    assert values["max_train_epochs"] == 15 and values["resolution"] == "1024"
    assert tab.on_datasets(["my char!"], "lora") == "my char_"
    assert isinstance(tab.on_datasets(["other"], "named by hand"), type(gr.skip()))


def test_the_form_saves_as_a_user_preset_that_fills_the_form_again(ctx):
    values = form_dict(ctx, datasets=[], network_dim=12, sample_prompts="mychar, smile")
    picker = tab.on_save_preset(ctx, "my recipe", *form_tuple(values))
    assert picker.value == "my recipe" and ("my recipe", "my recipe") in picker.choices
    saved = (ctx.settings.workspace / "presets" / "train" / "my recipe.toml").read_text()
    assert "network_dim = 12" in saved and "datasets" not in saved and "output_name" not in saved
    assert "min_bucket_reso = 64" in saved, "what the form does not show is kept from the preset it started from"
    again = dict(zip(form.PRESET_FIELDS, tab.on_preset(ctx, "my recipe")))
    assert again == {name: values[name] for name in form.PRESET_FIELDS}
    with pytest.raises(gr.Error, match="shipped train preset"):
        tab.on_save_preset(ctx, "demo-sdxl", *form_tuple(values))


def test_summary_counts_images_repeats_buckets_and_steps(ctx):
    make_dataset(ctx.settings.datasets_dir / "chars" / "3_mychar", count=4)  # a kohya repeat folder
    values = form_dict(ctx, max_train_steps=0, max_train_epochs=4)  # demo: 128px, batch 2, 1 held out
    config = form.config_from_form(values, ctx.settings)
    summary = view.summarize(config)
    assert (summary.images, summary.held_out, summary.repeats) == (3, 1, [3])
    assert summary.samples_per_epoch == 9 and summary.buckets.to_dict("records") == [
        {"resolution": 128, "bucket": "128x128", "images": 3, "with repeats": 9}]
    assert (summary.batches_per_epoch, summary.steps_per_epoch, summary.total_steps) == (5, 5, 20)
    accumulated = view.summarize(config.model_copy(update={"gradient_accumulation_steps": 2}))
    assert (accumulated.steps_per_epoch, accumulated.total_steps) == (2.5, 10)
    text, buckets = tab.on_summary(ctx, *form_tuple(values))
    assert "**4 images** (1 held out for validation) · repeats ×3 · **9 samples per epoch**" in text
    assert "**5 steps per epoch** · **20 steps** in all (4.0 epochs)" in text
    assert "Estimated training time: **under 1s** (on a 24 GB GPU by a rule of thumb" in text, "never '~0s'"
    assert len(buckets) == 1
    assert tab.on_summary(ctx, *form_tuple({**values, "datasets": ["nope"]}))[0].startswith("⚠ there is no dataset")


def test_time_estimate_uses_the_speed_of_the_last_run_of_that_model(ctx, tmp_path):
    config = fast_config(tmp_path, resolution=1024, train_batch_size=1)
    seconds, basis = view.estimate_seconds(config, 100, ctx.settings.runs_dir)
    assert seconds == pytest.approx(100 * view.REFERENCE_SECONDS) and "rule of thumb" in basis
    run = ctx.settings.runs_dir / "old-run"
    write_run_config(run, fast_config(tmp_path, resolution=512, train_batch_size=2))
    (run / "events.jsonl").write_text(json.dumps({"kind": "step", "step": 5, "epoch": 0, "it_s": 4.0}) + "\n")
    seconds, basis = view.estimate_seconds(config, 100, ctx.settings.runs_dir)
    # 4 steps/s of 2 images at 512² = 0.5 s per 1024² image
    assert seconds == pytest.approx(50) and "old-run" in basis


def events(steps=4, validation=(0, 2), end=None):
    out = [{"kind": "message", "step": 0, "epoch": 0, "text": "plan", "plan": {"total_steps": 10}}]
    out += [{"kind": "validation", "step": s, "epoch": 0, "loss": 0.5} for s in validation if s == 0]
    for step in range(1, steps + 1):
        out.append({"kind": "step", "step": step, "epoch": 0, "loss": 1.0 / step, "smoothed": 0.9, "lr": 1e-4 * step,
                    "it_s": 2.0, "eta_s": (10 - step) / 2})
        out += [{"kind": "validation", "step": step, "epoch": 0, "loss": 0.4} for s in validation if s == step]
    if end:
        out.append({"kind": "message", "step": steps, "epoch": 0, "text": f"{end} at {steps}", "status": end})
    return out


def test_plot_frames_hold_every_series_and_thin_long_runs():
    loss = view.loss_frame(events())
    assert loss.groupby("series")["step"].apply(list).to_dict() == {
        "raw": [1, 2, 3, 4], "smoothed": [1, 2, 3, 4], "validation": [0, 2]}
    assert loss[loss.series == "raw"]["loss"].tolist() == [1.0, 0.5, 1 / 3, 0.25]
    assert view.lr_frame(events())["learning rate"].tolist() == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    empty = view.loss_frame([])  # typed, with all three series: the browser's plot fixes both at its first frame
    assert sorted(empty.series) == ["raw", "smoothed", "validation"] and all(math.isnan(v) for v in empty.loss)
    assert str(empty.step.dtype) == "int64" and str(view.lr_frame([])["step"].dtype) == "int64"
    long = view.loss_frame(events(steps=5000, validation=()))
    raw = long[long.series == "raw"]["step"].tolist()
    assert len(raw) <= view.MAX_POINTS + 1 and raw[0] == 1 and raw[-1] == 5000


def test_status_line_says_where_the_run_is():
    assert view.status_line(events(), "running").startswith("**Training** · step 4/10 · loss 0.2500")
    assert "2.00 it/s · ETA 3s" in view.status_line(events(), "running")
    assert view.status_line([], "running", "loading demo-sdxl") == "**Starting**: loading demo-sdxl..."
    assert view.status_line(events(), "stopping").startswith("**Stopping** after step 4/10")
    assert view.status_line(events(end="stopped"), None).startswith("**Stopped** at step 4/10")
    assert view.status_line(events(end="done"), "done").startswith("**Done**: 4 steps")
    assert view.status_line(events(), "failed", "", "the GPU is busy").endswith("the GPU is busy")
    assert view.status_line(events(), None).startswith("**Not running**")


def test_refresh_finds_the_latest_run_after_a_reload_and_sends_only_what_changed(ctx, tmp_path):
    assert tab.refresh(ctx, None, None)["status"].startswith("No training run yet")
    old, new = ctx.settings.runs_dir / "a-old", ctx.settings.runs_dir / "b-new"
    for run in (old, new):
        write_run_config(run, fast_config(tmp_path))
        time.sleep(0.01)
    (new / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events(end="stopped")))
    (new / "loras").mkdir()
    (new / "loras" / "lora-step00000004.safetensors").write_bytes(b"x")
    first = tab.refresh(ctx, None, None)  # a fresh page: no run chosen yet
    assert first["run"].value == "b-new" and first["run"].choices == [("b-new", "b-new"), ("a-old", "a-old")]
    assert first["status"].startswith("**Stopped** at step 4/10") and len(first["loss_plot"]) == 10
    assert first["checkpoints"].choices == [("step 4 · lora-step00000004.safetensors", "lora-step00000004.safetensors")]
    assert "datasets" in first and "preset" in first, "a fresh page gets fresh dataset and preset lists"
    again = tab.refresh(ctx, "b-new", first["seen"])
    assert set(again) == {"seen"}, "nothing changed: the timer sends nothing"
    with open(new / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "message", "step": 4, "epoch": 0, "text": "resumed"}) + "\n")
    later = tab.refresh(ctx, "b-new", again["seen"])
    assert set(later) == {"status", "loss_plot", "lr_plot", "seen"}
    other = tab.refresh(ctx, "a-old", later["seen"])  # the user picks an older run: it stays
    assert other["status"] == "No events yet." and other["checkpoints"].choices == []
    assert "run" not in tab.refresh(ctx, "a-old", other["seen"])
    write_run_config(ctx.settings.runs_dir / "c-newer", fast_config(tmp_path))
    assert tab.refresh(ctx, "a-old", other["seen"])["run"].value == "a-old"
    following = tab.refresh(ctx, "b-new", later["seen"])  # showing the latest run: a newer one is followed
    assert following["run"].value == "c-newer" and following["status"] == "No events yet."


def test_use_in_generate_copies_the_checkpoint_once_without_overwriting(ctx, tmp_path):
    run = ctx.settings.runs_dir / "mychar-1"
    write_run_config(run, fast_config(tmp_path))
    (run / "loras").mkdir()
    for name, data in (("mychar-step00000010.safetensors", b"10"), ("mychar.safetensors", b"final")):
        (run / "loras" / name).write_bytes(data)
    assert [label for label, _ in view.checkpoints(run)] == [
        "step 10 · mychar-step00000010.safetensors", "final · mychar.safetensors"]
    (ctx.settings.loras_dir / "other.safetensors").write_bytes(b"other")
    out = tab.on_use(ctx, "mychar-1", [], "", "other.safetensors", "", "")
    assert [d.value for d in out[:4]] == ["mychar-1-mychar.safetensors", "other.safetensors", "", ""]
    assert (ctx.settings.loras_dir / "mychar-1-mychar.safetensors").read_bytes() == b"final"
    tab.on_use(ctx, "mychar-1", ["mychar.safetensors"], "", "", "", "")  # the same file again: not copied twice
    (run / "loras" / "mychar.safetensors").write_bytes(b"resumed and finished again")
    tab.on_use(ctx, "mychar-1", ["mychar.safetensors"], "", "", "", "")
    assert sorted(p.name for p in ctx.settings.loras_dir.iterdir()) == [
        "mychar-1-mychar (1).safetensors", "mychar-1-mychar.safetensors", "other.safetensors"]
    assert (ctx.settings.loras_dir / "mychar-1-mychar.safetensors").read_bytes() == b"final", "never overwritten"
    grid = tab.on_compare(ctx, "mychar-1", [], 4)
    assert grid[5] == "LoRA file" and grid[6] == ("mychar-1-mychar-step00000010.safetensors, "
                                                  "mychar-1-mychar (1).safetensors")
    with pytest.raises(gr.Error, match="run '../x' is not usable"):
        tab.on_use(ctx, "../x", [], "", "", "", "")


def test_use_and_compare_switch_generate_to_the_runs_base_model(ctx, tmp_path):
    """An Anima run's LoRA goes on Anima: Generate's model follows the run (it stayed on SDXL)."""
    run = ctx.settings.runs_dir / "anima-1"
    write_run_config(run, fast_config(tmp_path, pretrained_model="demo-anima"))
    (run / "loras").mkdir()
    for name in ("anima-step00000010.safetensors", "anima.safetensors"):
        (run / "loras" / name).write_bytes(b"x")
    assert tab.on_use(ctx, "anima-1", [], "", "", "", "")[4] == "demo-anima"
    assert tab.on_compare(ctx, "anima-1", [], 4)[4] == "demo-anima"


def wait_for(condition, timeout=600.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_start_stop_and_resume_a_run(ctx):
    make_dataset(ctx.settings.datasets_dir / "chars")
    values = form_dict(ctx, max_train_steps=30, sample_every_n_steps=0, sample_prompts="", validation_images=0)
    run, status = tab.on_start(ctx, *form_tuple(values))
    run_dir = ctx.settings.runs_dir / run.value
    assert run.value.startswith("mychar-") and status.startswith("**Starting**")
    with pytest.raises(gr.Error, match="already going"):
        tab.on_start(ctx, *form_tuple(values))
    job = ctx.jobs.latest("train")
    wait_for(lambda: (view.last_event(run_dir, "step") or {}).get("step", 0) >= 2)
    assert tab.on_stop(ctx).startswith("**Stopping**")
    job.wait(600)
    assert tab.refresh(ctx, run.value, None)["status"].startswith("**Stopped** at step")
    stopped_at = view.last_event(run_dir, "step")["step"]
    assert stopped_at < 30 and view.checkpoints(run_dir)
    tab.on_resume(ctx, run.value)
    ctx.jobs.latest("train").wait(600)
    details = tab.api_status(ctx, run.value)[1]
    assert details["state"] == "done" and details["step"] == 30
    with pytest.raises(gr.Error, match="finished all its steps"):
        tab.on_resume(ctx, run.value)


def test_a_preset_saved_from_the_form_cannot_point_outside_the_workspace(ctx):
    """Presets are read later by the CLI too: a request cannot plant a base model path there."""
    values = form_dict(ctx, datasets=[], pretrained_model="/etc")
    with pytest.raises(gr.Error, match="base model '/etc' is not usable"):
        tab.on_save_preset(ctx, "planted", *form_tuple(values))
    assert not (ctx.settings.workspace / "presets" / "train" / "planted.toml").exists()


def test_stop_during_latent_caching_ends_the_job_within_seconds_and_frees_the_gpu_lane(ctx, monkeypatch):
    import threading

    from studio.training.cache import LatentCache

    make_dataset(ctx.settings.datasets_dir / "chars", count=12)
    encoding = threading.Event()
    real_get = LatentCache.get

    def slow_get(self, sample, flip):  # a real encode, then the time a large VAE would take
        encoding.set()
        result = real_get(self, sample, flip)
        time.sleep(1.0)
        return result

    monkeypatch.setattr(LatentCache, "get", slow_get)
    values = form_dict(ctx, max_train_steps=30, sample_every_n_steps=0, sample_prompts="", validation_images=0,
                       cache_latents=True)
    run, _ = tab.on_start(ctx, *form_tuple(values))
    job = ctx.jobs.latest("train")
    assert encoding.wait(120), "caching began"
    pressed = time.monotonic()
    tab.on_stop(ctx)
    job.wait(60)
    assert time.monotonic() - pressed < 5, "12 images x 1 s of encoding were not waited for"
    assert job.state in ("done", "stopped") and "stopped while caching" in job.message
    assert view.last_event(ctx.settings.runs_dir / run.value, "step") is None, "nothing trained"
    with ctx.manager.gpu_lane("check", exclusive=True):  # free again (a held lane raises BusyError at once)
        pass


def test_a_page_opened_during_a_run_shows_that_runs_settings(ctx):
    make_dataset(ctx.settings.datasets_dir / "chars")
    assert all(isinstance(v, type(gr.skip())) for v in tab.running_form(ctx)), "nothing runs: the form stays"
    values = form_dict(ctx, max_train_steps=400, network_dim=6, sample_every_n_steps=0, sample_prompts="",
                       validation_images=0, output_name="reloaded")
    run, _ = tab.on_start(ctx, *form_tuple(values))
    try:
        shown = dict(zip(form.TRAIN_FIELDS, tab.running_form(ctx)))
        assert shown["datasets"] == ["chars"] and shown["output_name"] == "reloaded"
        assert (shown["max_train_steps"], shown["network_dim"]) == (400, 6)
        assert isinstance(shown["preset"], type(gr.skip()))
    finally:
        tab.on_stop(ctx)
        ctx.jobs.latest("train").wait(600)
