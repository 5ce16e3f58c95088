"""README.md's front matter builds the Space: Python and Gradio versions that install, the models
it preloads are the ones the app loads by default, OAuth for per-user workspaces."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def test_versions_match_what_installs():
    meta = front_matter()
    pin = re.search(r"^gradio(?:\[[a-z,]+\])?==([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == pin and meta["app_file"] == "app.py"
    assert str(meta["python_version"]).startswith("3.12"), "Spaces' default 3.10 cannot install diffusers 0.42"


def test_preloads_are_the_default_model_and_tagger():
    from studio.captioning.tagger import DEFAULT_TAGGER, KNOWN_TAGGERS
    from studio.models.catalog import load_catalog

    meta = front_matter()
    model = load_catalog()["animagine-xl-3.1"].source
    tagger = KNOWN_TAGGERS[DEFAULT_TAGGER]
    preloaded = {line.split()[0]: line.split()[1].split(",") for line in meta["preload_from_hub"]}
    assert set(meta["models"]) == {model, tagger} == set(preloaded)
    assert preloaded[tagger] == ["model.onnx", "selected_tags.csv"]
    assert "unet/diffusion_pytorch_model.safetensors" in preloaded[model]


def test_sign_in_asks_for_write_access():
    meta = front_matter()
    assert meta["hf_oauth"] is True and {"write-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"])
