"""Generate-tab handlers that need no browser: PNG Info back into the form, prompt preview, sizes."""

import gradio as gr
import pytest

from studio.generation.infotext import format_infotext
from studio.ui.forms import GENERATE_FIELDS
from studio.ui.generate_tab import PREVIEW_STYLE, on_builder, on_preview, on_size, png_to_form

FIELDS = [n for n in GENERATE_FIELDS if n not in ("model", "vae") and not n.startswith("lora_")]


def test_png_info_fills_the_form_and_leaves_unknown_fields_alone():
    text = format_infotext(
        "1girl, hatsune miku \\(cosplay\\), (smile:1.2)\nsecond line",
        "lowres, text",
        {"Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 77,
         "Size": "832x1216", "Model": "animagine-xl-3.1", "Denoising strength": 0.4, "Hires upscale": 1.5,
         "Hires steps": 12},
    )
    values = dict(zip(FIELDS, png_to_form(text, FIELDS)))
    assert values["prompt"] == "1girl, hatsune miku \\(cosplay\\), (smile:1.2)\nsecond line"
    assert values["negative_prompt"] == "lowres, text"
    assert (values["steps"], values["cfg_scale"], values["seed"]) == (30, 6.5, 77)
    assert (values["width"], values["height"], values["sampler"]) == (832, 1216, "DPM++ 2M Karras")
    assert values["hires"] is True and values["hires_scale"] == 1.5 and values["hires_denoise"] == 0.4
    assert isinstance(values["batch_size"], type(gr.skip())), "fields the text lacks stay as they are"


def test_png_info_brings_the_images_loras_and_names_the_missing_ones(tmp_path):
    """`<lora:name:weight>` in the prompt (A1111, and our own images), found in workspace/loras by
    name or by the `Lora hashes` entry; one the folder lacks is named, not silently dropped."""
    from studio.generation.infotext import lora_hash
    from tests.lora_fixtures import write_demo_kohya_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    style = write_demo_kohya_lora(loras / "style.safetensors", seed=1)
    renamed = write_demo_kohya_lora(loras / "mychar-v2.safetensors", seed=2)
    hashes = f"style: {lora_hash(style)}, mychar: {lora_hash(renamed)}, gone: 0123456789ab"
    text = format_infotext("1girl, smile, <lora:style:0.7>, <lora:mychar:0.45>, <lora:gone:1>", "",
                           {"Steps": 20, "Seed": 1, "Lora hashes": hashes})
    names = list(GENERATE_FIELDS)
    with pytest.warns(UserWarning, match=r"left out of the LoRA stack: gone \(hash 0123456789ab\)"):
        values = dict(zip(names, png_to_form(text, names, loras)))
    assert values["prompt"] == "1girl, smile"
    assert [(values[f"lora_{i}"], values[f"lora_{i}_weight"]) for i in range(1, 5)] == [
        ("style.safetensors", 0.7), ("mychar-v2.safetensors", 0.45), ("", 1.0), ("", 1.0)]


def test_png_info_without_parameters_is_refused():
    with pytest.raises(gr.Error):
        png_to_form("", FIELDS)


@pytest.fixture
def catalog_ctx(tmp_path):
    """An AppContext whose manager knows the catalog (no model is loaded)."""
    from studio.context import AppContext
    from studio.jobs import JobRunner
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.settings import Settings

    settings = Settings(workspace=tmp_path / "ws", demo=True)
    settings.ensure_workspace()
    return AppContext(settings, ModelManager(tmp_path / "models", requested_policy="cpu",
                                             device=DeviceInfo("cpu", "CPU")), JobRunner())


def preview(ctx, model, prompt, negative="", **style):
    values = {"quality_tags": True, "aesthetic": "", "year": "", "rating": "", "default_negative": True,
              "score": "", "artist": "", **style}
    return on_preview(ctx, model, prompt, negative, *(values[name] for name in PREVIEW_STYLE))


def test_preview_shows_the_final_prompt(catalog_ctx):
    positive, negative = preview(catalog_ctx, "demo-sdxl", "1girl", year="newest", rating="safe")
    assert positive == "1girl, safe, newest, masterpiece, best quality, very aesthetic, absurdres"
    assert negative.startswith("nsfw, lowres")
    assert preview(catalog_ctx, "demo-sdxl", "1girl", "bad", quality_tags=False, default_negative=False) == (
        "1girl", "bad")


def test_the_preview_and_builder_are_the_model_familys_own(catalog_ctx):
    """Anima's builder: its prefix, score and @artist; what the preview shows is what is sent."""
    from studio.generation.generate import family_prompt
    from studio.schemas import GenerateConfig, PromptStyle

    style = {"score": "score_9", "artist": "wlop", "year": "newest"}
    positive, negative = preview(catalog_ctx, "demo-anima", "1girl, hatsune miku, vocaloid, smile", **style)
    assert positive == "newest, masterpiece, best quality, score_9, safe, 1girl, hatsune miku, vocaloid, smile, @wlop"
    assert negative == "worst quality, low quality, score_1, score_2, score_3, artist name"
    sent = family_prompt(GenerateConfig(prompt="1girl, hatsune miku, vocaloid, smile",
                                        style=PromptStyle(quality_tags=True, default_negative=True, **style)), "anima")
    assert sent == (positive, negative)
    title, quality, aesthetic, score, artist = on_builder(catalog_ctx, "demo-anima")
    assert "Anima" in title["label"] and "score_7" in quality["label"]
    assert (aesthetic["visible"], score["visible"], artist["visible"]) == (False, True, True)
    title, quality, aesthetic, score, artist = on_builder(catalog_ctx, "demo-sdxl")
    assert "Animagine" in title["label"] and "absurdres" in quality["label"]
    assert (aesthetic["visible"], score["visible"], artist["visible"]) == (True, False, False)
    assert preview(catalog_ctx, "demo-anima", "1girl", artist="a, b")[0].startswith("⚠ ")


def test_size_presets_set_width_and_height():
    assert on_size("832x1216") == (832, 1216)
    assert all(isinstance(v, type(gr.skip())) for v in on_size("Custom"))


def test_choosing_a_catalog_model_brings_its_defaults_and_samplers(tmp_path):
    from studio.context import AppContext
    from studio.settings import Settings
    from studio.ui.generate_tab import on_model_change

    ctx = AppContext.create(Settings(workspace=tmp_path, demo=True))
    size, width, height, steps, cfg, sampler = on_model_change(ctx, "anima")
    assert (size, width, height, steps, cfg) == ("1024x1024", 1024, 1024, 30, 4.5)
    assert sampler.choices == [("Euler", "Euler"), ("UniPC", "UniPC")] and sampler.value == "Euler"
    _, width, height, steps, _, sampler = on_model_change(ctx, "animagine-xl-3.1")
    assert (width, height, steps, sampler.value) == (832, 1216, 28, "Euler a")
    assert len(sampler.choices) == 7
    untouched = on_model_change(ctx, "someone/some-model")
    assert all(isinstance(v, type(gr.skip())) for v in untouched[:5])


def test_comfyuis_anima_file_brings_anima_samplers_and_defaults(tmp_path):
    """A ComfyUI Anima file (not in the catalog) is told apart by its tensors: its family's
    samplers and the Anima defaults (the demo's, when the app runs --demo)."""
    import torch
    from safetensors.torch import save_file

    from studio.context import AppContext
    from studio.settings import Settings
    from studio.ui.generate_tab import on_model_change

    dit = tmp_path / "ws" / "models" / "anima-base-v1.0.safetensors"
    dit.parent.mkdir(parents=True)
    save_file({"net.blocks.0.self_attn.q_proj.weight": torch.zeros(2, 2),
               "net.llm_adapter.out_proj.weight": torch.zeros(2, 2)}, str(dit))
    for demo in (True, False):
        ctx = AppContext.create(Settings(workspace=tmp_path / "ws", demo=demo))
        _, _, _, got_steps, _, sampler = on_model_change(ctx, str(dit))
        assert sampler.choices == [("Euler", "Euler"), ("UniPC", "UniPC")] and sampler.value == "Euler"
        assert got_steps == ctx.manager.catalog["demo-anima" if demo else "anima"].defaults["steps"]


def test_a_full_disk_is_one_clear_error_in_the_ui_and_loses_nothing(tmp_path, demo_models_dir, monkeypatch):
    """The image is written, the disk fills up on the next: the UI shows one line naming the
    file and what to do, the earlier image is intact, no temporary file is left, and the next
    generation (disk freed) works."""
    import errno

    from PIL import Image

    from studio.context import AppContext
    from studio.jobs import JobRunner
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager
    from studio.settings import Settings
    from studio.ui.generate_tab import api_generate
    from tests.test_forms import form_values

    settings = Settings(workspace=tmp_path / "ws", demo=True)
    settings.ensure_workspace()
    ctx = AppContext(settings, ModelManager(demo_models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU")),
                     JobRunner())
    values = form_values(width=64.0, height=64.0, steps=2.0, batch_count=1, seed=5.0)
    first = api_generate(ctx, *(values[name] for name in GENERATE_FIELDS))
    kept = {p: p.read_bytes() for p in settings.outputs_dir.rglob("*.png")}
    assert len(first) == 1 and len(kept) == 1

    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(gr.Error) as error:
        api_generate(ctx, *(values[name] for name in GENERATE_FIELDS))
    message = str(error.value.message)
    assert message.startswith("could not write ") and "No space left on device" in message
    assert "free some disk space" in message and "Traceback" not in message and "\n" not in message
    assert {p: p.read_bytes() for p in settings.outputs_dir.rglob("*.png")} == kept
    assert not [p for p in settings.outputs_dir.rglob("*") if p.name.endswith(".tmp")]

    monkeypatch.setattr(Image.Image, "save", real_save)
    assert len(api_generate(ctx, *(values[name] for name in GENERATE_FIELDS))) == 1
