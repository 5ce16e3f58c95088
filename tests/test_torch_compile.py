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


def test_a_server_strangers_reach_refuses_torch_compile(tmp_path):
    """Compiling holds the GPU lane for minutes where Stop cannot reach: refused behind a share
    link or a public address, allowed on the owner's local app."""
    from studio.context import AppContext
    from studio.errors import ConfigError
    from studio.settings import Settings
    from studio.ui.train_tab import config_models_inside

    make_dataset(tmp_path / "ws" / "datasets" / "mine")
    config = fast_config(tmp_path / "ws" / "datasets" / "mine", torch_compile=True)
    for public in (Settings(workspace=tmp_path / "ws", demo=True, share=True),
                   Settings(workspace=tmp_path / "ws", demo=True, host="0.0.0.0")):
        with pytest.raises(ConfigError, match="torch_compile is for a machine you own"):
            config_models_inside(AppContext.create(public), config)
    local = AppContext.create(Settings(workspace=tmp_path / "ws", demo=True))
    assert config_models_inside(local, config).torch_compile
