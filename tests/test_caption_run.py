"""Captioning a dataset end to end on the demo tagger: captions written under the rules, bad files
reported, existing captions untouched by default, NL captions through an OpenAI-compatible server,
the tagger unloaded afterwards, and the `python -m studio caption` CLI."""

import numpy as np
import pytest
from PIL import Image

from studio.__main__ import main
from studio.captioning.run import CaptionConfig, caption_dataset, raise_if_stopped
from studio.dataset.dataset import Dataset
from studio.errors import DatasetError, JobStopped
from studio.models.devices import DeviceInfo
from studio.models.manager import ModelManager
from tests.fake_openai import ANSWER, FakeServer


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "10_miku"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((80, 64 + 8 * i, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "img5.txt").write_text("hand written, keep me")
    return tmp_path


@pytest.fixture
def manager(tmp_path_factory):
    return ModelManager(tmp_path_factory.mktemp("models"), requested_policy="cpu", device=DeviceInfo("cpu", "CPU"))


def config(dataset, **fields):
    return CaptionConfig(dataset=str(dataset), tagger="demo-tagger", **fields)


def test_captions_follow_the_rules_and_bad_files_are_reported(dataset, manager):
    run = caption_dataset(manager, config(dataset, rules={"trigger": "mikuchar", "quality": ["masterpiece"]}))
    assert run.images == 6 and len(run.tagged) == 5 and run.kept == ["10_miku/img5.png"]
    assert [name for name, _ in run.skipped] == ["broken.png"]
    for i in range(5):
        tags = (dataset / "10_miku" / f"img{i}.txt").read_text().split(", ")
        assert tags[0] == "mikuchar" and "masterpiece" in tags and len(tags) > 3
    assert (dataset / "10_miku" / "img5.txt").read_text() == "hand written, keep me"
    assert manager.records() == [], "the tagger is unloaded when the job ends"


def test_overwrite_only_when_asked_and_undo_restores(dataset, manager):
    caption_dataset(manager, config(dataset))
    before = {p.name: p.read_bytes() for p in (dataset / "10_miku").glob("*.txt")}
    caption_dataset(manager, config(dataset, rules={"trigger": "other"}))  # skip: nothing changes
    assert {p.name: p.read_bytes() for p in (dataset / "10_miku").glob("*.txt")} == before
    caption_dataset(manager, config(dataset, existing="overwrite", rules={"trigger": "other"}))
    assert (dataset / "10_miku" / "img5.txt").read_text().startswith("other, ")
    Dataset.open(dataset).undo_last()
    assert {p.name: p.read_bytes() for p in (dataset / "10_miku").glob("*.txt")} == before


def test_nl_captions_from_an_openai_compatible_server(dataset, manager):
    server = FakeServer()
    try:
        run = caption_dataset(manager, config(dataset, nl={"backend": f"openai:{server.url}#qwen-vl"}))
    finally:
        server.close()
    assert len(run.nl_written) == 6
    assert (dataset / "10_miku" / "img0_nl.txt").read_text() == ANSWER
    prompt = server.requests[0]["body"]["messages"]
    assert server.requests[0]["body"]["model"] == "qwen-vl" and "1girl" in str(prompt)


def test_stop_keeps_what_was_written(dataset, manager):
    import threading

    stop = threading.Event()
    stop.set()
    run = caption_dataset(manager, config(dataset, batch_size=1), stop=stop)
    assert run.stopped and len(run.tagged) < 5
    with pytest.raises(JobStopped):
        raise_if_stopped(run)


def test_empty_dataset_is_a_clear_error(tmp_path, manager):
    with pytest.raises(DatasetError, match="no usable images"):
        caption_dataset(manager, config(tmp_path))


def test_cli_captions_and_reports_skips(dataset, tmp_path, capsys):
    code = main(["caption", str(dataset), "--tagger", "demo-tagger", "--trigger", "tr", "--workspace",
                 str(tmp_path / "ws"), "--vram", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "5 tagged" in out and "skipped broken.png" in out
    assert (dataset / "10_miku" / "img0.txt").read_text().startswith("tr, ")


def test_cli_exit_codes(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "missing"), "--tagger", "demo-tagger"]) == 2
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "a.png").write_text("nope")
    assert main(["caption", str(only_broken), "--tagger", "demo-tagger", "--workspace", str(tmp_path / "ws")]) == 1
    assert "no usable images" in capsys.readouterr().err
