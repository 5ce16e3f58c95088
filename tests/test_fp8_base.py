"""fp8_base (kohya's name): the frozen denoiser is stored in float8 and cast up layer by layer as it
runs; the network stays fp32, trains, and its loss follows the full-precision run's."""

import pytest

from studio.training.loop import read_events
from studio.training.trainer import train
from tests.train_fixtures import fast_config, make_dataset


def losses(run_dir):
    return [e["loss"] for e in read_events(run_dir) if e["kind"] == "step"]


@pytest.mark.parametrize("model", ["demo-sdxl", "demo-anima"])
def test_fp8_base_stores_the_denoiser_in_float8_and_trains_alike(model, tmp_path, demo_models_dir, monkeypatch):
    import torch

    from studio.training import network

    seen = {}
    finish = network.finish_network

    def spy(groups, denoiser, *args, **kwargs):
        result = finish(groups, denoiser, *args, **kwargs)
        seen["dtypes"] = {p.dtype for name, p in denoiser.named_parameters() if "lora_" not in name}
        seen["network"] = {p.dtype for group in groups for p in group["params"]}
        return result

    monkeypatch.setattr(network, "finish_network", spy)
    for module in ("studio.training.sdxl", "studio.training.anima"):
        monkeypatch.setattr(f"{module}.finish_network", spy)
    dataset = make_dataset(tmp_path / "data")
    runs = {}
    for fp8 in (False, True):
        config = fast_config(dataset, pretrained_model=model, max_train_steps=2, fp8_base=fp8)
        result = train(config, run_dir=tmp_path / f"run-{fp8}", models_dir=demo_models_dir, cache_dir=tmp_path / "c")
        assert result.status == "done"
        runs[fp8] = (losses(result.run_dir), dict(seen))
    plain, (fp8_losses, fp8_seen) = runs[False][0], runs[True]
    assert torch.float8_e4m3fn in fp8_seen["dtypes"], "the base weights are stored in float8"
    assert torch.float8_e4m3fn not in runs[False][1]["dtypes"]
    assert fp8_seen["network"] == {torch.float32}
    assert all(abs(a - b) <= 0.1 * abs(a) + 0.02 for a, b in zip(plain, fp8_losses)), (plain, fp8_losses)
    assert plain != fp8_losses, "the float8 weights are really used"


def test_fp8_base_with_gradient_checkpointing_trains_as_without(tmp_path, demo_models_dir):
    """Checkpointing recomputes each block from float8-stored weights: the same losses (so the same
    gradients reached the network) as the run that keeps its activations."""
    dataset = make_dataset(tmp_path / "data")
    runs = []
    for checkpointing in (False, True):
        config = fast_config(dataset, max_train_steps=3, fp8_base=True, gradient_checkpointing=checkpointing,
                             train_batch_size=1)  # batch 1 once met a float8 weight in the backward pass
        result = train(config, run_dir=tmp_path / f"run-{checkpointing}", models_dir=demo_models_dir,
                       cache_dir=tmp_path / "c")
        assert result.status == "done", result.message
        runs.append(losses(result.run_dir))
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
