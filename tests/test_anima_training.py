"""The training engine on demo-anima (flow matching, 5-D video latents, mixed captions): the
validation loss goes down, the saved ComfyUI-layout LoRA loaded through generate() reproduces the
in-training model's sample and changes the base, a stopped run resumes exactly, and the text cache
is refused while mixed captions vary."""

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from studio.training.config import TrainConfig
from studio.training.loop import read_events
from studio.training.trainer import train
from tests.train_fixtures import make_dataset

PROMPT, SEED, STEPS, CFG, SIZE = "1girl, solo", 11, 2, 4.0, (64, 64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = make_dataset(tmp_path_factory.mktemp("data") / "10_chara", size=(64, 64))
    (folder / "img0_nl.txt").write_text("A girl with red hair smiling.")
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from studio.models.demo_anima import ensure_demo_anima

    models = tmp_path_factory.mktemp("models")
    ensure_demo_anima(models)
    return models


def anima_config(dataset, **overrides) -> TrainConfig:
    values = {
        "pretrained_model": "demo-anima", "caption_scheme": "mixed", "datasets": [{"path": str(dataset)}],
        "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32, "network_dim": 4,
        "network_alpha": 2.0, "learning_rate": 1e-3, "optimizer_type": "AdamW", "max_train_steps": 6,
        "train_batch_size": 2, "mixed_precision": "no", "save_every_n_epochs": 0, "tensorboard": False, "seed": 7,
    }
    values.update(overrides)
    return TrainConfig(**values)


def run(config, tmp_path, models_dir, name="run", **kwargs):
    return train(config, run_dir=tmp_path / name, models_dir=models_dir, cache_dir=tmp_path / "cache", **kwargs)


def step_losses(run_dir):
    return {e["step"]: e["loss"] for e in read_events(run_dir) if e["kind"] == "step"}


def test_validation_loss_goes_down(dataset, tmp_path, models_dir):
    config = anima_config(dataset, max_train_steps=30, learning_rate=3e-3, validation_images=1,
                          validate_every_n_steps=15)
    result = run(config, tmp_path, models_dir)
    assert result.status == "done" and result.step == 30
    validation = [e["loss"] for e in read_events(result.run_dir) if e["kind"] == "validation"]
    assert len(validation) == 3 and validation[-1] < validation[0]


def test_text_cache_is_refused_with_mixed_captions(dataset, tmp_path, models_dir):
    result = run(anima_config(dataset, max_train_steps=1, cache_text_encoder_outputs=True), tmp_path, models_dir)
    assert result.status == "done"
    texts = [e.get("text", "") for e in read_events(result.run_dir) if e["kind"] == "message"]
    assert any("caching is off" in t for t in texts)
    assert not (tmp_path / "cache" / "text").exists()


def test_saved_lora_through_generate_matches_the_trained_model(dataset, tmp_path, models_dir):
    from studio.generation.generate import generate
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.schemas import GenerateConfig, LoraSpec, PromptStyle

    config = anima_config(dataset, max_train_steps=4, learning_rate=5e-2, sample_prompts=[PROMPT],
                          sample_seed=SEED, sample_steps=STEPS, sample_size=SIZE, sample_cfg=CFG)
    result = run(config, tmp_path, models_dir)
    final = result.run_dir / "loras" / "lora.safetensors"
    assert final in result.loras
    with safe_open(str(final), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert "diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert meta["modelspec.architecture"] == "anima/lora" and meta["ss_network_dim"] == "4"
    trained = np.asarray(Image.open(max((result.run_dir / "samples").glob("*.png"))).convert("RGB"), dtype=np.int16)

    manager = ModelManager(models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    plain = PromptStyle(quality_tags=False, default_negative=False)

    def image(loras):
        gen = GenerateConfig(prompt=PROMPT, model="demo-anima", seed=SEED, cfg_scale=CFG, style=plain, steps=STEPS,
                             width=SIZE[0], height=SIZE[1], sampler="Euler", loras=loras)
        out = generate(manager, gen, outputs_dir=tmp_path / "out", default_model="demo-sdxl")
        return np.asarray(Image.open(out.images[0].path).convert("RGB"), dtype=np.int16)

    with_lora = image([LoraSpec(path=str(final), weight=1.0)])
    base = image([])
    assert np.abs(with_lora - trained).max() <= 2
    assert np.abs(with_lora - base).max() > 2


def test_stop_and_resume_continue_exactly(dataset, tmp_path, models_dir):
    config = anima_config(dataset, max_train_steps=6, save_every_n_steps=3, flip_aug=True, noise_offset=0.05)
    whole = run(config, tmp_path, models_dir, "whole")
    stopped = run(config, tmp_path, models_dir, "split", stop_after=2)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = run(config, tmp_path, models_dir, "split", resume=True)
    assert resumed.status == "done" and resumed.step == 6
    assert step_losses(resumed.run_dir) == step_losses(whole.run_dir)
    a = load_file(str(whole.run_dir / "loras" / "lora.safetensors"))
    b = load_file(str(resumed.run_dir / "loras" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_llm_adapter_training_exports_and_loads(dataset, tmp_path, models_dir):
    from studio.generation.generate import generate
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.schemas import GenerateConfig, LoraSpec, PromptStyle

    config = anima_config(dataset, max_train_steps=3, learning_rate=5e-2, train_llm_adapter=True,
                          network_target="attention", sample_prompts=[PROMPT], sample_seed=SEED,
                          sample_steps=STEPS, sample_size=SIZE, sample_cfg=CFG)
    result = run(config, tmp_path, models_dir)
    final = result.run_dir / "loras" / "lora.safetensors"
    keys = list(load_file(str(final)))
    assert any(k.startswith("diffusion_model.llm_adapter.blocks.0.") for k in keys)
    assert not any(".mlp." in k for k in keys if k.startswith("diffusion_model.blocks."))  # attention only
    trained = np.asarray(Image.open(max((result.run_dir / "samples").glob("*.png"))).convert("RGB"),
                         dtype=np.int16)
    manager = ModelManager(models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    gen = GenerateConfig(prompt=PROMPT, model="demo-anima", seed=SEED, cfg_scale=CFG, steps=STEPS,
                         style=PromptStyle(quality_tags=False, default_negative=False), width=SIZE[0],
                         height=SIZE[1], sampler="Euler", loras=[LoraSpec(path=str(final), weight=1.0)])
    out = generate(manager, gen, outputs_dir=tmp_path / "out", default_model="demo-sdxl")
    assert np.abs(np.asarray(Image.open(out.images[0].path).convert("RGB"), dtype=np.int16) - trained).max() <= 2


def test_anima_presets_are_valid_configs():
    import tomllib

    from studio.presets import SHIPPED_DIR

    for name in ("demo-anima", "anima-character", "anima-style"):
        values = tomllib.loads((SHIPPED_DIR / "train" / f"{name}.toml").read_text())
        config = TrainConfig(**values)
        assert config.caption_scheme == "mixed"
    character = TrainConfig(**tomllib.loads((SHIPPED_DIR / "train" / "anima-character.toml").read_text()))
    assert character.resolutions == [1024, 1280] and character.mixed_captions.keep_first == 3
    assert character.mixed_captions.tag_dropout == 0.3
    # the multi-character recipe: names survive dropout, concepts get equal shares, the adapter trains
    assert character.mixed_captions.protect_concepts and character.balance_concepts and character.train_llm_adapter
    assert character.evaluate_every_save


def test_qwen3_text_encoder_training_has_its_own_lr_and_is_exported(dataset, tmp_path, models_dir, monkeypatch):
    import studio.training.trainer as trainer

    optimizers = []
    original = trainer._optimizer_and_schedule

    def capture(config, groups, plan):
        optimizer, scheduler = original(config, groups, plan)
        optimizers.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(trainer, "_optimizer_and_schedule", capture)
    config = anima_config(dataset, max_train_steps=3, learning_rate=1e-3, unet_lr=2e-3, train_text_encoder=True,
                          text_encoder_lr=5e-3, train_llm_adapter=True, llm_adapter_lr=7e-4)
    result = run(config, tmp_path, models_dir)
    assert result.status == "done" and result.step == 3
    lrs = [group["initial_lr"] if "initial_lr" in group else group["lr"] for group in optimizers[0].param_groups]
    assert lrs == [2e-3, 7e-4, 5e-3]
    tensors = load_file(str(result.run_dir / "loras" / "lora.safetensors"))
    te = {k: v for k, v in tensors.items() if k.startswith("text_encoders.qwen3_06b.transformer.model.layers.")}
    assert "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight" in te
    assert any(".mlp.down_proj." in k for k in te)
    ups = [v for k, v in te.items() if k.endswith(".lora_B.weight")]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # lora_B starts at zero: it was trained
    assert any(k.startswith("diffusion_model.llm_adapter.") for k in tensors)
    assert any(k.startswith("diffusion_model.blocks.") for k in tensors)
