"""studio.paths.Resolver, the one place a path-like value becomes a path: a request's values stay
inside the workspace (or a --model-dir) with one message that says nothing about existence; the
command line's are the owner's, made absolute so a run resumed from elsewhere finds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.errors import ConfigError
from studio.paths import Resolver


@pytest.fixture
def ws(tmp_path):
    ws = tmp_path / "ws"
    (ws / "datasets" / "mine").mkdir(parents=True)
    (ws / "models" / "local-model").mkdir(parents=True)
    (ws / "loras").mkdir()
    (ws / "loras" / "style.safetensors").write_bytes(b"x")
    outside = tmp_path / "outside"
    (outside / "data").mkdir(parents=True)
    (outside / "evil.safetensors").write_bytes(b"x")
    (ws / "datasets" / "linked").symlink_to(outside / "data", target_is_directory=True)
    (ws / "loras" / "linked.safetensors").symlink_to(outside / "evil.safetensors")
    (ws / "models" / "linked").symlink_to(outside, target_is_directory=True)
    return ws


REFUSED = ["../outside/data", "{outside}/data", "{outside}/nothing-here", "/etc", "~/x", "datasets/../../outside/data"]


@pytest.mark.parametrize("value", REFUSED)
def test_a_request_outside_the_workspace_gets_one_message_for_every_kind(ws, value):
    request = Resolver(ws)
    value = value.format(outside=ws.parent / "outside")
    attempts = [lambda: request.folder(value, [ws / "datasets"], "dataset"),
                lambda: request.file(value, [ws / "loras"], "LoRA"),
                lambda: request.model(value, (), "model")]
    for attempt in attempts:
        with pytest.raises(ConfigError) as refused:
            attempt()
        message = str(refused.value)
        assert "is not usable" in message and "nothing outside the workspace is read" in message
        assert "exist" not in message and "no such" not in message.lower()


@pytest.mark.parametrize("value, message", [("n" * 256, "too long for a path"), ("x/" + "n" * 300, "too long"),
                                            ("x/" * 2100, "4096 in all"), ("a\x00b", "NUL character")],
                         ids=["long-name", "long-part", "long-path", "nul"])
@pytest.mark.parametrize("owner", [False, True])
def test_a_value_no_file_system_could_hold_is_named_not_an_os_error(ws, value, message, owner):
    """The OS refuses such names with a bare OSError (or ValueError) from exists() and resolve()."""
    resolver = Resolver.command_line(ws) if owner else Resolver(ws)
    for attempt in (lambda: resolver.folder(value, [ws / "datasets"], "dataset"),
                    lambda: resolver.file(value, [ws / "loras"], "LoRA"),
                    lambda: resolver.model(value, (), "model")):
        with pytest.raises(ConfigError, match=message):
            attempt()
    (ws / "datasets" / ("n" * 255)).mkdir(exist_ok=True)  # the longest name a file system holds is still a name
    assert Resolver(ws).folder("n" * 255, [ws / "datasets"], "dataset").name == "n" * 255


def test_symlinks_out_of_the_workspace_are_refused(ws):
    request = Resolver(ws)
    with pytest.raises(ConfigError, match="dataset 'linked' is not usable"):
        request.folder("linked", [ws / "datasets"], "dataset")
    with pytest.raises(ConfigError, match="LoRA 'linked.safetensors' is not usable"):
        request.file("linked.safetensors", [ws / "loras"], "LoRA")
    assert request.model("models/linked") == "models/linked", "a repo id: the link is never followed"


def test_a_request_inside_the_workspace_resolves_to_absolute_paths(ws):
    request = Resolver(ws)
    assert request.folder("mine", [ws / "datasets"], "dataset") == (ws / "datasets" / "mine").resolve()
    assert request.file("style.safetensors", [ws / "loras"], "LoRA") == str((ws / "loras" / "style.safetensors").resolve())
    assert request.model("models/local-model") == str((ws / "models" / "local-model").resolve())
    assert request.model("someone/some-model") == "someone/some-model"
    assert request.model("demo-sdxl", {"demo-sdxl"}) == "demo-sdxl"
    with pytest.raises(ConfigError, match="there is no dataset folder 'nope'"):
        request.folder("nope", [ws / "datasets"], "dataset")


def test_model_dirs_are_read_for_models_but_never_hold_datasets(ws):
    outside = ws.parent / "outside"
    request = Resolver(ws, (outside,))
    assert request.file(str(outside / "evil.safetensors"), [ws / "loras"], "LoRA") == str(outside / "evil.safetensors")
    assert request.model(str(outside / "data")) == str(outside / "data")
    with pytest.raises(ConfigError, match="is not usable"):
        request.folder(str(outside / "data"), [ws / "datasets"], "dataset")


def test_the_command_line_names_any_path_and_gets_it_absolute(ws, monkeypatch):
    monkeypatch.chdir(ws.parent)
    owner = Resolver.command_line(Path("ws"))
    assert owner.folder("outside/data", [], "dataset") == (ws.parent / "outside" / "data").resolve()
    assert owner.folder("ws/datasets/linked", [], "dataset") == (ws.parent / "outside" / "data").resolve()
    assert owner.model("outside/data") == str((ws.parent / "outside" / "data").resolve()), "a folder here wins"
    assert owner.model("someone/some-model") == "someone/some-model"
    assert owner.model("old.ckpt") == str(ws.parent / "old.ckpt"), "the loader refuses the pickle by name"
    with pytest.raises(ConfigError, match="there is no dataset folder 'nope'"):
        owner.folder("nope", [], "dataset")


def test_the_cli_records_absolute_paths_so_a_resume_from_another_folder_finds_the_data(tmp_path, demo_models_dir,
                                                                                       monkeypatch, capsys):
    from studio.__main__ import main
    from studio.training.loop import read_events
    from studio.training.runs import read_run_config
    from tests.train_fixtures import make_dataset

    make_dataset(tmp_path / "data", count=2)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "models").symlink_to(demo_models_dir, target_is_directory=True)
    (tmp_path / "cfg.toml").write_text(
        'pretrained_model = "demo-sdxl"\nresolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n'
        'network_dim = 4\nmax_train_steps = 2\ntrain_batch_size = 1\nmixed_precision = "no"\n'
        'save_every_n_epochs = 0\nsample_every_n_steps = 0\n\n[[datasets]]\npath = "data"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "cfg.toml", "--output-dir", "run", "--workspace", "ws", "--stop-after", "1"]) == 0
    config = read_run_config(tmp_path / "run")
    assert config.datasets[0].path == str((tmp_path / "data").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "run"), "--workspace", str(tmp_path / "ws")]) == 0
    assert [e["step"] for e in read_events(tmp_path / "run") if e["kind"] == "step"] == [1, 2]
    assert main(["train", "cfg.toml", "--workspace", str(tmp_path / "ws")]) == 2
    assert "cfg.toml" in capsys.readouterr().err


def test_a_run_is_a_folder_of_runs_with_its_config(ws):
    runs = ws / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "config.toml").write_text("")
    (runs / "half").mkdir()  # no config.toml: not a run (a folder a crash left, a stray folder)
    (runs / "out").symlink_to(ws / "datasets" / "mine", target_is_directory=True)
    (ws / "datasets" / "mine" / "config.toml").write_text("")
    request = Resolver(ws)
    assert request.run("mine", runs) == runs / "mine"
    for value, message in (("half", "there is no training run 'half'"), ("", "there is no training run ''"),
                           ("n" * 300, r"n\.\.\.' in"), ("a\x00b", "there is no training run"),
                           ("out", "run 'out' is not usable"), ("../datasets/mine", "is not usable"),
                           (str(runs / "mine"), None)):
        if message is None:  # the Run list's absolute path is a run of runs/ too
            assert request.run(value, runs) == runs / "mine"
            continue
        with pytest.raises(ConfigError, match=message):
            request.run(value, runs)
