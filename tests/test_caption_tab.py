"""Caption-tab handlers without a browser: the form <-> config mapping, dataset folders inside the
workspace, captioning as a job that streams into the gallery, the editor, undoable bulk edits on
the filtered images, buckets, uploads and presets."""

import io
import threading
import time
import tomllib
import zipfile

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.context import AppContext
from studio.errors import ConfigError
from studio.jobs import JobRunner
from studio.models.devices import DeviceInfo
from studio.models.manager import ModelManager
from studio.presets import merge
from studio.settings import Settings
from studio.ui import caption_tab as tab
from studio.ui.caption_form import (
    CAPTION_FIELDS,
    caption_config,
    create_dataset,
    dataset_path,
    default_settings,
    form_to_settings,
    settings_to_form,
    unshown_settings,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")  # the demo tagger is built here once


@pytest.fixture
def ctx(tmp_path, models_dir):
    settings = Settings(workspace=tmp_path / "workspace", demo=True)
    settings.ensure_workspace()
    manager = ModelManager(models_dir, requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))
    return AppContext(settings, manager, JobRunner())


def image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(path)


@pytest.fixture
def data(ctx):
    """datasets/chars: three small images (two captioned by hand) and a broken file."""
    folder = ctx.settings.datasets_dir / "chars"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 64), (96, 64), (48, 80)]):
        image(folder / f"img{i}.png", w, h, seed=i)
    (folder / "img0.txt").write_text("1girl, red hair, smile")
    (folder / "img1.txt").write_text("1boy, blue hair")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return folder


def form(**overrides):
    values = settings_to_form(default_settings(demo=True))
    values["nl_api_key"] = ""
    values.update(overrides)
    return tuple(values[name] for name in CAPTION_FIELDS)


def run_caption(ctx, folder="chars", **overrides):
    outputs = list(tab.on_caption(ctx, folder, "", "", "", *form(**overrides)))
    return outputs[-1], outputs


# -- the form ------------------------------------------------------------------------------------
def test_form_round_trip_and_text_fields_become_lists():
    defaults = default_settings(demo=True)
    shown = form_to_settings(settings_to_form(defaults))
    assert merge(defaults, shown) == defaults
    assert unshown_settings(defaults) == ["rules.aesthetic_score"], "every other setting has a field"
    values = settings_to_form(defaults) | {"exclude": "simple background,  * background\nsolo", "year": 2024.0,
                                           "character_series": "saber (fate) -> fate (series)\n\n", "score": ""}
    settings = form_to_settings(values)
    assert settings["rules"]["exclude"] == ["simple background", "* background", "solo"]
    assert settings["rules"]["year"] == 2024 and settings["rules"]["score"] is None
    assert settings["rules"]["character_series"] == {"saber (fate)": "fate (series)"}
    config = caption_config(settings, "/tmp/x")
    assert config.rules.year == 2024 and config.tagger == "demo-tagger"


@pytest.mark.parametrize("overrides, message", [
    ({"character_series": "saber (fate)"}, "character -> series, line 1"),
    ({"year": "soon"}, "year must be a whole number"),
    ({"trigger": "a, b"}, "contains a comma"),
    ({"quality": ["great quality"], "template": "anima"}, "not a quality tag of Anima"),
    ({"nl_backend": "openai:http://x/v1"}, "openai:URL#MODEL"),
    ({"nl_backend": "some/vlm", "nl_template": "Describe {oops}"}, "unknown placeholder"),
])
def test_bad_settings_get_a_message_that_says_what_to_fix(overrides, message):
    values = settings_to_form(default_settings(demo=True)) | overrides
    with pytest.raises(ConfigError, match=message):
        caption_config(form_to_settings(values), "/tmp/x")


def test_dataset_folders_stay_inside_the_workspace(ctx, data):
    ws = ctx.settings.workspace
    assert dataset_path(ctx.settings, "chars") == data.resolve()
    assert dataset_path(ctx.settings, "datasets/chars") == data.resolve()
    assert dataset_path(ctx.settings, str(data)) == data.resolve()
    for outside in ("/etc", "../../", str(ws.parent)):
        with pytest.raises(ConfigError, match="outside the workspace"):
            dataset_path(ctx.settings, outside)
    with pytest.raises(ConfigError, match="no dataset folder 'nope'"):
        dataset_path(ctx.settings, "nope")
    for bad in ("../x", ".hidden", "a/b", "", "dots."):
        with pytest.raises(ConfigError, match="not usable"):
            create_dataset(ctx.settings, bad)
    assert create_dataset(ctx.settings, "new one") == (ctx.settings.datasets_dir / "new one", True)
    assert create_dataset(ctx.settings, "new one")[1] is False


# -- opening and uploading -----------------------------------------------------------------------
def test_open_shows_scan_gallery_thumbnails_and_problems(ctx, data):
    out = tab.on_open(ctx, "chars")
    assert "3 images" in out["scan"] and "1 skipped" in out["scan"]
    assert out["problems"].visible is True
    assert out["shown"] == ["img0.png", "img1.png", "img2.png"]
    thumbs = [path for path, _ in out["gallery"]]
    assert all("/.studio/thumbs/" in p and p.endswith(".jpg") for p in thumbs)
    assert max(Image.open(thumbs[1]).size) <= 384
    assert [caption for _, caption in out["gallery"]] == ["1girl, red hair, smile", "1boy, blue hair", "(no tags)"]
    assert "**3 images** · 2 with tags" in out["gallery_info"]
    assert list(out["frequency"].itertuples(index=False, name=None))[:1] == [("1boy", 1)]
    assert tab.on_open(ctx, "chars")["gallery"] == out["gallery"], "thumbnails are made once"


def test_a_name_that_does_not_exist_yet_is_no_error(ctx):
    out = tab.on_open(ctx, "later")
    assert out["scan"] == "**later** does not exist yet: press Create, or upload images into it."
    assert out["gallery"] == []
    assert "outside the workspace" in tab.on_open(ctx, "../..")["scan"]
    created = tab.on_create(ctx, "later")
    assert "Created `datasets/later`" in created["upload_msg"] and (ctx.settings.datasets_dir / "later").is_dir()


def test_upload_imports_images_and_zips_into_a_new_dataset(ctx, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    image(uploads / "a.png", 32, 32)
    (uploads / "a.txt").write_text("1girl")
    (uploads / "notes.exe").write_bytes(b"MZ")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        png = io.BytesIO()
        Image.new("RGB", (16, 16)).save(png, "PNG")
        zf.writestr("pack/a.png", png.getvalue())  # same name as the upload: renamed, not overwritten
        zf.writestr("../evil.png", png.getvalue())
    (uploads / "pack.zip").write_bytes(buffer.getvalue())
    out = tab.on_upload(ctx, "fresh", [str(p) for p in sorted(uploads.iterdir())])
    assert "imported" in out["upload_msg"] and "notes.exe" in out["upload_msg"]
    assert len(out["shown"]) == 1 and out["upload"] is None
    assert (ctx.settings.datasets_dir / "fresh" / "a.txt").read_text() == "1girl"
    assert not (ctx.settings.workspace / "datasets" / "evil.png").exists()
    safe_zip = io.BytesIO()
    with zipfile.ZipFile(safe_zip, "w") as zf:
        zf.writestr("a.png", (uploads / "a.png").read_bytes())
    (uploads / "again.zip").write_bytes(safe_zip.getvalue())
    out = tab.on_upload(ctx, "fresh", [str(uploads / "again.zip")])
    assert "renamed" in out["upload_msg"] and len(out["shown"]) == 2


def test_an_uploaded_file_the_dataset_cannot_use_is_said_so(ctx, tmp_path):
    """"1 file imported" alone, for a broken image the scan then skips, was misleading."""
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tab.on_upload(ctx, "fresh", [str(tmp_path / "broken.png")])
    assert out["upload_msg"].startswith("1 file imported into `fresh`")
    assert "- broken.png was imported, but the dataset cannot use it:" in out["upload_msg"]


# -- captioning ----------------------------------------------------------------------------------
def test_captioning_streams_status_and_ends_with_the_summary_and_skipped_files(ctx, data):
    final, outputs = run_caption(ctx, trigger="charx")
    assert outputs[0]["status"] == "Starting…"
    assert final["status"].startswith("**Done**: 3 images, 1 tagged, 2 already captioned, 1 skipped")
    assert final["skipped"].visible is True
    tags = (data / "img2.txt").read_text().split(", ")
    assert tags[0] == "charx" and len(tags) > 2
    assert (data / "img0.txt").read_text() == "1girl, red hair, smile", "existing captions are skipped by default"
    assert final["gallery"][2][1].startswith("charx, ")
    assert "tagger captions for 1 images" in final["history"].iloc[0]["edit"]


def test_captions_stream_into_the_gallery_and_stop_keeps_what_was_written(ctx, data, monkeypatch):
    from studio.captioning.run import CaptionRunReport

    monkeypatch.setattr(tab, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(tab, "GALLERY_REFRESH_SECONDS", 0.02)

    def slow_caption(manager, config, report, stop, dataset=None, gpu_calls=None):  # one caption per 0.25 s
        run = CaptionRunReport(images=3)
        for i in range(3):
            if stop.is_set():
                run.stopped = True
                break
            (data / f"img{i}.txt").write_text(f"streamed{i}")
            run.tagged.append(f"img{i}.png")
            report((i + 1) / 3, f"tagging {i + 1}/3 · 6.7 images/s · ETA 0s")
            time.sleep(0.25)
        return run

    monkeypatch.setattr(tab, "caption_dataset", slow_caption)
    final, outputs = run_caption(ctx)
    galleries = [[caption for _, caption in out["gallery"]] for out in outputs[:-1] if "gallery" in out]
    partial = [g for g in galleries if 0 < sum(c.startswith("streamed") for c in g) < 3]
    assert partial, f"captions appear while the job runs: {galleries}"
    assert any("tagging 1/3 · 6.7 images/s · ETA 0s" in out["status"] for out in outputs)
    assert [c for _, c in final["gallery"]] == ["streamed0", "streamed1", "streamed2"]

    generator = tab.on_caption(ctx, "chars", "", "", "", *form())
    next(generator)
    tab.on_stop(ctx)
    final = list(generator)[-1]
    assert final["status"].startswith("**Stopped** (what was written is kept)")


def test_api_caption_returns_summary_and_details_and_bad_input_is_specific(ctx, data):
    summary, details = tab.api_caption(ctx, "chars", *form(existing="overwrite", trigger="t1"))
    assert summary.startswith("Done: 3 images, 3 tagged") and "skipped broken.png:" in summary
    assert details["tagged"] == ["img0.png", "img1.png", "img2.png"] and details["skipped"][0][0] == "broken.png"
    assert all((data / f"img{i}.txt").read_text().startswith("t1, ") for i in range(3))
    with pytest.raises(gr.Error, match="no dataset folder 'missing'"):
        tab.api_caption(ctx, "missing", *form())
    with pytest.raises(gr.Error, match="outside the workspace"):
        tab.api_caption(ctx, "/etc", *form())
    with pytest.raises(gr.Error, match="tagger .no-such-tagger. is not usable: name one of demo-tagger, wd-eva02"):
        tab.api_caption(ctx, "chars", *form(tagger="no-such-tagger", existing="overwrite"))


def test_a_failed_run_says_so_in_the_status_and_as_an_error(ctx, data):
    outputs = []
    with pytest.raises(gr.Error, match="the tagger nobody/no-such-tagger is not in the models cache"):
        for out in tab.on_caption(ctx, "chars", "", "", "", *form(tagger="nobody/no-such-tagger", existing="overwrite")):
            outputs.append(out)  # noqa: PERF402 (the loop ends in the error)
    assert outputs[-1]["status"].startswith("**Failed**: the tagger nobody/no-such-tagger is not in the models cache")
    assert (data / "img0.txt").read_text() == "1girl, red hair, smile"


def test_status_line_shows_progress_and_stop_reaches_the_job(ctx):
    release = threading.Event()
    job = ctx.jobs.start(tab.JOB_NAME, lambda job: release.wait(5))
    job.report(0.4, "tagging 4/10 · 2.0 images/s · ETA 3s")
    line = tab.caption_status_line(job)
    assert line.startswith("40% · tagging 4/10 · 2.0 images/s · ETA 3s · ") and line.endswith("s elapsed")
    assert tab.on_stop(ctx)["status"].startswith("Stopping") and job.stop_requested
    release.set()
    job.wait()
    assert tab.on_stop(ctx)["status"] == "Nothing is being captioned."


def test_edits_wait_while_captioning_runs(ctx, data):
    tab.on_open(ctx, "chars")
    release = threading.Event()
    job = ctx.jobs.start(tab.JOB_NAME, lambda job: release.wait(5))
    try:
        with pytest.raises(gr.Error, match="captioning is running"):
            tab.on_save(ctx, "chars", "", "", "img0.png", "x", "")
        with pytest.raises(gr.Error, match="captioning is running"):
            tab.on_add_tags(ctx, "chars", "", "", "", "x", "front")
        with pytest.raises(gr.Error, match="already running"):
            tab.api_caption(ctx, "chars", *form())
    finally:
        release.set()
        job.wait()
    assert (data / "img0.txt").read_text() == "1girl, red hair, smile"


# -- the editor and bulk edits -------------------------------------------------------------------
def test_select_edit_save_and_undo_one_caption(ctx, data):
    shown = tab.on_open(ctx, "chars")["shown"]
    editor = tab.on_select_image(ctx, "chars", shown, 1)
    assert editor["edit_tags"] == "1boy, blue hair" and editor["selected"] == "img1.png"
    out = tab.on_save(ctx, "chars", "", "", "img1.png", "1boy, blue hair, hat", "A boy in a hat.")
    assert out["edit_msg"] == "Saved the tags and NL caption of img1.png."
    assert (data / "img1.txt").read_text() == "1boy, blue hair, hat"
    assert (data / "img1_nl.txt").read_text() == "A boy in a hat."
    assert out["gallery"][1][1] == "[NL] 1boy, blue hair, hat"
    assert tab.on_save(ctx, "chars", "", "", "img1.png", "1boy, blue hair, hat", "A boy in a hat.")["edit_msg"] \
        == "img1.png: nothing changed."
    undone = tab.on_undo(ctx, "chars", "", "", "img1.png")
    assert undone["bulk_msg"].startswith("**Undone**: edit the caption of img1.png")
    assert not (data / "img1_nl.txt").exists() and undone["edit_nl"] == ""
    tab.on_undo(ctx, "chars", "", "", "img1.png")
    assert (data / "img1.txt").read_text() == "1boy, blue hair"
    with pytest.raises(gr.Error, match="click an image"):
        tab.on_save(ctx, "chars", "", "", "", "x", "")


def test_bulk_edits_act_on_the_filtered_images_and_undo_restores_them(ctx, data):
    before = {p.name: p.read_bytes() for p in data.glob("*.txt")}
    tab.on_open(ctx, "chars")
    out = tab.on_add_tags(ctx, "chars", "", "red hair, blue hair", "img0.png", "charx, solo", "front")
    assert out["bulk_msg"].startswith("**2 captions changed**: add 'charx', 'solo' at the front (in the 2 filtered")
    assert (data / "img0.txt").read_text() == "charx, solo, 1girl, red hair, smile"
    assert not (data / "img2.txt").exists(), "images outside the filter are left alone"
    assert out["edit_tags"] == "charx, solo, 1girl, red hair, smile", "the editor shows the new caption"
    out = tab.on_add_tags(ctx, "chars", "", "", "", "solo", "back")
    assert out["bulk_msg"].startswith("**1 caption changed**") and (data / "img2.txt").read_text() == "solo"
    out = tab.on_remove_tags(ctx, "chars", "1girl", "", "", "smile")
    assert "1 caption changed" in out["bulk_msg"] and "smile" not in (data / "img0.txt").read_text()
    tab.on_replace_tag(ctx, "chars", "1boy", "", "", "blue hair", "navy hair")
    assert (data / "img1.txt").read_text() == "charx, solo, 1boy, navy hair"
    out = tab.on_rename_tag(ctx, "chars", "1boy", "", "", "solo", "alone")
    assert "(whole dataset)" in out["bulk_msg"] and "3 captions changed" in out["bulk_msg"]
    out = tab.on_regex(ctx, "chars", "", "", "", r"^(\w+) hair$", r"\1-hair", "tags")
    assert (data / "img0.txt").read_text() == "charx, alone, 1girl, red-hair"
    assert out["frequency"].set_index("tag").loc["alone", "images"] == 3
    assert len(out["history"]) == 6
    with pytest.raises(gr.Error, match="invalid regular expression"):
        tab.on_regex(ctx, "chars", "", "", "", "(", "x", "tags")
    with pytest.raises(gr.Error, match="no tag given"):
        tab.on_add_tags(ctx, "chars", "", "", "", " , ", "front")
    for _ in range(6):
        tab.on_undo(ctx, "chars", "", "", "")
    assert {p.name: p.read_bytes() for p in data.glob("*.txt")} == before
    assert tab.on_undo(ctx, "chars", "", "", "")["bulk_msg"] == "Nothing to undo."


def test_regex_on_nl_captions_and_a_tag_click_filters(ctx, data):
    (data / "img2_nl.txt").write_text("A girl with red hair.")
    tab.on_open(ctx, "chars")
    out = tab.on_regex(ctx, "chars", "", "", "", "red", "crimson", "nl")
    assert "1 caption changed" in out["bulk_msg"] and (data / "img2_nl.txt").read_text() == "A girl with crimson hair."
    out = tab.on_frequency_tag(ctx, "chars", "", "", "red hair")
    assert out["all_of"] == "red hair" and out["shown"] == ["img0.png"]
    assert "filter: 1 match" in out["gallery_info"]
    out = tab.on_frequency_tag(ctx, "chars", "red hair", "", "smile")
    assert out["all_of"] == "red hair, smile" and out["shown"] == ["img0.png"]
    assert tab.on_filter(ctx, "chars", "red hair, blue hair", "")["shown"] == []


def test_bucket_preview_puts_each_image_in_a_bucket(ctx, data):
    out = tab.on_buckets(ctx, "chars", 512, 256, 1024, 64, False)
    per_image = dict(zip(out["bucket_images"]["image"], out["bucket_images"]["bucket"]))
    assert per_image == {"img0.png": "512x512", "img1.png": "640x384", "img2.png": "384x640"}
    assert out["buckets"]["images"].sum() == 3 and "3 images in 3 buckets at 512px" in out["bucket_msg"]
    with pytest.raises(gr.Error, match="multiple of 8"):
        tab.on_buckets(ctx, "chars", 1024, 256, 2048, 60, False)


# -- presets in the tab --------------------------------------------------------------------------
def test_preset_save_then_load_restores_the_form(ctx):
    values = dict(zip(CAPTION_FIELDS, form(template="anima", trigger="mychar", quality=["best quality"], year="2023",
                                           score="7", exclude="simple background", nl_template="Say {tags}.",
                                           nl_api_key="secret")))
    saved = tab.on_preset_save(ctx, "mine", *values.values())
    path = ctx.settings.workspace / "presets" / "caption" / "mine.toml"
    assert "Saved the preset **mine**" in saved["preset_msg"] and path.is_file()
    assert "secret" not in path.read_text() and "tagger" not in path.read_text(), "sparse, and no API key"
    assert tomllib.loads(path.read_text())["rules"]["score"] == 7
    loaded = tab.on_preset_load(ctx, "mine")
    assert {k: loaded[k] for k in CAPTION_FIELDS if k != "nl_api_key"} == \
        {k: v for k, v in values.items() if k != "nl_api_key"}
    assert "nl_api_key" not in loaded, "loading a preset leaves the key field alone"
    assert tab.on_preset_load(ctx, "anima")["template"] == "anima"
    with pytest.raises(gr.Error, match="shipped"):
        tab.on_preset_save(ctx, "animagine", *values.values())
    with pytest.raises(gr.Error, match="not a quality tag"):
        tab.on_preset_save(ctx, "bad", *dict(values, quality=["great quality"]).values())


def test_a_preset_setting_the_form_cannot_show_is_named(ctx, monkeypatch):
    folder = ctx.settings.workspace / "presets" / "caption"
    folder.mkdir(parents=True)
    (folder / "scored.toml").write_text("[rules]\naesthetic_score = 0.8\n")
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    out = tab.on_preset_load(ctx, "scored")
    assert "rules.aesthetic_score" in out["preset_msg"] and "rules.aesthetic_score" in warnings[0]
    (folder / "wrong.toml").write_text("[rules]\ntemplate = 'sd15'\n")
    with pytest.raises(gr.Error, match="wrong.toml"):
        tab.on_preset_load(ctx, "wrong")


def test_named_outputs_keep_the_order_and_skip_what_a_handler_leaves_out():
    class Fake(tab.CaptionTab):
        pass

    fake = Fake(components={"a": "A", "b": "B"})
    handler, outputs = tab._named_outputs(fake, lambda: {"b": 2}, ("a", "b"))
    first, second = handler()
    assert outputs == ["A", "B"] and second == 2 and isinstance(first, type(gr.skip()))
    bad, _ = tab._named_outputs(fake, lambda: {"c": 1}, ("a",))
    with pytest.raises(KeyError, match="'c'"):
        bad()
