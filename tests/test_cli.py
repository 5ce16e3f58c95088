"""`python -m studio generate`: PNGs with infotext, paths printed, specific errors, exit codes."""

import pytest

from studio.__main__ import main, parse_lora_arg
from studio.generation.infotext import parse_infotext, read_infotext


@pytest.fixture
def workspace(tmp_path, demo_models_dir):
    (tmp_path / "models").symlink_to(demo_models_dir, target_is_directory=True)
    return tmp_path


def cli(workspace, *args):
    return main(["generate", "--model", "demo-sdxl", "--workspace", str(workspace), "--width", "64", "--height", "64",
                 "--steps", "2", *args])


def test_writes_pngs_with_infotext_and_prints_their_paths(workspace, capsys):
    out = workspace / "out"
    assert cli(workspace, "--prompt", "1girl, solo", "--seed", "42", "--batch-size", "2", "--cfg", "4.5",
               "--sampler", "DPM++ 2M Karras", "--rating", "safe", "--out", str(out)) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2 and all(p.startswith(str(out)) for p in paths)
    prompt, _, params = parse_infotext(read_infotext(paths[1]))
    assert prompt.startswith("1girl, solo, safe")
    assert (params["Seed"], params["CFG scale"], params["Sampler"], params["Schedule type"]) == ("43", "4.5", "DPM++ 2M", "Karras")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--prompt", "x", "--width", "100"], 2, "multiple of 8"),
        (["--prompt", "x", "--steps", "0"], 2, "steps"),
        (["--prompt", "x", "--steps", "-3"], 2, "steps"),
        (["--prompt", "x", "--sampler", "Heun++"], 2, "unknown sampler"),
        (["--prompt", "x", "--lora", "nowhere.safetensors:0.5"], 1, "LoRA file not found"),
        (["--prompt", "x", "--model", "old.ckpt"], 1, "pickle"),
        (["--prompt", "x", "--model", "nobody/no-such-model"], 1, "offline"),
    ],
)
def test_bad_input_exits_non_zero_with_a_specific_message(workspace, capsys, args, code, message):
    assert cli(workspace, *args) == code
    assert message in capsys.readouterr().err


def test_missing_prompt_is_an_argument_error(workspace):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--workspace", str(workspace)])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "value, expected",
    [("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.6", ("a.safetensors", 0.6)),
     ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)), ("x:-1.5", ("x", -1.5))],
)
def test_lora_argument(value, expected):
    parsed = parse_lora_arg(value)
    assert (parsed["path"], parsed["weight"]) == expected
