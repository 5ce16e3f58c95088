"""Model manager bookkeeping and VRAM policy, with fake pipelines standing in for real ones so
the GPU paths (eviction, offload hooks, demotion) are exercised on a CPU-only machine."""

import threading

import pytest

from studio.errors import BusyError, ModelNotFoundError, UnsafeCheckpointError
from studio.models.catalog import CatalogEntry, resolve_reference
from studio.models.devices import DeviceInfo
from studio.models.loaders import LoadedModel
from studio.models.manager import ModelManager
from studio.models.vram import VramPolicy, choose_policy

GiB = 1024**3
CATALOG = {
    "big": CatalogEntry("big", "big model", "sdxl", "org/big"),
    "small": CatalogEntry("small", "small model", "sdxl", "org/small"),
    "demo-sdxl": CatalogEntry("demo-sdxl", "demo", "sdxl", "demo:sdxl", demo=True),
}
SIZES = {"org/big": (8 * GiB, 5 * GiB), "org/big2": (8 * GiB, 5 * GiB), "org/small": (3 * GiB, 2 * GiB)}


class FakeVae:
    use_tiling = False

    def enable_tiling(self):
        self.use_tiling = True

    def enable_slicing(self):
        pass


class FakePipe:
    def __init__(self):
        self.calls = []
        self.vae = FakeVae()

    def to(self, device):
        self.calls.append(("to", str(device)))
        return self

    def enable_model_cpu_offload(self, device=None):
        self.calls.append(("model_offload", device))

    def enable_group_offload(self, **kwargs):
        self.calls.append(("group_offload", str(kwargs["onload_device"])))

    def remove_all_hooks(self):
        self.calls.append(("remove_hooks",))


def fake_loader(source, models_dir, dtype, device, progress):
    total, largest = SIZES[source.location]
    progress(None, f"loading {source.name}")
    return LoadedModel(FakePipe(), total, largest, None)


def gpu(total_gib, free_gib=None):
    free = (free_gib if free_gib is not None else total_gib) * GiB
    return DeviceInfo("cuda:0", "Fake GPU", total_gib * GiB, free, True)


def manager(device, policy="auto", tmp_path=None):
    return ModelManager(tmp_path or "/nonexistent", requested_policy=policy, device=device, catalog=CATALOG,
                        loader=fake_loader)


@pytest.mark.parametrize(
    "free_gib, expected",
    [(24, VramPolicy.HIGH), (12, VramPolicy.HIGH), (9, VramPolicy.NORMAL), (6, VramPolicy.LOW), (80, VramPolicy.HIGH)],
)
def test_auto_policy_follows_free_vram_for_sdxl(free_gib, expected):
    # SDXL in bf16: about 7 GB in all, the UNet (largest part) about 5 GB.
    assert choose_policy("auto", gpu(80, free_gib), 7 * GiB, 5 * GiB) is expected


def test_explicit_policy_is_kept_on_gpu_and_cpu_without_accelerator():
    assert choose_policy("low", gpu(80), 7 * GiB, 5 * GiB) is VramPolicy.LOW
    assert choose_policy("high", DeviceInfo("cpu", "CPU"), 7 * GiB, 5 * GiB) is VramPolicy.CPU


def test_cpu_device_never_calls_offload():
    mgr = manager(DeviceInfo("cpu", "CPU"))
    record = mgr.get("big")
    with mgr.use(record) as pipe:
        assert record.locked
    assert record.policy is VramPolicy.CPU
    assert pipe.calls == [("to", "cpu")]
    assert not record.locked


def test_normal_and_low_policies_install_offload_once():
    mgr = manager(gpu(10))
    record = mgr.get("big")
    assert record.policy is VramPolicy.NORMAL
    for _ in range(3):
        with mgr.use(record):
            pass
    assert record.model.calls == [("model_offload", "cuda:0")]
    low_mgr = manager(gpu(6))
    low = low_mgr.get("big")
    with low_mgr.use(low) as pipe:
        assert ("group_offload", "cuda:0") in pipe.calls
        assert pipe.vae.use_tiling


def test_unlocked_models_are_evicted_to_make_room_but_locked_ones_stay():
    mgr = manager(gpu(16), policy="high")  # budget 13 GiB: big (8) and small (3) fit, two bigs don't
    big = mgr.get("big")
    small = mgr.get("small")
    with mgr.use(big):
        with mgr.use(small):
            assert big.resident and small.resident
    # a third model that does not fit evicts the least recently used unlocked one
    CATALOG["big2"] = CatalogEntry("big2", "b2", "sdxl", "org/big2")
    try:
        other = mgr.get("big2")
        with mgr.use(small):
            with mgr.use(other):
                assert not big.resident, "the idle big model should have been evicted"
                assert small.resident, "a locked model must never be evicted"
                assert big.model.calls[-1] == ("to", "cpu")
        with mgr.use(big):  # coming back restores it to the GPU
            assert big.model.calls[-1] == ("to", "cuda:0")
    finally:
        del CATALOG["big2"]


def test_status_lists_models_with_size_and_place():
    mgr = manager(gpu(24))
    record = mgr.get("small")
    with mgr.use(record):
        [entry] = mgr.status().models
        assert entry["name"] == "small" and entry["size_gb"] == 3.0 and entry["locked"]
        assert entry["where"] == "cuda:0"


def test_unload_frees_unlocked_models_and_refuses_locked_ones():
    mgr = manager(DeviceInfo("cpu", "CPU"))
    record = mgr.get("small")
    with mgr.use(record):
        with pytest.raises(BusyError):
            mgr.unload("small")
    assert mgr.unload() == ["small"]
    assert mgr.records() == []
    assert mgr.get("small") is not record  # loads afresh


def test_get_loads_each_model_once():
    mgr = manager(DeviceInfo("cpu", "CPU"))
    assert mgr.get("big") is mgr.get("big")


def test_demote_steps_down_high_normal_low_then_stops():
    mgr = manager(gpu(24), policy="high")
    record = mgr.get("small")
    with mgr.use(record):
        assert mgr.demote(record) is VramPolicy.NORMAL
        assert ("remove_hooks",) in record.model.calls and ("model_offload", "cuda:0") in record.model.calls
        assert mgr.demote(record) is VramPolicy.LOW
        assert mgr.demote(record) is None
    assert manager(DeviceInfo("cpu", "CPU")).demote(record) is None


def test_gpu_lane_serialises_short_jobs_and_refuses_during_exclusive_ones():
    mgr = manager(DeviceInfo("cpu", "CPU"))
    order = []
    with mgr.gpu_lane("generation"):
        def second_job():
            with mgr.gpu_lane("grid"):
                order.append("grid")

        thread = threading.Thread(target=second_job)
        thread.start()
        thread.join(0.2)
        assert order == [], "a second job must wait for the lane"
        order.append("generation")
    thread.join(2)
    assert order == ["generation", "grid"]
    with mgr.gpu_lane("training", exclusive=True):
        with pytest.raises(BusyError, match="training"):
            with mgr.gpu_lane("generation"):
                pass


def test_references_resolve_by_kind(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    single = tmp_path / "anime.safetensors"
    single.write_bytes(b"x")
    assert resolve_reference("demo-sdxl", CATALOG).kind == "demo"
    assert resolve_reference("big", CATALOG).location == "org/big"
    assert resolve_reference(str(folder), CATALOG).kind == "folder"
    assert resolve_reference(str(single), CATALOG).kind == "single_file"
    assert resolve_reference("someone/some-model", CATALOG).kind == "hub"
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        resolve_reference(str(tmp_path / "model.ckpt"), CATALOG)
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_reference(str(tmp_path), CATALOG)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_reference(str(tmp_path / "missing.safetensors"), CATALOG)
    with pytest.raises(ModelNotFoundError):
        resolve_reference("not a model", CATALOG)


def test_a_tagger_is_a_manager_record_and_unloads(tmp_path):
    from studio.captioning.tagger import Tagger

    mgr = ModelManager(tmp_path, requested_policy="auto", device=DeviceInfo("cpu", "CPU"))
    record = mgr.get("demo-tagger", family="tagger")
    assert isinstance(record.model, Tagger) and record.source.family == "tagger" and record.size_bytes > 0
    with mgr.use(record) as tagger:
        assert tagger.is_loaded
    assert [m["name"] for m in mgr.status().models] == ["demo-tagger"]
    assert mgr.unload("demo-tagger", family="tagger") == ["demo-tagger"] and mgr.records() == []


def test_the_busy_message_names_the_gpu_only_where_there_is_one():
    from pathlib import Path

    from studio.wording import a, count

    for device, says in ((DeviceInfo("cpu", "CPU"), "the studio is busy"),
                         (DeviceInfo("cuda:0", "GPU", 8, 8), "the GPU is busy")):
        manager = ModelManager(Path("unused"), requested_policy="cpu", device=device)
        with manager.gpu_lane("training x", exclusive=True):
            with pytest.raises(BusyError, match=f"^{says}: training x is running"):
                with manager.gpu_lane("generation"):
                    pass
    assert (a("Anima"), a("SDXL"), a("Stable Diffusion 1.x")) == ("an Anima", "an SDXL", "a Stable Diffusion 1.x")
    assert (count(1, "file"), count(2, "file")) == ("1 file", "2 files")
