"""torch_compile: the denoiser trains compiled (TorchInductor) with the eager run's losses, and the
run log reports the compile warm-up. Slow: compiling takes minutes on a CPU."""

import pytest

from studio.training.loop import read_events
from studio.training.trainer import train
from tests.train_fixtures import fast_config, make_dataset


@pytest.mark.slow
def test_a_compiled_run_gives_the_eager_losses_and_reports_its_warm_up(tmp_path, demo_models_dir):
    dataset = make_dataset(tmp_path / "data")
    events = {}
    for compiled in (False, True):
        result = train(fast_config(dataset, max_train_steps=3, torch_compile=compiled),
                       run_dir=tmp_path / f"run-{compiled}", models_dir=demo_models_dir, cache_dir=tmp_path / "c")
        assert result.status == "done"
        events[compiled] = read_events(result.run_dir)
    eager, compiled = ([e["loss"] for e in events[k] if e["kind"] == "step"] for k in (False, True))
    assert compiled == pytest.approx(eager, rel=1e-4)
    warm_up = [e for e in events[True] if e["kind"] == "message" and "torch.compile warm-up" in e.get("text", "")]
    assert len(warm_up) == 1 and warm_up[0]["compile_seconds"] > 0
    assert "the next step took" in warm_up[0]["text"]
