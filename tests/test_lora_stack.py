"""The LoRA stack on the tiny demo SDXL: files load exactly, weights and stacks change the image,
removing everything restores the base image bit for bit, and bad files fail with clear errors.

Reference LoRAs are trained-like peft adapters (random non-zero lora_B) on a second copy of the
demo pipeline; the files written from them must reproduce that in-memory model's output.
"""

import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from studio.errors import LoraError, UnsafeCheckpointError
from studio.models import lora_format as lf
from studio.schemas import LoraSpec
from tests.lora_fixtures import add_random_lora

PROMPT = "1girl, solo, hatsune miku, smile"
NEGATIVE = "lowres, worst quality"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out",
                "linear_1", "linear_2"]  # fmt: skip
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def generate(pipe, seed: int = 0) -> np.ndarray:
    import torch

    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """LoRA files A (kohya, UNet + both text encoders), B (diffusers format, UNet + CLIP-L) and
    D (kohya DoRA, UNet), each with the image its in-memory peft model produces."""
    from diffusers import StableDiffusionXLPipeline

    from studio.models.demo import build_demo_sdxl_pipeline

    folder = tmp_path_factory.mktemp("loras")
    base = generate(build_demo_sdxl_pipeline(0))

    # A: kohya, rank 4, lora_alpha 8 (!= rank, so a wrong alpha shows), every Linear/Conv target
    trainer = build_demo_sdxl_pipeline(0)
    sds = add_random_lora(
        trainer,
        {
            "unet": {"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS},
            "text_encoder": {"r": 4, "lora_alpha": 8, "target_modules": CLIP_TARGETS},
            "text_encoder_2": {"r": 4, "lora_alpha": 8, "target_modules": CLIP_TARGETS},
        },
        seed=1,
    )
    ref_a = generate(trainer)
    meta = lf.kohya_metadata(output_name="lora_a", network_dim=4, network_alpha=8)
    a = lf.save_kohya_lora(folder / "lora_a.safetensors", **sds, alpha=8, metadata=meta)

    # B: diffusers' own format, rank 2, lora_alpha 6, attention only, with its adapter metadata
    trainer = build_demo_sdxl_pipeline(0)
    sds = add_random_lora(
        trainer,
        {
            "unet": {"r": 2, "lora_alpha": 6, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
            "text_encoder": {"r": 2, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"]},
        },
        seed=2,
        b_std=0.05,
    )
    ref_b = generate(trainer)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=sds["unet"],
        text_encoder_lora_layers=sds["text_encoder"],
        unet_lora_adapter_metadata=trainer.unet.peft_config["trained"].to_dict(),
        text_encoder_lora_adapter_metadata=trainer.text_encoder.peft_config["trained"].to_dict(),
        weight_name="lora_b.safetensors",
    )

    # D: kohya with DoRA magnitudes (dora_scale), rank 4, lora_alpha 4
    trainer = build_demo_sdxl_pipeline(0)
    sds = add_random_lora(
        trainer,
        {"unet": {"r": 4, "lora_alpha": 4, "use_dora": True, "target_modules": ["to_q", "proj_in", "conv1"]}},
        seed=3,
    )
    ref_d = generate(trainer)
    d = lf.save_kohya_lora(folder / "lora_d.safetensors", unet=sds["unet"], alpha=4)

    b = folder / "lora_b.safetensors"
    return SimpleNamespace(base=base, a=a, ref_a=ref_a, b=b, ref_b=ref_b, d=d, ref_d=ref_d)


@pytest.fixture(scope="module")
def module_stack():
    from studio.generation.lora import LoraStack
    from studio.models.demo import build_demo_sdxl_pipeline

    return LoraStack(build_demo_sdxl_pipeline(0), family="sdxl")


@pytest.fixture
def stack(module_stack):
    module_stack.apply([])
    return module_stack


def specs(*pairs):
    return [LoraSpec(path=str(path), weight=weight) for path, weight in pairs]


def assert_differs(x, y, at_least=1e-3):
    assert np.abs(x - y).max() > at_least


def lora_layer_count(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        isinstance(m, BaseTunerLayer)
        for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for m in component.modules()
    )


# ---------------------------------------------------------------------------------------------
# What the fixture files are
# ---------------------------------------------------------------------------------------------
def _summary(info):
    return info.format, info.family, info.ranks, info.has_text_encoder, info.has_dora


def test_inspect_fixture_files(fixtures):
    a = lf.inspect_lora(fixtures.a)
    assert _summary(a) == ("kohya", "sdxl", (4,), True, False)
    assert a.modules == 183 + 12 + 18  # every UNet Linear/Conv, 2 and 3 CLIP layers x 6 projections
    assert a.metadata["ss_network_alpha"] == "8"
    b = lf.inspect_lora(fixtures.b)
    assert _summary(b) == ("diffusers", "sdxl", (2,), True, False)
    d = lf.inspect_lora(fixtures.d)
    assert _summary(d) == ("kohya", "sdxl", (4,), False, True)


def test_base_images_of_the_two_pipelines_match(fixtures, stack):
    assert np.array_equal(generate(stack.pipe), fixtures.base)


# ---------------------------------------------------------------------------------------------
# Loading and stacking
# ---------------------------------------------------------------------------------------------
def test_kohya_file_reproduces_the_in_memory_peft_model(fixtures, stack):
    assert stack.apply(specs((fixtures.a, 1.0))) == []
    image = generate(stack.pipe)
    assert_differs(image, fixtures.base)
    np.testing.assert_allclose(image, fixtures.ref_a, atol=1e-4)  # SGM names and alpha/rank are right


def test_diffusers_file_reproduces_the_in_memory_peft_model(fixtures, stack):
    assert stack.apply(specs((fixtures.b, 1.0))) == []
    image = generate(stack.pipe)
    assert_differs(image, fixtures.base)
    np.testing.assert_allclose(image, fixtures.ref_b, atol=1e-4)


def test_kohya_dora_file_keeps_its_magnitudes(fixtures, stack):
    """diffusers alone drops `dora_scale` from kohya files; the stack must not."""
    assert stack.apply(specs((fixtures.d, 1.0))) == []
    image = generate(stack.pipe)
    assert_differs(image, fixtures.base)
    np.testing.assert_allclose(image, fixtures.ref_d, atol=1e-4)


def test_a_per_input_dora_scale_is_told_apart_from_a_per_output_one():
    """LyCORIS wd_on_output=False writes dora_scale as [1, in]: on a square layer, reading it as
    per-output would apply another model silently; the axis that is 1 tells them apart."""
    import torch

    from studio.generation.lora import dora_per_input

    up, down = torch.zeros(64, 4), torch.zeros(4, 64)
    assert not dora_per_input(torch.ones(64, 1), up, down)
    assert dora_per_input(torch.ones(1, 64), up, down), "square: told by the axis, not the size"
    assert dora_per_input(torch.ones(1, 32), torch.zeros(64, 4), torch.zeros(4, 32))
    assert dora_per_input(torch.ones(1, 32, 1, 1), torch.zeros(64, 4, 1, 1), torch.zeros(4, 32, 3, 3))
    assert not dora_per_input(torch.ones(64, 1, 1, 1), torch.zeros(64, 4, 1, 1), torch.zeros(4, 32, 3, 3))


def _per_input_dora_file(fixtures, tmp_path):
    """Fixture D's layers with per-input magnitudes ([1, in(, 1, 1)]: each merged column's norm
    times 0.7-1.3), and the base weights patched as LyCORIS applies such a file
    (W' = W + s * (m * merged / ||merged column|| - W), merged = W + alpha/rank * up @ down)."""
    import torch
    from safetensors.torch import load_file, save_file

    from studio.generation.lora import _kohya_module_names
    from studio.models.demo import build_demo_sdxl_pipeline

    tensors = load_file(str(fixtures.d))
    reference = build_demo_sdxl_pipeline(0)
    targets = _kohya_module_names(reference)
    generator = torch.Generator().manual_seed(5)
    per_input, patches = dict(tensors), []
    for key in [k for k in tensors if k.endswith(".dora_scale")]:
        name = key.removesuffix(".dora_scale")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        component, module_path = targets[name]
        weight = getattr(reference, component).get_submodule(module_path).weight
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
        merged = weight.detach() + alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        dims = [0, *range(2, weight.dim())]  # everything but the input axis
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
        magnitude = norm * (0.7 + 0.6 * torch.rand(norm.shape, generator=generator))
        per_input[key] = magnitude.contiguous()
        patches.append((weight, merged * magnitude / norm))
    path = tmp_path / "per_input_dora.safetensors"
    save_file(per_input, str(path))
    return path, reference, patches


def test_a_per_input_dora_file_is_applied_exactly(fixtures, stack, tmp_path):
    """A per-input DoRA (LyCORIS wd_on_output=False) gives the image of the base model patched by
    LyCORIS' formula, at weight 1 and 0.5 (strength scales the change linearly, as in ComfyUI)."""
    import torch

    path, reference, patches = _per_input_dora_file(fixtures, tmp_path)
    assert any(w.shape[0] == w.shape[1] for w, _ in patches), "a square layer is among them"
    assert any(w.dim() == 4 for w, _ in patches), "and a convolution"
    originals = [w.detach().clone() for w, _ in patches]
    for strength in (1.0, 0.5):
        with torch.no_grad():
            for (weight, patched), original in zip(patches, originals):
                weight.copy_(original + strength * (patched - original))
        expected = generate(reference)
        assert stack.apply(specs((path, strength))) == []
        image = generate(stack.pipe)
        assert_differs(image, fixtures.base)
        assert_differs(image, fixtures.ref_d)  # not read as per-output
        np.testing.assert_allclose(image, expected, atol=1e-4)
    stack.apply([])
    assert np.array_equal(generate(stack.pipe), fixtures.base), "removing it restores the base model"


def test_a_dora_file_mixing_both_axes_is_refused(fixtures, stack, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _ = _per_input_dora_file(fixtures, tmp_path)
    tensors = load_file(str(path))
    original = load_file(str(fixtures.d))
    first = next(k for k in tensors if k.endswith(".dora_scale"))
    tensors[first] = original[first]
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match="mixes per-output .* and per-input"):
        stack.apply(specs((path, 1.0)))
    assert np.array_equal(generate(stack.pipe), fixtures.base), "nothing was left applied"


def test_weight_changes_the_image(fixtures, stack):
    stack.apply(specs((fixtures.a, 1.0)))
    full = generate(stack.pipe)
    stack.apply(specs((fixtures.a, 0.5)))
    half = generate(stack.pipe)
    assert_differs(half, full)
    assert_differs(half, fixtures.base)
    stack.apply(specs((fixtures.a, 0.0)))
    assert np.array_equal(generate(stack.pipe), fixtures.base)


def test_two_loras_stack(fixtures, stack):
    stack.apply(specs((fixtures.a, 1.0), (fixtures.b, 1.0)))
    both = generate(stack.pipe)
    assert_differs(both, fixtures.ref_a)
    assert_differs(both, fixtures.ref_b)
    assert [(x.name, x.weight) for x in stack.applied()] == [("lora_a", 1.0), ("lora_b", 1.0)]


def test_removing_all_restores_the_base_image_exactly(fixtures, stack):
    stack.apply(specs((fixtures.a, 0.8), (fixtures.b, 1.0), (fixtures.d, 0.7)))
    assert lora_layer_count(stack.pipe) > 0
    stack.apply([])
    assert lora_layer_count(stack.pipe) == 0
    assert stack.applied() == []
    assert np.array_equal(generate(stack.pipe), fixtures.base)


def test_switching_a_to_b_equals_loading_b_fresh(fixtures, stack):
    stack.apply(specs((fixtures.b, 0.9)))
    fresh = generate(stack.pipe)
    stack.apply([])
    stack.apply(specs((fixtures.a, 1.0)))
    stack.apply(specs((fixtures.b, 0.9)))
    assert np.array_equal(generate(stack.pipe), fresh)
    assert set(stack.pipe.get_list_adapters()["unet"]) == {stack.applied()[0].adapter_name}


def test_each_file_is_loaded_once(fixtures, stack, monkeypatch):
    stack.apply(specs((fixtures.a, 1.0)))
    calls = []
    original = stack.pipe.load_lora_weights
    monkeypatch.setattr(stack.pipe, "load_lora_weights", lambda *a, **k: calls.append(a) or original(*a, **k))
    stack.apply(specs((fixtures.a, 0.5)))
    stack.apply(specs((fixtures.a, 0.7), (fixtures.b, 1.0)))
    assert len(calls) == 1  # only B was new


def test_an_edited_file_is_reloaded(fixtures, stack, tmp_path):
    path = tmp_path / "evolving.safetensors"
    shutil.copyfile(fixtures.a, path)
    stack.apply(specs((path, 1.0)))
    np.testing.assert_allclose(generate(stack.pipe), fixtures.ref_a, atol=1e-4)
    shutil.copyfile(fixtures.b, path)  # a new epoch saved under the same name
    stack.apply(specs((path, 1.0)))
    np.testing.assert_allclose(generate(stack.pipe), fixtures.ref_b, atol=1e-4)
    assert len(stack.pipe.get_list_adapters()["unet"]) == 1


def test_a_file_rewritten_in_place_does_not_crash_generation(fixtures, tmp_path):
    """safetensors memory-maps LoRA files; the stack must not keep using the mapping. Run in a
    subprocess: the failure mode is a SIGBUS that would take pytest down with it."""
    import subprocess
    import sys

    path = tmp_path / "in_place.safetensors"
    shutil.copyfile(fixtures.a, path)
    code = f"""
import numpy as np
from studio.generation.lora import LoraStack
from studio.models.demo import build_demo_sdxl_pipeline
from studio.schemas import LoraSpec
from tests.lora_fixtures import add_random_lora
from test_lora_stack import generate
pipe = build_demo_sdxl_pipeline(0)
stack = LoraStack(pipe)
stack.apply([LoraSpec(path={str(path)!r})])
before = generate(pipe)
with open({str(path)!r}, "r+b") as fh:  # same inode, new (short) content
    fh.truncate(0)
    fh.write(b"rewritten")
assert np.array_equal(generate(pipe), before)
print("ok")
"""
    env_path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_applied_reports_infotext_hashes(fixtures, stack):
    from studio.generation.infotext import lora_hash

    stack.apply(specs((fixtures.a, 0.6), (fixtures.b, 1.0)))
    applied = stack.applied()
    assert [(x.name, x.weight, x.path) for x in applied] == [
        ("lora_a", 0.6, fixtures.a),
        ("lora_b", 1.0, fixtures.b),
    ]
    assert applied[0].lora_hash == applied[0].hash == lora_hash(fixtures.a)
    assert len(applied[0].lora_hash) == 12 and applied[0].lora_hash != applied[1].lora_hash


# ---------------------------------------------------------------------------------------------
# Files that must be refused or flagged
# ---------------------------------------------------------------------------------------------
def _rewrite(src, dst, rename=None, extra=None, zero_up=False, metadata=None):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    if zero_up:
        tensors = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in tensors.items()}
    tensors.update(extra or {})
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def _rename_modules(key: str) -> str:
    """Module names no SDXL has (what a LoRA for a different UNet, or a buggy exporter, gives)."""
    for old, new in (("input_blocks", "entry_blocks"), ("output_blocks", "exit_blocks"),
                     ("middle_block", "centre_block"), ("text_model", "txt"), ("label_emb", "lbl"),
                     ("time_embed", "tembed"), ("lora_unet_out_2", "lora_unet_final_2")):  # fmt: skip
        key = key.replace(old, new)
    return key


def test_a_file_matching_no_layer_is_refused_and_the_stack_kept(fixtures, stack, tmp_path):
    renamed = _rewrite(
        fixtures.a,
        tmp_path / "renamed.safetensors",
        rename=_rename_modules,
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    assert lf.inspect_lora(renamed).family == "sdxl"  # passes the family check: only loading can tell
    stack.apply(specs((fixtures.b, 1.0)))
    before = generate(stack.pipe)
    no_match = "renamed.safetensors matches none of this model's layers; it changes nothing"
    with pytest.raises(LoraError, match=no_match):
        stack.apply(specs((fixtures.b, 1.0), (fixtures.a, 1.0), (renamed, 1.0)))
    # A loaded fine before the failure: it is rolled back, B stays as it was
    assert np.array_equal(generate(stack.pipe), before)
    assert [x.name for x in stack.applied()] == ["lora_b"]
    assert len(stack.pipe.get_list_adapters()["unet"]) == 1


def test_a_partly_matching_file_loads_with_a_warning(fixtures, stack, tmp_path):
    import torch

    extra = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_q.lora_down.weight": torch.randn(4, 64),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_q.lora_up.weight": torch.randn(64, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_q.alpha": torch.tensor(8.0),
    }
    partial = _rewrite(fixtures.a, tmp_path / "partial.safetensors", extra=extra)
    warnings = stack.apply(specs((partial, 1.0)))
    assert len(warnings) == 1 and "partial.safetensors: only 213 of its 214 layers" in warnings[0]
    np.testing.assert_allclose(generate(stack.pipe), fixtures.ref_a, atol=1e-4)  # the rest still applies


def test_an_all_zero_lora_is_flagged(fixtures, stack, tmp_path):
    zero = _rewrite(fixtures.a, tmp_path / "untrained.safetensors", zero_up=True)
    warnings = stack.apply(specs((zero, 1.0)))
    assert len(warnings) == 1 and "all its up weights are zero" in warnings[0]
    assert np.array_equal(generate(stack.pipe), fixtures.base)


def test_an_sd15_lora_is_refused_naming_its_family(stack, tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, fan_in in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768),
    ):
        tensors |= {
            f"{name}.lora_down.weight": torch.randn(4, fan_in),
            f"{name}.lora_up.weight": torch.randn(320, 4),
            f"{name}.alpha": torch.tensor(4.0),
        }
    path = tmp_path / "sd15_style.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=r"Stable Diffusion 1\.x LoRA, but this model is SDXL"):
        stack.apply(specs((path, 1.0)))


def test_an_anima_lora_is_refused_naming_its_family(stack, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "anima_style.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
            "diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
        },
        str(path),
    )
    with pytest.raises(LoraError, match="is an Anima LoRA, but this model is SDXL"):
        stack.apply(specs((path, 1.0)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(pickle.dumps({"w": 1}, protocol=2)), "pickle"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a"), "truncated"),
    ],
    ids=["pickle", "empty", "truncated-header"],
)
def test_broken_files_are_refused(fixtures, stack, tmp_path, make, message):
    path = tmp_path / "broken.safetensors"
    make(path)
    with pytest.raises(LoraError, match=message):
        stack.apply(specs((path, 1.0)))


def test_a_truncated_download_is_refused(fixtures, stack, tmp_path):
    path = tmp_path / "half.safetensors"
    data = fixtures.a.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match="truncated"):
        stack.apply(specs((path, 1.0)))


def test_missing_and_pickle_paths(stack, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(LoraError, match=f"LoRA file not found: {missing}"):
        stack.apply(specs((missing, 1.0)))
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        stack.apply(specs((ckpt, 1.0)))


def test_the_same_file_twice_is_refused(fixtures, stack):
    with pytest.raises(LoraError, match="twice"):
        stack.apply(specs((fixtures.a, 1.0), (fixtures.a, 0.5)))
