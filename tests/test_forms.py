"""Form -> config conversion and the workspace boundary for files named in the UI."""

from pathlib import Path

import pytest

from studio.errors import ConfigError
from studio.models.catalog import load_catalog
from studio.schemas import GenerateConfig, validate
from studio.ui.forms import GENERATE_FIELDS, LORA_SLOTS, as_dict, generate_form


def form_values(**overrides):
    values = {name: None for name in GENERATE_FIELDS}
    values.update(prompt="1girl, solo", negative_prompt="", model="demo-sdxl", vae="", width=512.0, height=768.0,
                  steps=8.0, cfg_scale=5, sampler="Euler a", seed=-1.0, batch_size=1, batch_count=2,
                  quality_tags=True, aesthetic="", year="newest", rating="safe", default_negative=True,
                  hires=False, hires_scale=1.5, hires_denoise=0.5, hires_steps=10.0)
    for i in range(1, LORA_SLOTS + 1):
        values[f"lora_{i}"], values[f"lora_{i}_weight"] = "", 1.0
    values.update(overrides)
    return values


def convert(values, workspace):
    return generate_form(values, loras_dir=workspace / "loras", workspace=workspace, catalog=load_catalog())


def test_prompt_is_the_first_field_for_the_api():
    assert GENERATE_FIELDS[0] == "prompt"
    assert len(set(GENERATE_FIELDS)) == len(GENERATE_FIELDS)


def test_form_becomes_a_valid_config(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"x")
    values = form_values(lora_2="style.safetensors", lora_2_weight=0.7, hires=True)
    config = validate(GenerateConfig, convert(values, tmp_path))
    assert (config.width, config.height, config.steps, config.batch_count) == (512, 768, 8, 2)
    assert config.style.year == "newest" and config.style.rating == "safe"
    assert [(lora.weight, lora.path.endswith("style.safetensors")) for lora in config.loras] == [(0.7, True)]
    assert config.hires is not None and config.hires.steps == 10


def test_files_outside_the_workspace_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="outside the workspace"):
        convert(form_values(lora_1="/etc/passwd"), tmp_path)
    with pytest.raises(ConfigError, match="is not usable"):
        convert(form_values(model="../elsewhere/model.safetensors"), tmp_path)


@pytest.mark.parametrize("reference", ["studio/../../../etc", "/etc", "/no/such/dir", "linked-out",
                                       "../x.safetensors", "./studio/models"])
def test_model_paths_outside_the_workspace_get_one_message(tmp_path, reference):
    (tmp_path / "linked-out").symlink_to("/etc")
    for field in ("model", "vae"):
        with pytest.raises(ConfigError) as refused:
            convert(form_values(**{field: reference}), tmp_path)
        message = str(refused.value)
        assert "is not usable" in message and "exist" not in message


def test_model_references_that_stay(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert convert(form_values(model="someone/some-model"), tmp_path)["model"] == "someone/some-model"
    (tmp_path / "linked-out").symlink_to("/etc")
    assert convert(form_values(model="linked-out/x"), tmp_path)["model"] == "linked-out/x", "a repo id, not /etc/x"
    assert convert(form_values(model="models/mine"), tmp_path)["model"] == str((tmp_path / "models" / "mine").resolve())


def test_a_repo_id_is_never_a_folder_beside_the_app(tmp_path):
    """`studio/models` is a folder of the app's own checkout: a request naming it gets a repo id
    (the same answer whether such a folder exists or not), and the loader asks the hub for it."""
    from studio.models.catalog import load_catalog, resolve_reference

    assert Path("studio/models").is_dir(), "the tests run from the checkout"
    for reference in ("studio/models", "nosuch/folder"):
        assert convert(form_values(model=reference), tmp_path)["model"] == reference
        assert resolve_reference(reference, load_catalog()).kind == "hub"


def test_as_dict_refuses_a_mismatched_form():
    with pytest.raises(ValueError):
        as_dict(GENERATE_FIELDS, ("only one",))


def test_a_lora_symlink_out_of_the_workspace_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.safetensors").write_bytes(b"x")
    ws = tmp_path / "ws"
    (ws / "loras").mkdir(parents=True)
    (ws / "loras" / "evil.safetensors").symlink_to(outside / "evil.safetensors")
    with pytest.raises(ConfigError, match="outside the workspace"):
        convert(form_values(lora_1="evil.safetensors"), ws)


def test_model_dirs_the_owner_configured_are_readable(tmp_path):
    comfy = tmp_path / "ComfyUI" / "models"
    (comfy / "loras").mkdir(parents=True)
    (comfy / "checkpoints").mkdir()
    (comfy / "loras" / "style.safetensors").write_bytes(b"x")
    (comfy / "checkpoints" / "model.safetensors").write_bytes(b"x")
    ws = tmp_path / "ws"
    ws.mkdir()
    values = form_values(model=str(comfy / "checkpoints" / "model.safetensors"),
                         lora_1=str(comfy / "loras" / "style.safetensors"))
    with pytest.raises(ConfigError):
        convert(values, ws)
    form = generate_form(values, loras_dir=ws / "loras", workspace=ws, catalog=load_catalog(), model_dirs=(comfy,))
    assert form["model"] == str((comfy / "checkpoints" / "model.safetensors").resolve())
    assert form["loras"][0]["path"] == str((comfy / "loras" / "style.safetensors").resolve())
