"""The training engine on demo-sdxl: the validation loss goes down, checkpoints are kohya LoRAs that
change the model, a stopped run resumes to exactly the same losses and weights, a crash during a
save keeps the previous state, and bad input gets a clear message."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from studio.errors import DatasetError, StudioError
from studio.training.checkpoint import list_states
from studio.training.loop import read_events
from studio.training.trainer import train
from tests.train_fixtures import fast_config, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "10_chara")


def run(config, tmp_path, demo_models_dir, name="run", **kwargs):
    return train(config, run_dir=tmp_path / name, models_dir=demo_models_dir, cache_dir=tmp_path / "cache", **kwargs)


def step_losses(run_dir):
    return {e["step"]: e["loss"] for e in read_events(run_dir) if e["kind"] == "step"}


def test_validation_loss_goes_down(dataset, tmp_path, demo_models_dir):
    config = fast_config(dataset, max_train_steps=40, learning_rate=3e-3, validation_images=1,
                         validate_every_n_steps=20, cache_text_encoder_outputs=True)
    result = run(config, tmp_path, demo_models_dir)
    assert result.status == "done" and result.step == 40
    validation = [e["loss"] for e in read_events(result.run_dir) if e["kind"] == "validation"]
    assert len(validation) == 3 and validation[-1] < validation[0]


def test_checkpoint_is_a_kohya_lora_that_changes_the_model(dataset, tmp_path, demo_models_dir):
    import torch

    from studio.models.demo import build_demo_sdxl_pipeline

    result = run(fast_config(dataset, max_train_steps=4, learning_rate=5e-2), tmp_path, demo_models_dir)
    final = result.run_dir / "loras" / "lora.safetensors"
    assert final in result.loras
    with safe_open(str(final), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_steps"] == "4"
    assert "1girl" in json.loads(meta["ss_tag_frequency"])["10_chara"]
    assert float(load_file(str(final))[keys[0].rsplit(".", 2)[0] + ".alpha"]) == 2.0

    pipe = build_demo_sdxl_pipeline(0)

    def image():
        return pipe("1girl", num_inference_steps=2, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = image()
    pipe.load_lora_weights(str(final))
    assert np.abs(image() - base).max() > 1e-3


def test_stop_and_resume_continue_exactly(dataset, tmp_path, demo_models_dir):
    config = fast_config(dataset, max_train_steps=8, save_every_n_steps=4, flip_aug=True, shuffle_caption=True,
                         caption_tag_dropout_rate=0.2, noise_offset=0.05)
    whole = run(config, tmp_path, demo_models_dir, "whole")
    stopped = run(config, tmp_path, demo_models_dir, "split", stop_after=3)
    assert stopped.status == "stopped" and stopped.step == 3
    resumed = run(config, tmp_path, demo_models_dir, "split", resume=True)
    assert resumed.status == "done" and resumed.step == 8
    assert step_losses(resumed.run_dir) == step_losses(whole.run_dir)
    a = load_file(str(whole.run_dir / "loras" / "lora.safetensors"))
    b = load_file(str(resumed.run_dir / "loras" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_resume_after_a_torn_event_line_continues_the_same_curve(dataset, tmp_path, demo_models_dir, capsys):
    import json

    config = fast_config(dataset, max_train_steps=6, save_every_n_steps=3)
    whole = run(config, tmp_path, demo_models_dir, "whole")
    stopped = run(config, tmp_path, demo_models_dir, "split", stop_after=3)
    with open(stopped.run_dir / "events.jsonl", "a") as fh:
        fh.write('{"kind": "step", "step": 4, "lo')  # what a full disk leaves
    assert step_losses(stopped.run_dir) == {s: v for s, v in step_losses(whole.run_dir).items() if s <= 3}
    assert "unreadable line" in capsys.readouterr().err
    resumed = run(config, tmp_path, demo_models_dir, "split", resume=True)
    assert resumed.status == "done" and step_losses(resumed.run_dir) == step_losses(whole.run_dir)
    for line in (resumed.run_dir / "events.jsonl").read_text().splitlines():
        json.loads(line)


def test_resume_with_a_changed_config_is_refused(dataset, tmp_path, demo_models_dir):
    config = fast_config(dataset, max_train_steps=4)
    run(config, tmp_path, demo_models_dir, stop_after=2)
    with pytest.raises(StudioError, match="learning_rate: 0.001 -> 0.002"):
        run(fast_config(dataset, max_train_steps=4, learning_rate=2e-3), tmp_path, demo_models_dir, resume=True)


def test_a_crash_during_save_keeps_the_previous_state(dataset, tmp_path, demo_models_dir, monkeypatch):
    config = fast_config(dataset, max_train_steps=4, save_every_n_steps=2)
    from safetensors import torch as st

    optimizer_saves = {"n": 0}
    original = st.save_file

    def failing(tensors, path, metadata=None):
        if "optimizer" in str(path):
            optimizer_saves["n"] += 1
            if optimizer_saves["n"] == 2:  # the disk fills up during the second checkpoint
                raise OSError(28, "No space left on device")
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(OSError, match="No space"):
        run(config, tmp_path, demo_models_dir)
    states = list_states(tmp_path / "run")
    assert [s.name for s in states] == ["step-0000002"]
    assert not [p for p in (tmp_path / "run" / "state").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(st, "save_file", original)
    resumed = run(config, tmp_path, demo_models_dir, resume=True)
    assert resumed.status == "done" and resumed.step == 4


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, demo_models_dir, monkeypatch):
    import studio.training.trainer as trainer

    real = trainer.diffusion_loss
    count = {"n": 0}

    def exploding(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count["n"] > 3 else loss

    monkeypatch.setattr(trainer, "diffusion_loss", exploding)
    result = run(fast_config(dataset, max_train_steps=6, save_every_n_steps=2), tmp_path, demo_models_dir)
    assert result.status == "failed" and "nan" in result.message and "step 2" in result.message
    assert [s.name for s in list_states(result.run_dir)] == ["step-0000002"]


def test_text_encoder_cache_is_refused_when_captions_vary(dataset, tmp_path, demo_models_dir):
    result = run(fast_config(dataset, max_train_steps=1, cache_text_encoder_outputs=True, shuffle_caption=True),
                 tmp_path, demo_models_dir)
    messages = [e.get("text", "") for e in read_events(result.run_dir) if e["kind"] == "message"]
    assert any("shuffle_caption" in m and "cach" in m for m in messages)
    assert not (tmp_path / "cache" / "text").exists()


def test_images_without_captions_are_skipped_unless_allowed(tmp_path, demo_models_dir):
    folder = make_dataset(tmp_path / "data", count=3)
    (folder / "img2.txt").unlink()
    result = run(fast_config(folder, max_train_steps=1), tmp_path, demo_models_dir)
    messages = " ".join(e.get("text", "") for e in read_events(result.run_dir) if e["kind"] == "message")
    assert "img2.png: no caption file; skipped" in messages
    allowed = run(fast_config(folder, max_train_steps=1, allow_empty_captions=True), tmp_path, demo_models_dir, "b")
    assert "trained with an empty caption" in " ".join(e.get("text", "") for e in read_events(allowed.run_dir))


def test_empty_dataset_is_a_clear_error(tmp_path, demo_models_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        run(fast_config(tmp_path / "empty"), tmp_path, demo_models_dir)


def test_static_captions_are_cached_and_reused_and_tensorboard_logs(dataset, tmp_path, demo_models_dir):
    config = fast_config(dataset, max_train_steps=2, cache_text_encoder_outputs=True, tensorboard=True)
    run(config, tmp_path, demo_models_dir, "first")
    text_files = sorted((tmp_path / "cache" / "text").rglob("*.safetensors"))
    latent_files = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(text_files) == 4 and len(latent_files) == 4  # four distinct captions and images
    stamps = [p.stat().st_mtime_ns for p in text_files + latent_files]
    run(config, tmp_path, demo_models_dir, "second")
    assert [p.stat().st_mtime_ns for p in text_files + latent_files] == stamps, "the second run reuses the caches"
    assert list((tmp_path / "first" / "tensorboard").glob("events.out.tfevents.*"))


def test_latent_cache_keys_change_with_image_bucket_and_vae(dataset, tmp_path):
    from dataclasses import replace

    from PIL import Image

    from studio.training.cache import LatentCache
    from studio.training.data import TrainSample

    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64), "red").save(image)
    sample = TrainSample(image, ("1girl",), "", 1, (96, 64), (96, 64), (96, 64), (0, 0), 64)
    cache = LatentCache(tmp_path, "vae-a", encode=None)
    key = cache.key(sample, False)
    assert cache.key(sample, False) == key
    assert cache.key(sample, True) != key
    assert cache.key(replace(sample, bucket=(64, 96)), False) != key
    assert LatentCache(tmp_path, "vae-b", encode=None).key(sample, False) != key
    Image.new("RGB", (96, 64), "blue").save(image)
    assert cache.key(sample, False) != key, "a changed image must not read a stale latent"


@pytest.mark.parametrize("network", ["dora", "lokr"])
def test_other_network_types_train_and_export(dataset, tmp_path, demo_models_dir, network):
    result = run(fast_config(dataset, max_train_steps=2, network_type=network), tmp_path, demo_models_dir)
    assert result.status == "done"
    if network == "dora":  # kohya file with DoRA magnitudes, labelled the way LyCORIS labels DoRA
        path = result.run_dir / "loras" / "lora.safetensors"
        assert any(k.endswith(".dora_scale") for k in load_file(str(path)).keys())
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        # sd-scripts' networks.lora would silently drop every dora_scale: lycoris.kohya reads them
        assert meta["ss_network_module"] == "lycoris.kohya"
        args = json.loads(meta["ss_network_args"])
        assert (args["algo"], args["dora_wd"], args["wd_on_output"]) == ("lora", "True", "True")
    else:  # peft's own format only: A1111/ComfyUI cannot read LoKr from a kohya file we would write
        assert result.loras == []
        adapter = result.run_dir / "diffusers" / "lora" / "unet"
        assert any("lokr" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4


def test_text_encoder_lora_is_exported_under_kohya_te_names(dataset, tmp_path, demo_models_dir):
    result = run(fast_config(dataset, max_train_steps=2, train_text_encoder=True, text_encoder_lr=5e-4),
                 tmp_path, demo_models_dir)
    keys = load_file(str(result.run_dir / "loras" / "lora.safetensors")).keys()
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "Prodigy", "Lion", "Adafactor"])
def test_every_optimizer_saves_and_resumes_exactly(dataset, tmp_path, demo_models_dir, optimizer):
    pytest.importorskip({"AdamW8bit": "bitsandbytes", "Prodigy": "prodigyopt", "Lion": "lion_pytorch"}.get(
        optimizer, "transformers"))
    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    config = fast_config(dataset, max_train_steps=4, save_every_n_steps=2, optimizer_type=optimizer, learning_rate=lr)
    whole = run(config, tmp_path, demo_models_dir, "whole")
    run(config, tmp_path, demo_models_dir, "split", stop_after=2)
    resumed = run(config, tmp_path, demo_models_dir, "split", resume=True)
    assert step_losses(resumed.run_dir) == step_losses(whole.run_dir)


def test_stop_during_sampling_ends_the_run_within_seconds(dataset, tmp_path, demo_models_dir):
    import threading
    import time

    config = fast_config(dataset, max_train_steps=4, sample_prompts=["1girl", "1boy"], sample_every_n_steps=1,
                         sample_steps=150, sample_size=(512, 512))
    stop = threading.Event()
    sampling = {}

    def on_event(event):
        if event.kind == "step" and event.step == 1:
            sampling["since"] = time.monotonic()
            threading.Timer(1.0, stop.set).start()  # Stop pressed a second into the first samples

    result = run(config, tmp_path, demo_models_dir, on_event=on_event, stop=stop)
    assert result.status == "stopped" and result.step == 1
    assert time.monotonic() - sampling["since"] < 15, "150 sampling steps x 2 prompts were not waited for"
    assert not list(result.run_dir.glob("samples/step000001-*.png")), "no half-made samples are kept"
    messages = [e.get("text") for e in read_events(result.run_dir) if e["kind"] == "message"]
    assert "sampling at step 1 stopped" in messages


def test_the_last_step_is_sampled_once_also_across_a_resume(dataset, tmp_path, demo_models_dir):
    """Samples every 2 steps of 4: steps 2 and 4, once each (the end of the run no longer samples
    step 4 a second time), and a stop at step 2 then resume does not repeat step 2's samples."""
    config = fast_config(dataset, max_train_steps=4, sample_prompts=["1girl"], sample_every_n_steps=2,
                         sample_steps=2, sample_size=(64, 64), save_every_n_steps=2)
    run(config, tmp_path, demo_models_dir, "split", stop_after=2)
    resumed = run(config, tmp_path, demo_models_dir, "split", resume=True)
    assert [e["step"] for e in read_events(resumed.run_dir) if e["kind"] == "sample"] == [2, 4]


def test_runs_of_different_precisions_train_one_after_another_in_one_process(dataset, tmp_path, demo_models_dir):
    """The app trains run after run in one process: a bf16 run after an fp32 one (and back) must not
    trip accelerate's one-precision-per-process state (this CPU trains bf16 where it has AVX512-BF16)."""
    for index, precision in enumerate(("no", "bf16", "no")):
        result = run(fast_config(dataset, max_train_steps=1, mixed_precision=precision), tmp_path,
                     demo_models_dir, name=f"run{index}")
        assert result.status == "done", (precision, result.message)
