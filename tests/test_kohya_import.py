"""Importing kohya configs: a kohya_ss GUI JSON ("Save config") and an sd-scripts TOML become
TrainConfig fields; what the studio does not use is listed with its value; conversions (warmup
percent, epochs, optimizer_args strings, LyCORIS networks) follow kohya; bad values are clear
ConfigErrors; the result validates and survives the studio's own config round trips."""

import json

import pytest
from PIL import Image

from studio.errors import ConfigError
from studio.presets import dumps_toml, merge
from studio.schemas import validate
from studio.training.config import TrainConfig
from studio.training.kohya_import import import_kohya, import_kohya_file
from studio.training.runs import read_run_config, resolve_config, train_defaults, write_run_config


def kohya_dataset(root, repeats=10, images=5):
    """A kohya train_data_dir: one repeat folder `10_miku` holding `images` captioned images."""
    folder = root / "img" / f"{repeats}_miku"
    folder.mkdir(parents=True)
    for i in range(images):
        Image.new("RGB", (96, 96), (i * 40, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("1girl, hatsune miku, twintails")
    return root / "img"


def gui_config(train_data_dir, **changes) -> dict:
    """What kohya_ss GUI (v24/v25) writes for an SDXL LoRA: every field, numbers often as strings,
    "" for unset."""
    config = {
        "LoRA_type": "Standard", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
        "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True,
        "bucket_reso_steps": 64, "bypass_mode": False, "cache_latents": True, "cache_latents_to_disk": True,
        "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0.05, "caption_extension": ".txt",
        "clip_skip": 1, "color_aug": False, "constrain": 0, "conv_alpha": 1, "conv_block_alphas": "",
        "conv_block_dims": "", "conv_dim": 1, "dataset_config": "", "debiased_estimation_loss": False,
        "decompose_both": False, "dim_from_weights": False, "dora_wd": False, "down_lr_weight": "",
        "dynamo_backend": "no", "enable_bucket": True, "epoch": 10, "extra_accelerate_launch_args": "",
        "factor": -1, "flip_aug": False, "fp8_base": False, "full_bf16": False, "full_fp16": False, "gpu_ids": "",
        "gradient_accumulation_steps": 1, "gradient_checkpointing": True, "huber_c": 0.1, "huber_schedule": "snr",
        "ip_noise_gamma": 0, "ip_noise_gamma_random_strength": False, "keep_tokens": "1",
        "learning_rate": 0.0001, "log_tracker_config": "", "log_tracker_name": "", "log_with": "",
        "logging_dir": "/data/logs", "loss_type": "l2", "lr_scheduler": "cosine", "lr_scheduler_args": "",
        "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 10, "main_process_port": 0,
        "masked_loss": False, "max_bucket_reso": 2048, "max_data_loader_n_workers": "0", "max_grad_norm": 1,
        "max_resolution": "1024,1024", "max_timestep": 1000, "max_token_length": "75", "max_train_epochs": "",
        "max_train_steps": "", "mem_eff_attn": False, "mid_lr_weight": "", "min_bucket_reso": 256,
        "min_snr_gamma": 5, "min_timestep": 0, "mixed_precision": "bf16", "model_list": "custom",
        "module_dropout": 0, "multi_gpu": False, "multires_noise_discount": 0.3, "multires_noise_iterations": 0,
        "network_alpha": 16, "network_dim": 32, "network_dropout": 0, "network_weights": "",
        "noise_offset": 0.0357, "noise_offset_random_strength": False, "noise_offset_type": "Original",
        "num_cpu_threads_per_process": 2, "num_machines": 1, "num_processes": 1, "optimizer": "AdamW8bit",
        "optimizer_args": "weight_decay=0.1 betas=0.9,0.99", "output_dir": "/data/output",
        "output_name": "miku_xl", "persistent_data_loader_workers": False,
        "pretrained_model_name_or_path": "cagliostrolab/animagine-xl-3.1", "prior_loss_weight": 1,
        "random_crop": False, "rank_dropout": 0, "rank_dropout_scale": False, "reg_data_dir": "", "rescaled": False,
        "resume": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 200,
        "sample_prompts": "1girl, hatsune miku, smile --n lowres --w 1024 --h 1024\n", "sample_sampler": "euler_a",
        "save_every_n_epochs": 2, "save_every_n_steps": 0, "save_last_n_steps": 0, "save_last_n_steps_state": 0,
        "save_model_as": "safetensors", "save_precision": "fp16", "save_state": False,
        "save_state_on_train_end": False, "scale_v_pred_loss_like_noise_pred": False, "scale_weight_norms": 0,
        "sdxl": True, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True, "seed": 1234,
        "shuffle_caption": True, "stop_text_encoder_training": 0, "text_encoder_lr": 0, "train_batch_size": 2,
        "train_data_dir": str(train_data_dir), "train_norm": False, "train_on_input": True,
        "training_comment": "miku v1", "unet_lr": 0.0001, "unit": 1, "up_lr_weight": "", "use_cp": False,
        "use_scalar": False, "use_tucker": False, "v2": False, "v_parameterization": False, "v_pred_like_loss": 0,
        "vae": "", "vae_batch_size": 0, "wandb_api_key": "", "wandb_run_name": "", "weighted_captions": False,
        "xformers": "xformers",
    }
    config.update(changes)
    return config


def write_json(tmp_path, data, name="kohya.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


def test_a_kohya_ss_gui_config_maps_onto_train_config(tmp_path):
    data_dir = kohya_dataset(tmp_path)
    values, ignored, notes = import_kohya_file(write_json(tmp_path, gui_config(data_dir)))
    assert values == {
        "pretrained_model": "cagliostrolab/animagine-xl-3.1", "v_parameterization": False, "max_token_length": 75,
        "datasets": [{"path": str(data_dir)}], "resolution": 1024, "min_bucket_reso": 256, "max_bucket_reso": 2048,
        "bucket_reso_steps": 64, "keep_tokens": 1, "bucket_no_upscale": True, "flip_aug": False,
        "shuffle_caption": True, "cache_latents": True, "caption_dropout_rate": 0.05,
        "cache_text_encoder_outputs": False, "network_type": "lora", "network_target": "attention_ff",
        "network_dim": 32, "network_alpha": 16.0, "learning_rate": 1e-4, "unet_lr": 1e-4,
        "train_text_encoder": False, "text_encoder_lr": None, "optimizer_type": "AdamW8bit", "weight_decay": 0.1,
        "optimizer_args": {"betas": [0.9, 0.99]}, "max_grad_norm": 1.0, "train_batch_size": 2,
        "gradient_accumulation_steps": 1, "max_train_epochs": 10, "lr_scheduler": "cosine",
        "lr_warmup_steps": 25, "output_name": "miku_xl", "save_every_n_epochs": 2, "save_every_n_steps": 0,
        "seed": 1234, "mixed_precision": "bf16", "gradient_checkpointing": True, "fp8_base": False, "noise_offset": 0.0357,
        "min_snr_gamma": 5.0, "sample_every_n_steps": 200, "sample_prompts": ["1girl, hatsune miku, smile"],
    }
    # everything set that the studio does not use, with its value; GUI defaults and speed knobs are not noise
    assert ignored == [("logging_dir", "/data/logs"), ("output_dir", "/data/output"), ("save_precision", "fp16"),
                       ("training_comment", "miku v1")]
    # lr_warmup is a percentage: 5 images x 10 repeats / batch 2 x 10 epochs = 250 steps
    assert "LR warmup 10% of 250 steps = 25 steps (lr_warmup_steps)" in notes
    assert any("per-prompt options" in note for note in notes)


def test_the_imported_config_validates_and_round_trips(tmp_path):
    values, _, _ = import_kohya_file(write_json(tmp_path, gui_config(kohya_dataset(tmp_path))))
    config = validate(TrainConfig, merge(train_defaults(), values))
    assert config.max_train_epochs == 10 and config.optimizer_args == {"betas": [0.9, 0.99]}
    # the CLI's layering: the import as overrides over the defaults
    assert resolve_config(overrides=values) == config
    # as a config file (TOML has no None: such keys fall back to the defaults, which are None)
    path = tmp_path / "imported.toml"
    path.write_text(dumps_toml({k: v for k, v in values.items() if v is not None}))
    assert resolve_config(config_file=path) == config
    # the run folder's config.toml reads back the same config
    write_run_config(tmp_path / "run", config)
    assert read_run_config(tmp_path / "run") == config


def test_run_length_and_warmup_follow_kohya(tmp_path):
    data_dir = kohya_dataset(tmp_path)
    by_steps = import_kohya(gui_config(data_dir, max_train_steps="1000", lr_warmup=5)).values
    assert by_steps["max_train_steps"] == 1000 and by_steps["max_train_epochs"] is None
    assert by_steps["lr_warmup_steps"] == 50
    by_epochs = import_kohya(gui_config(data_dir, max_train_epochs=4, train_batch_size=1,
                                        gradient_accumulation_steps=2.0)).values
    assert by_epochs["max_train_epochs"] == 4 and by_epochs["gradient_accumulation_steps"] == 2
    assert by_epochs["lr_warmup_steps"] == 10  # 10% of ceil(50 / 1 / 2 * 4) = 100
    constant = import_kohya(gui_config(data_dir, lr_scheduler="constant"))
    assert constant.values["lr_scheduler"] == "constant_with_warmup"
    assert any("constant_with_warmup" in note for note in constant.notes)
    restarts = import_kohya(gui_config(data_dir, lr_scheduler="cosine_with_restarts", lr_warmup=0)).values
    assert restarts["lr_scheduler_num_cycles"] == 10  # kohya_ss: one cycle per epoch when unset


def test_text_encoder_training_follows_kohya(tmp_path):
    data_dir = kohya_dataset(tmp_path)
    both = import_kohya(gui_config(data_dir, text_encoder_lr="5e-5"))
    assert both.values["train_text_encoder"] is True and both.values["text_encoder_lr"] == 5e-5
    assert any("text encoders are trained" in note for note in both.notes)
    cached = import_kohya(gui_config(data_dir, text_encoder_lr=5e-5, sdxl_cache_text_encoder_outputs=True)).values
    assert cached["train_text_encoder"] is False and cached["cache_text_encoder_outputs"] is True
    only_lr = import_kohya(gui_config(data_dir, unet_lr=0, text_encoder_lr=0, learning_rate="2e-4")).values
    assert only_lr["learning_rate"] == 2e-4 and only_lr["unet_lr"] is None and only_lr["train_text_encoder"]


def test_lycoris_networks_and_optimizer_defaults(tmp_path):
    data_dir = kohya_dataset(tmp_path)
    lokr = import_kohya(gui_config(data_dir, LoRA_type="LyCORIS/LoKr", factor=8, optimizer="Prodigy",
                                   optimizer_args='"d_coef=1.0" "use_bias_correction=True"', learning_rate=1,
                                   unet_lr=1, text_encoder_lr=1))
    assert lokr.values["network_type"] == "lokr" and lokr.values["network_target"] == "attention_ff"
    assert lokr.values["train_text_encoder"] is False  # the studio trains LoKr on the UNet only, and says so
    assert lokr.values["optimizer_args"] == {"d_coef": 1.0, "use_bias_correction": True}
    assert lokr.values["weight_decay"] == 0.0  # Prodigy's own default, as kohya leaves it
    assert ("factor", 8) in lokr.ignored
    assert any("convolutions are not trained" in note for note in lokr.notes)
    locon = import_kohya(gui_config(data_dir, LoRA_type="LyCORIS/LoCon", LyCORIS_preset="attn-mlp",
                                    dora_wd=True)).values
    assert (locon["network_type"], locon["network_target"]) == ("dora", "attention_ff")
    kohya_locon = import_kohya(gui_config(data_dir, LoRA_type="Kohya LoCon", conv_dim=8)).values
    assert kohya_locon["network_target"] == "all"
    paged = import_kohya(gui_config(data_dir, optimizer="PagedAdamW8bit", optimizer_args=""))
    assert paged.values["optimizer_type"] == "AdamW8bit" and paged.values["weight_decay"] == 0.01


def test_an_sd_scripts_toml_config_with_sections(tmp_path):
    data_dir = kohya_dataset(tmp_path, repeats=2)
    path = tmp_path / "config.toml"
    path.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "/models/animagine-xl-3.1.safetensors"
v_parameterization = false

[additional_network_arguments]
network_module = "lycoris.kohya"
network_args = ["algo=loha", "preset=attn-only", "rank_dropout=0.1"]
network_dim = 8
network_alpha = 4
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "Adafactor"
optimizer_args = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
learning_rate = 3e-4
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 0.05

[dataset_arguments]
train_data_dir = "{data_dir.as_posix()}"
resolution = "832,1216"
cache_latents = true
keep_tokens_separator = "|||"

[training_arguments]
max_train_steps = 2000
train_batch_size = 4
mixed_precision = "fp16"
seed = 7
save_every_n_steps = 250
save_last_n_steps = 1000
cache_text_encoder_outputs = true
""")
    values, ignored, notes = import_kohya_file(path)
    assert (values["network_type"], values["network_target"]) == ("loha", "attention")
    assert values["optimizer_type"] == "Adafactor" and values["weight_decay"] == 0.0
    assert values["optimizer_args"] == {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    assert values["lr_warmup_steps"] == 100  # a ratio of 2000 steps
    assert values["resolution"] == 1008 and any("832,1216" in note for note in notes)  # same area, 8-aligned
    assert values["train_text_encoder"] is False and values["cache_text_encoder_outputs"] is True
    assert values["save_last_n"] == 4 and values["keep_tokens_separator"] == "|||"
    assert ignored == [("network_args rank_dropout", "0.1")]
    validate(TrainConfig, merge(train_defaults(), values))


@pytest.mark.parametrize(("changes", "message"), [
    ({"learning_rate": "fast", "unet_lr": ""}, "learning_rate = 'fast': not a number"),
    ({"optimizer": "DAdaptAdam"}, "optimizer = 'DAdaptAdam': not supported; choose one of: Adafactor, AdamW"),
    ({"LoRA_type": "LyCORIS/iA3"}, "LoRA_type = 'LyCORIS/iA3': not supported"),
    ({"lr_scheduler": "adafactor"}, "pair Adafactor with constant_with_warmup"),
    ({"max_resolution": "big"}, 'max_resolution = \'big\': expected "1024,1024" or 1024'),
    ({"network_dim": 100000}, "ranks up to 1024"),
    ({"optimizer_args": "weight_decay"}, "'weight_decay' is not name=value"),
    ({"optimizer": "Adafactor", "optimizer_args": "relative_step=True"}, "relative_step=True sets its own LR"),
    ({"mixed_precision": "fp8"}, "choose no, fp16 or bf16"),
    ({"lr_warmup": 150}, "below 100 (a percentage"),
    ({"train_batch_size": 1.5}, "train_batch_size = 1.5: must be a whole number"),
    ({"shuffle_caption": "sometimes"}, "must be true or false"),
    ({"unet_lr": 0, "text_encoder_lr": 1e-4}, "training the text encoder alone is not supported"),
    ({"learning_rate": 0, "unet_lr": 0, "text_encoder_lr": 0}, "no learning rate"),
    ({"caption_dropout_rate": 1.5}, "caption_dropout_rate"),  # TrainConfig's own range check, with the file named
])
def test_bad_values_are_clear_config_errors(tmp_path, changes, message):
    path = write_json(tmp_path, gui_config(kohya_dataset(tmp_path), **changes))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as error:
        import_kohya_file(path)
    assert str(path) in str(error.value)


def test_a_percent_warmup_over_epochs_needs_the_dataset(tmp_path):
    with pytest.raises(ConfigError, match="set lr_warmup_steps in steps, or max_train_steps"):
        import_kohya(gui_config(tmp_path / "missing"))
    assert import_kohya(gui_config(tmp_path / "missing", lr_warmup=0)).values["max_train_epochs"] == 10


def test_unreadable_files_are_config_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        import_kohya_file(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="kohya config not found"):
        import_kohya_file(tmp_path / "nothing.json")


def tiny_cli_setup(tmp_path, demo_models_dir):
    """A 2-step kohya GUI config over a 2-image dataset, and a workspace whose models are the demo's."""
    data_dir = kohya_dataset(tmp_path, repeats=1, images=2)
    path = write_json(tmp_path, gui_config(
        data_dir, pretrained_model_name_or_path="demo-sdxl", max_resolution="64,64", min_bucket_reso=64,
        max_bucket_reso=128, network_dim=4, network_alpha=2, max_train_steps=2, lr_warmup=0, train_batch_size=1,
        optimizer="AdamW", mixed_precision="no", sample_every_n_steps=0, sample_prompts=""))
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "models").symlink_to(demo_models_dir, target_is_directory=True)
    return path


def test_the_cli_trains_from_an_imported_config_and_lists_what_it_ignored(tmp_path, demo_models_dir, capsys):
    from studio.__main__ import main
    from studio.training.loop import read_events

    path = tiny_cli_setup(tmp_path, demo_models_dir)
    run_dir = tmp_path / "run"
    code = main(["train", "--import-kohya", str(path), "--output-name", "cli_lora", "--output-dir", str(run_dir),
                 "--workspace", str(tmp_path / "ws")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"kohya config {path}: 4 setting(s) not used by the studio:" in out
    assert "  ignored logging_dir = '/data/logs'" in out and "  ignored training_comment = 'miku v1'" in out
    config = read_run_config(run_dir)
    assert config.output_name == "cli_lora" and config.network_dim == 4 and config.optimizer_args == {
        "betas": [0.9, 0.99]}
    assert [e["step"] for e in read_events(run_dir) if e["kind"] == "step"] == [1, 2]
    assert (run_dir / "loras" / "cli_lora.safetensors").is_file()


def test_the_cli_reports_a_bad_kohya_config(tmp_path, capsys):
    from studio.__main__ import main

    path = write_json(tmp_path, gui_config(kohya_dataset(tmp_path), optimizer="SGDNesterov"))
    assert main(["train", "--import-kohya", str(path), "--workspace", str(tmp_path / "ws")]) == 2
    assert "optimizer = 'SGDNesterov': not supported" in capsys.readouterr().err


def test_a_sparse_toml_sets_only_what_it_names(tmp_path):
    path = tmp_path / "sparse.toml"
    path.write_text('network_dim = 8\nnetwork_alpha = 8\nnetwork_train_unet_only = true\n')
    values, ignored, notes = import_kohya_file(path)
    assert values == {"network_type": "lora", "network_target": "attention_ff", "network_dim": 8,
                      "network_alpha": 8.0, "train_text_encoder": False}
    assert ignored == [] and notes == []


def test_multires_noise_is_listed_and_trained_without_an_offset(tmp_path):
    result = import_kohya(gui_config(kohya_dataset(tmp_path), noise_offset_type="Multires",
                                     multires_noise_iterations=6, lr_warmup=0))
    assert result.values["noise_offset"] == 0.0 and result.values["lr_warmup_steps"] == 0
    assert ("noise_offset_type", "Multires") in result.ignored and ("multires_noise_iterations", 6) in result.ignored


def test_a_full_disk_is_one_clear_line_in_the_cli(tmp_path, demo_models_dir, capsys, monkeypatch):
    from safetensors import SafetensorError
    from safetensors import torch as st

    from studio.__main__ import main

    path = tiny_cli_setup(tmp_path, demo_models_dir)

    def full_disk(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(st, "save_file", full_disk)
    code = main(["train", "--import-kohya", str(path), "--output-dir", str(tmp_path / "run"),
                 "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: could not write" in err and "No space left on device" in err and "Traceback" not in err
