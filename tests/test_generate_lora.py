"""LoRAs through generate() and the comparison grid on demo-sdxl: the image changes, the infotext
names the LoRA with its hash, removing it restores the base, and grids are labelled."""

import numpy as np
import pytest
from PIL import Image

from studio.errors import LoraError
from studio.generation.generate import generate
from studio.generation.grid import axis_labels, compose_grid, run_grid
from studio.generation.infotext import lora_hash, parse_infotext, parse_lora_hashes, read_infotext
from studio.generation.lora import import_lora_file
from studio.schemas import GenerateConfig, GridAxis, GridConfig, LoraSpec
from tests.lora_fixtures import write_demo_kohya_lora

SMALL = {"prompt": "1girl, solo", "width": 64, "height": 64, "steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return [write_demo_kohya_lora(folder / f"epoch-{n}.safetensors", seed=n) for n in (1, 2)]


def image(manager, tmp_path, loras=()):
    config = GenerateConfig(**SMALL, loras=[LoraSpec(path=str(p), weight=w) for p, w in loras])
    result = generate(manager, config, outputs_dir=tmp_path, default_model="demo-sdxl")
    return np.asarray(Image.open(result.images[0].path), dtype=np.int16), result


def test_lora_changes_the_image_is_recorded_and_removal_restores_the_base(demo_manager, loras, tmp_path):
    base, _ = image(demo_manager, tmp_path)
    with_lora, result = image(demo_manager, tmp_path, [(loras[0], 1.0)])
    assert np.abs(with_lora - base).max() > 10
    prompt, _, params = parse_infotext(result.images[0].infotext)
    assert parse_lora_hashes(params["Lora hashes"]) == {"epoch-1": lora_hash(loras[0])}
    assert prompt.endswith(", <lora:epoch-1:1>"), "the LoRA and its weight in the prompt, as A1111 writes them"
    half, _ = image(demo_manager, tmp_path, [(loras[0], 0.5)])
    assert np.abs(half - with_lora).max() > 0 and np.abs(half - base).max() > 0
    again, result = image(demo_manager, tmp_path)
    assert np.array_equal(again, base), "removing every LoRA must restore the base exactly"
    assert "Lora hashes" not in parse_infotext(result.images[0].infotext)[2]


def test_a_lora_for_another_family_is_refused_and_generation_still_works(demo_manager, tmp_path):
    import torch
    from safetensors.torch import save_file

    sd15 = tmp_path / "sd15.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, sd15)
    with pytest.raises(LoraError, match="1.x"):
        image(demo_manager, tmp_path, [(sd15, 1.0)])
    assert image(demo_manager, tmp_path)[1].images


def test_grid_over_lora_files_and_weights(demo_manager, loras, tmp_path):
    base = GenerateConfig(**SMALL)
    grid = GridConfig(base=base, x=GridAxis(kind="lora", values=[str(p) for p in loras]),
                      y=GridAxis(kind="lora_weight", values=[0.5, 1.0]))
    result = run_grid(demo_manager, grid, outputs_dir=tmp_path, default_model="demo-sdxl")
    picture = Image.open(result.path)
    assert picture.width > 2 * 64 and picture.height > 2 * 64  # cells plus label margins
    cells = [[np.asarray(Image.open(c.images[0].path), dtype=np.int16) for c in row] for row in result.cells]
    assert len(cells) == 2 and len(cells[0]) == 2
    assert np.abs(cells[0][0] - cells[0][1]).max() > 0 and np.abs(cells[0][0] - cells[1][0]).max() > 0
    seeds = {c.images[0].seed for row in result.cells for c in row}
    assert seeds == {11}, "every cell uses the same seed"
    hashes = [parse_lora_hashes(parse_infotext(c.images[0].infotext)[2]["Lora hashes"]) for c in result.cells[1]]
    assert hashes == [{"epoch-1": lora_hash(loras[0])}, {"epoch-2": lora_hash(loras[1])}]
    params = parse_infotext(read_infotext(result.path))[2]
    assert (params["Script"], params["X Type"], params["Y Type"]) == ("X/Y/Z plot", "LoRA file", "LoRA weight")
    assert params["X Values"] == "epoch-1.safetensors, epoch-2.safetensors" and params["Y Values"] == "0.5, 1.0"


@pytest.mark.parametrize("stems, labels", [
    (["mychar-20261204-101500-mychar-step00000010", "mychar-20261204-101500-mychar-step00000020",
      "mychar-20261204-101500-mychar (1)"], ["step 10", "step 20", "final"]),
    (["char-000002", "char-000004", "char"], ["epoch 2", "epoch 4", "final"]),
    (["my-style-v1", "my-style-v2"], ["v1", "v2"]),
    (["styleA", "styleB"], ["styleA", "styleB"]),
])
def test_checkpoint_columns_get_short_labels(stems, labels):
    axis = GridAxis(kind="lora", values=[f"/ws/loras/{stem}.safetensors" for stem in stems])
    assert axis_labels(axis) == labels
    assert axis_labels(GridAxis(kind="lora_weight", values=[0.5, 1.0])) == ["weight 0.5", "weight 1.0"]


def test_long_column_labels_wrap_inside_their_column():
    """A label wider than its 64-pixel cell wraps onto more lines: no ink crosses into the next column."""
    cells = [[Image.new("RGB", (64, 64), "gray") for _ in range(3)]]
    label = "a-very-long-checkpoint-name-that-is-wider-than-a-cell"
    picture = np.asarray(compose_grid(cells, [label, label, label], [""]).convert("L"))
    top = picture.shape[0] - 64
    assert top > 2 * 16, "the label takes more than one line"
    ink = picture[:top] < 128
    for boundary in (64, 128):
        assert not ink[:, boundary - 2:boundary + 2].any(), "a label runs over its column's edge"


def test_imported_loras_never_overwrite(loras, tmp_path):
    first = import_lora_file(loras[0], tmp_path)
    second = import_lora_file(loras[0], tmp_path)
    assert first.name == "epoch-1.safetensors" and second.name == "epoch-1 (1).safetensors"
    assert first.read_bytes() == second.read_bytes() == loras[0].read_bytes()
    text = tmp_path / "notes.safetensors"
    text.write_text("not a lora")
    with pytest.raises(LoraError):
        import_lora_file(text, tmp_path / "in")
    assert not (tmp_path / "in" / "notes.safetensors").exists()
