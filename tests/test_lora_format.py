"""LoRA files: SGM/kohya names, saving kohya files, and reading what a file is from its header."""

import json
import os
import pickle
import struct
from datetime import datetime, timezone

import pytest

from studio.errors import LoraError, UnsafeCheckpointError
from studio.models import lora_format as lf

# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
_Q = "transformer_blocks.0.attn1.to_q"
SDXL_NAMES = [
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_out", "out.2"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    (f"down_blocks.1.attentions.0.{_Q}", f"input_blocks.4.1.{_Q}"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("down_blocks.2.resnets.1.conv2", "input_blocks.8.0.out_layers.3"),
    (
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
        "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj",
    ),
    ("mid_block.resnets.0.norm1", "middle_block.0.in_layers.0"),
    ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
    ("mid_block.resnets.1.norm2", "middle_block.2.out_layers.0"),
    (
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "output_blocks.0.1.transformer_blocks.0.attn2.to_k",
    ),
    ("up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("up_blocks.2.resnets.2.time_emb_proj", "output_blocks.8.0.emb_layers.1"),
]


@pytest.mark.parametrize(("diffusers_name", "sgm_name"), SDXL_NAMES)
def test_diffusers_to_sgm_known_names(diffusers_name, sgm_name):
    assert lf.diffusers_to_sgm_unet_name(diffusers_name) == sgm_name


@pytest.mark.parametrize(
    "bad",
    [
        "down_blocks.0.resnets.0.weird",
        "down_blocks.0.resnets.2.conv1",  # SDXL down levels have 2 resnets
        "down_blocks.0.downsamplers.1.conv",
        "mid_block.attentions.1.proj_in",
        "up_blocks.0.attentions.0.unknown",
        "encoder.layers.0.self_attn.q_proj",
        "conv_in.weight",
    ],
)
def test_diffusers_to_sgm_refuses_unknown_paths(bad):
    with pytest.raises(LoraError, match="cannot map UNet module"):
        lf.diffusers_to_sgm_unet_name(bad)


def _sdxl_base_unet_on_meta():
    """SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0/unet/config.json)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        )


def test_every_lora_target_of_full_size_sdxl_maps_to_a_unique_sgm_name():
    import torch

    unet = _sdxl_base_unet_on_meta()
    targets = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(targets) > 700  # 10-deep transformers: SDXL has ~790 such layers
    sgm = {name: lf.diffusers_to_sgm_unet_name(name) for name in targets}
    assert len(set(sgm.values())) == len(targets)
    expected = {
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "middle_block.1.transformer_blocks.9.ff.net.2",
        "output_blocks.0.1.transformer_blocks.0.attn2.to_k",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
        "output_blocks.8.0.skip_connection",
        "output_blocks.5.2.conv",
        "input_blocks.0.0",
        "out.2",
        "time_embed.0",
        "label_emb.0.0",
    }
    assert expected <= set(sgm.values())
    # the kohya names stay unique too ("." -> "_" must not merge two modules)
    assert len({lf.kohya_lora_name("lora_unet", n) for n in sgm.values()}) == len(targets)


def test_sgm_names_agree_with_the_demo_checkpoint_converter():
    """Two independent writers of SGM names: the demo's full-checkpoint converter and ours."""
    import torch

    from studio.models.demo import _build_unet
    from studio.models.sgm_convert import SGM_UNET_PREFIX, unet_to_sgm

    unet = _build_unet()
    checked = 0
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            (converted,) = unet_to_sgm({f"{name}.weight": torch.zeros(1)}, unet.config)
            assert converted == f"{SGM_UNET_PREFIX}{lf.diffusers_to_sgm_unet_name(name)}.weight"
            checked += 1
    assert checked > 150


def test_kohya_lora_name():
    assert (
        lf.kohya_lora_name("lora_unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
        == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert lf.kohya_lora_name("lora_te1", "text_model.encoder.layers.0.mlp.fc1") == (
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    )


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def _peft_module(torch, out_features, in_features, rank=4, conv=False, dora=False):
    a = torch.randn(rank, in_features, 1, 1) if conv else torch.randn(rank, in_features)
    b = torch.randn(out_features, rank, 1, 1) if conv else torch.randn(out_features, rank)
    b = b.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous on purpose
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if dora:
        # peft's own shapes: [1, out, 1, 1] for Conv2d, [out] for Linear
        tensors["lora_magnitude_vector"] = torch.rand((1, out_features, 1, 1) if conv else (out_features,))
    return tensors


def _peft_state_dict(torch, modules: dict[str, dict]) -> dict:
    return {f"{module}.{part}": t for module, parts in modules.items() for part, t in parts.items()}


def test_kohya_state_dict_names_alpha_and_dora():
    import torch

    unet = _peft_state_dict(
        torch,
        {
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": _peft_module(torch, 64, 64),
            "down_blocks.0.resnets.0.conv1": _peft_module(torch, 32, 32, conv=True, dora=True),
            "down_blocks.1.attentions.0.proj_in": _peft_module(torch, 64, 64, dora=True),
        },
    )
    te1 = _peft_state_dict(torch, {"encoder.layers.0.self_attn.q_proj": _peft_module(torch, 32, 32)})
    te2 = _peft_state_dict(torch, {"text_model.encoder.layers.1.mlp.fc2": _peft_module(torch, 64, 256)})
    out = lf.kohya_state_dict(unet=unet, text_encoder=te1, text_encoder_2=te2, alpha=8)

    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert set(out) >= {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in out
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in out
    assert len([k for k in out if k.endswith(".alpha")]) == 5
    for key, tensor in out.items():
        assert tensor.is_contiguous(), key
        if key.endswith(".alpha"):
            assert tensor.dim() == 0 and tensor.item() == 8.0  # the real alpha, not the rank (4)
    assert torch.equal(out[f"{q}.lora_up.weight"], unet[
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    ])
    # DoRA magnitudes: LyCORIS/ComfyUI's dora_scale, [out, 1] and [out, 1, 1, 1]
    assert out["lora_unet_input_blocks_4_1_proj_in.dora_scale"].shape == (64, 1)
    assert out["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (32, 1, 1, 1)
    assert torch.equal(
        out["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].flatten(),
        unet["down_blocks.0.resnets.0.conv1.lora_magnitude_vector"].flatten(),
    )
    assert f"{q}.dora_scale" not in out


def test_kohya_state_dict_refuses_what_it_cannot_write():
    import torch

    with pytest.raises(LoraError, match="nothing to save"):
        lf.kohya_state_dict(unet={}, alpha=1)
    with pytest.raises(LoraError, match="unsupported LoRA tensor"):
        lf.kohya_state_dict(unet={"conv_in.lora_embedding_A": torch.zeros(1)}, alpha=1)
    with pytest.raises(LoraError, match="need both lora_A and lora_B"):
        lf.kohya_state_dict(unet={"conv_in.lora_A.weight": torch.zeros(4, 4, 1, 1)}, alpha=1)
    with pytest.raises(LoraError, match="cannot map UNet module"):
        lf.kohya_state_dict(unet=_peft_state_dict(torch, {"conv_norm": _peft_module(torch, 4, 4)}), alpha=1)


def test_save_kohya_lora_writes_atomically_with_string_metadata(tmp_path):
    import torch
    from safetensors import safe_open

    unet = _peft_state_dict(torch, {"conv_in": _peft_module(torch, 32, 4, conv=True)})
    target = tmp_path / "loras" / "my_lora.safetensors"
    metadata = lf.kohya_metadata(output_name="my_lora", network_dim=4, network_alpha=8)
    assert lf.save_kohya_lora(target, unet=unet, alpha=8, metadata=metadata, dtype=torch.float16) == target
    assert os.listdir(target.parent) == ["my_lora.safetensors"]  # no temp file left behind
    with safe_open(str(target), "pt") as fh:
        assert fh.metadata() == metadata
        assert fh.get_tensor("lora_unet_input_blocks_0_0.lora_down.weight").dtype == torch.float16
        assert fh.get_tensor("lora_unet_input_blocks_0_0.alpha").item() == 8.0

    with pytest.raises(LoraError, match="must be strings"):
        lf.save_kohya_lora(tmp_path / "bad.safetensors", unet=unet, alpha=8, metadata={"ss_network_dim": 4})
    assert not (tmp_path / "bad.safetensors").exists()


def test_kohya_metadata_has_what_tools_show():
    meta = lf.kohya_metadata(
        output_name="miku_v1",
        network_dim=16,
        network_alpha=8.0,
        network_args={"conv_dim": 4},
        base_model_name="animagine-xl-3.1",
        learning_rate=1e-4,
        optimizer="AdamW8bit",
        lr_scheduler="cosine",
        max_train_steps=1200,
        steps=1200,
        epoch=10,
        num_epochs=10,
        resolution=(832, 1216),
        tag_frequency={"img/10_miku": {"1girl": 20, "hatsune miku": 20}},
        trigger_words="hatsune miku",
        date=datetime(2025, 3, 1, 12, 30, tzinfo=timezone.utc),
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 4}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_resolution"] == "(832, 1216)"
    assert json.loads(meta["ss_tag_frequency"]) == {"img/10_miku": {"1girl": 20, "hatsune miku": 20}}
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "832x1216"
    assert meta["modelspec.title"] == "miku_v1"
    assert datetime.fromisoformat(meta["modelspec.date"]) == datetime(2025, 3, 1, 12, 30, tzinfo=timezone.utc)
    assert "ss_unet_lr" not in meta  # unset values are left out rather than written as "None"


# ---------------------------------------------------------------------------------------------
# Inspecting
# ---------------------------------------------------------------------------------------------
def _write_header_file(path, shapes: dict[str, tuple], metadata: dict | None = None):
    """A real safetensors file with tiny zero tensors of the given shapes."""
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def _kohya_pair(name, rank=4, fan_in=8, fan_out=8):
    return {
        f"{name}.lora_down.weight": (rank, fan_in),
        f"{name}.lora_up.weight": (fan_out, rank),
        f"{name}.alpha": (),
    }


FAMILY_CASES = {
    "kohya_sdxl": (
        {
            **_kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", rank=8),
            **_kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", rank=8),
        },
        "kohya",
        "sdxl",
        True,
    ),
    "kohya_sdxl_unet_only_attention": (
        {
            **_kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"),
            **_kohya_pair("lora_unet_output_blocks_1_1_proj_in"),
        },
        "kohya",
        "sdxl",
        False,
    ),
    "kohya_sd1": (
        {
            **_kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", fan_in=768),
            **_kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
        },
        "kohya",
        "sd1",
        True,
    ),
    "kohya_sd2": (
        _kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", fan_in=1024),
        "kohya",
        "sd2",
        False,
    ),
    "diffusers_sdxl": (
        {
            "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 8),
            "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (8, 4),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 8),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (8, 4),
        },
        "diffusers",
        "sdxl",
        True,
    ),
    "comfyui_anima": (
        {
            "diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight": (16, 8),
            "diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight": (8, 16),
        },
        "comfyui",
        "anima",
        False,
    ),
    "kohya_flux": (_kohya_pair("lora_unet_double_blocks_0_img_attn_qkv"), "kohya", "flux", False),
    "peft_sdxl": (
        {
            "down_blocks.2.attentions.1.transformer_blocks.5.attn1.to_q.lora_A.weight": (2, 8),
            "down_blocks.2.attentions.1.transformer_blocks.5.attn1.to_q.lora_B.weight": (8, 2),
        },
        "peft",
        "sdxl",
        False,
    ),
    "lycoris_loha": (
        {f"lora_unet_input_blocks_4_1_proj_in.{part}": (8, 4) for part in ("hada_w1_a", "hada_w2_a")},
        "lycoris",
        "unknown",
        False,
    ),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_inspect_lora_format_family_rank(tmp_path, case):
    shapes, fmt, family, has_te = FAMILY_CASES[case]
    info = lf.inspect_lora(_write_header_file(tmp_path / f"{case}.safetensors", shapes))
    assert (info.format, info.family, info.has_text_encoder) == (fmt, family, has_te)
    expected_ranks = {s[0] for k, s in shapes.items() if k.endswith(("lora_down.weight", "lora_A.weight"))}
    assert info.ranks == tuple(sorted(expected_ranks))
    assert info.modules == len([k for k in shapes if k.endswith(("lora_down.weight", "lora_A.weight"))])


def test_inspect_lora_falls_back_to_metadata_for_the_family(tmp_path):
    shapes = _kohya_pair("lora_unet_some_block_0_to_q")  # names that say nothing about the model
    path = _write_header_file(tmp_path / "a.safetensors", shapes, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert lf.inspect_lora(path).family == "sdxl"
    sd1 = {"modelspec.architecture": "stable-diffusion-v1/lora"}
    path = _write_header_file(tmp_path / "b.safetensors", shapes, sd1)
    assert lf.inspect_lora(path).family == "sd1"
    path = _write_header_file(tmp_path / "c.safetensors", shapes)
    info = lf.inspect_lora(path)
    assert (info.family, info.metadata, info.rank) == ("unknown", {}, 4)


def test_inspect_lora_reads_only_the_header(tmp_path, monkeypatch):
    shapes = FAMILY_CASES["kohya_sdxl"][0]
    path = _write_header_file(tmp_path / "x.safetensors", shapes, {"ss_network_dim": "8"})
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("inspect_lora loaded tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    info = lf.inspect_lora(path)
    assert info.metadata == {"ss_network_dim": "8"}


# -- broken files -----------------------------------------------------------------------------
def _valid_bytes(tmp_path) -> bytes:
    path = _write_header_file(tmp_path / "valid.safetensors", FAMILY_CASES["kohya_sdxl"][0])
    return path.read_bytes()


def test_inspect_refuses_a_renamed_torch_zip_checkpoint(tmp_path):
    import torch

    path = tmp_path / "renamed.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))  # zip container: "PK"
    with pytest.raises(LoraError, match="pickle"):
        lf.inspect_lora(path)


def test_inspect_refuses_a_renamed_legacy_pickle(tmp_path):
    path = tmp_path / "legacy.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))  # starts with the \x80 PROTO opcode
    with pytest.raises(LoraError, match="pickle"):
        lf.inspect_lora(path)


def test_inspect_refuses_an_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoraError, match="empty"):
        lf.inspect_lora(path)


@pytest.mark.parametrize("keep", [5, 40])
def test_inspect_refuses_a_truncated_header(tmp_path, keep):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(_valid_bytes(tmp_path)[:keep])
    with pytest.raises(LoraError, match="truncated"):
        lf.inspect_lora(path)


def test_inspect_refuses_truncated_tensor_data(tmp_path):
    data = _valid_bytes(tmp_path)
    path = tmp_path / "cut_data.safetensors"
    path.write_bytes(data[:-10])
    with pytest.raises(LoraError, match="truncated: its tensors need"):
        lf.inspect_lora(path)


def test_inspect_refuses_a_corrupt_header(tmp_path):
    body = b"{not json at all}"
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(LoraError, match="corrupt safetensors header"):
        lf.inspect_lora(path)


def test_a_header_size_starting_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 384 bytes is stored as 80 01 00 ..: the pickle PROTO byte must not fool us."""
    import numpy as np

    name = "lora_unet_input_blocks_4_1_proj_in"
    entries = {
        f"{name}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        f"{name}.lora_up.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]},
    }
    header = json.dumps(entries).encode().ljust(384)
    path = tmp_path / "x80.safetensors"
    path.write_bytes(struct.pack("<Q", 384) + header + np.zeros(4, "<f4").tobytes())
    assert path.read_bytes()[:1] == b"\x80"
    info = lf.inspect_lora(path)
    assert (info.format, info.modules, info.rank) == ("kohya", 1, 1)


def test_inspect_refuses_missing_and_pickle_paths(tmp_path):
    with pytest.raises(LoraError, match="not found"):
        lf.inspect_lora(tmp_path / "nope.safetensors")
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    for suffix in (".ckpt", ".pt", ".bin"):
        with pytest.raises(UnsafeCheckpointError, match="pickle"):
            lf.inspect_lora(ckpt.with_suffix(suffix))


def test_importing_the_lora_modules_does_no_heavy_work():
    import subprocess
    import sys

    code = (
        "import sys, studio.models.lora_format, studio.generation.lora; "
        "print(sorted(m for m in ('torch', 'safetensors', 'diffusers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
