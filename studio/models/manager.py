"""The one in-process model manager that every tab uses.

Vocabulary (after InvokeAI): models are stored in RAM (the storage device) and run on the execution
device (the GPU). A model is *locked* while it runs; unlocked models may be *evicted* to make room.
One *GPU lane* makes sure two jobs never fight over VRAM: a job holds the lane while it works.
Nothing happens at construction time: models load on first use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import BusyError, StudioError
from studio.models.catalog import CatalogEntry, ModelSource, load_catalog, resolve_reference
from studio.models.devices import DeviceInfo, free_accelerator_memory, probe_devices
from studio.models.loaders import LoadedModel, Progress, load_model
from studio.models.vram import PLACEMENTS, WORKING_BYTES, VramPolicy, choose_policy, pick_dtype
from studio.wording import a

GiB = 1024**3
Loader = Callable[[ModelSource, Path, Any, str, Progress], LoadedModel]


@dataclass
class ModelRecord:
    """One loaded model and where it is."""

    source: ModelSource
    model: Any
    size_bytes: int
    largest_component_bytes: int
    policy: VramPolicy
    execution_device: str
    weights_file: Path | None = None
    storage_device: str = "cpu"
    placed: bool = False  # the VRAM policy was applied (device move or offload hooks)
    resident: bool = False  # on the execution device (HIGH) or under offload hooks (NORMAL/LOW)
    locks: int = 0
    last_used: float = field(default_factory=time.monotonic)
    attachments: dict[str, Any] = field(default_factory=dict)  # per-model helpers, e.g. its LoRA stack

    @property
    def key(self) -> str:
        return self.source.key

    @property
    def locked(self) -> bool:
        return self.locks > 0

    @property
    def where(self) -> str:
        if self.execution_device == "cpu":
            return "cpu"
        if self.policy is VramPolicy.HIGH:
            return self.execution_device if self.resident else f"{self.storage_device} (evicted)"
        return f"{self.storage_device} -> {self.execution_device} ({self.policy.value} offload)"


@dataclass(frozen=True)
class ManagerStatus:
    device: DeviceInfo
    requested_policy: str
    lane_owner: str | None
    models: list[dict]


class ModelManager:
    def __init__(
        self,
        models_dir: Path,
        *,
        requested_policy: str = "auto",
        device: DeviceInfo | None = None,
        catalog: dict[str, CatalogEntry] | None = None,
        loader: Loader = load_model,
    ):
        self.models_dir = Path(models_dir)
        self.requested_policy = VramPolicy(requested_policy)
        self._device = device
        self._catalog = catalog
        self._loader = loader
        self._records: dict[str, ModelRecord] = {}
        self._books = threading.RLock()  # guards _records and placement
        self._lane = threading.Lock()
        self._lane_owner: str | None = None
        self._lane_exclusive = False

    # -- what there is -------------------------------------------------------------------------
    @property
    def device(self) -> DeviceInfo:
        if self._device is None:
            self._device = probe_devices()
        return self._device

    @property
    def catalog(self) -> dict[str, CatalogEntry]:
        if self._catalog is None:
            self._catalog = load_catalog()
        return self._catalog

    def resolve(self, ref: str, vae: str | None = None, family: str = "sdxl") -> ModelSource:
        return resolve_reference(ref, self.catalog, vae=vae, family=family)

    def status(self) -> ManagerStatus:
        with self._books:
            models = [
                {
                    "name": r.source.name,
                    "family": r.source.family,
                    "size_gb": round(r.size_bytes / GiB, 2),
                    "where": r.where,
                    "policy": r.policy.value,
                    "locked": r.locked,
                    "demo": r.source.demo,
                }
                for r in self._records.values()
            ]
        return ManagerStatus(self.device, self.requested_policy.value, self._lane_owner, models)

    # -- the GPU lane -------------------------------------------------------------------------
    @contextmanager
    def gpu_lane(self, owner: str, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the one GPU lane while working. Short jobs wait their turn; while an exclusive job
        (a training run) holds it, everyone else is refused at once with a message saying why."""
        busy = "the GPU is busy" if self.device.accelerator else "the studio is busy"
        if self._lane_exclusive and self._lane_owner:
            raise BusyError(f"{busy}: {self._lane_owner} is running. Stop it or wait for it to finish.")
        if not self._lane.acquire(blocking=not exclusive):
            lane = "the GPU" if self.device.accelerator else "the model lane"
            raise BusyError(f"{busy} with {self._lane_owner}; {a(owner)} needs {lane} to itself.")
        self._lane_owner, self._lane_exclusive = owner, exclusive
        try:
            yield
        finally:
            self._lane_owner, self._lane_exclusive = None, False
            self._lane.release()

    # -- loading, locking, offloading ---------------------------------------------------------
    def get(self, ref: str | ModelSource, progress: Progress | None = None, family: str = "sdxl") -> ModelRecord:
        """The record for a model, loading it into RAM on first use."""
        source = ref if isinstance(ref, ModelSource) else self.resolve(ref, family=family)
        with self._books:
            record = self._records.get(source.key)
            if record is not None:
                return record
            progress = progress or (lambda fraction, message: None)
            device = self.device.execution_device
            loaded = self._loader(source, self.models_dir, pick_dtype(self.device), device, progress)
            policy = choose_policy(
                self.requested_policy, self.device, loaded.size_bytes, loaded.largest_component_bytes
            )
            record = ModelRecord(
                source=source,
                model=loaded.model,
                size_bytes=loaded.size_bytes,
                largest_component_bytes=loaded.largest_component_bytes,
                policy=policy,
                execution_device=self.device.execution_device if policy is not VramPolicy.CPU else "cpu",
                weights_file=loaded.weights_file,
            )
            self._records[source.key] = record
            return record

    @contextmanager
    def use(self, record: ModelRecord) -> Iterator[Any]:
        """Lock a model on its execution device for the duration of the block."""
        self.lock(record)
        try:
            yield record.model
        finally:
            self.unlock(record)

    def lock(self, record: ModelRecord) -> None:
        with self._books:
            if record.key not in self._records:
                raise StudioError(f"{record.source.name} was unloaded; load it again")
            if not record.resident:
                self._make_room(record)
                placement = PLACEMENTS[record.source.family]
                if record.placed:
                    placement.restore(record.model, record.policy, self.device)
                else:
                    placement.place(record.model, record.policy, self.device)
                    record.placed = True
                record.resident = True
            record.locks += 1
            record.last_used = time.monotonic()

    def unlock(self, record: ModelRecord) -> None:
        with self._books:
            record.locks = max(0, record.locks - 1)
            record.last_used = time.monotonic()

    def room_for(self, record: ModelRecord) -> int | None:
        """The accelerator memory `record` can count on: the card's, less what other models in use
        keep there (idle ones are evicted to make room). None on a CPU."""
        if not self.device.accelerator or self.device.total_bytes is None:
            return None
        with self._books:
            held = sum(r.size_bytes for r in self._records.values()
                       if r is not record and r.locked and r.resident and r.policy is VramPolicy.HIGH)
        return self.device.total_bytes - held

    def _vram_budget(self) -> int | None:
        total = self.device.total_bytes
        return None if total is None else total - WORKING_BYTES

    def _make_room(self, incoming: ModelRecord) -> None:
        """Evict unlocked resident models, least recently used first, until `incoming` fits."""
        budget = self._vram_budget()
        if budget is None:
            return
        needed = incoming.size_bytes if incoming.policy is VramPolicy.HIGH else incoming.largest_component_bytes
        resident = [r for r in self._records.values()
                    if r.resident and r is not incoming and r.policy is VramPolicy.HIGH]
        used = sum(r.size_bytes for r in resident)
        for victim in sorted((r for r in resident if not r.locked), key=lambda r: r.last_used):
            if used + needed <= budget:
                break
            PLACEMENTS[victim.source.family].evict(victim.model, victim.policy)
            victim.resident = False
            used -= victim.size_bytes

    def demote(self, record: ModelRecord) -> VramPolicy | None:
        """Move a model to the next lower-memory policy (HIGH -> NORMAL -> LOW) after running out
        of memory. Returns the new policy, or None when there is nothing lower to try."""
        lower = {VramPolicy.HIGH: VramPolicy.NORMAL, VramPolicy.NORMAL: VramPolicy.LOW}.get(record.policy)
        placement = PLACEMENTS[record.source.family]
        if lower is None or not self.device.accelerator or not placement.demotable:
            return None
        with self._books:
            placement.reset(record.model)
            record.policy = lower
            placement.place(record.model, lower, self.device)
        return lower

    def unload(self, ref: str | ModelSource | None = None, family: str = "sdxl") -> list[str]:
        """Drop one model (or every unlocked one) from RAM and VRAM; returns the names dropped."""
        with self._books:
            if ref is None:
                victims = [r for r in self._records.values() if not r.locked]
            else:
                source = ref if isinstance(ref, ModelSource) else self.resolve(ref, family=family)
                record = self._records.get(source.key)
                if record is None:
                    return []
                if record.locked:
                    raise BusyError(f"{record.source.name} is in use; stop the job using it first")
                victims = [record]
            for record in victims:
                del self._records[record.key]
                record.attachments.clear()
                record.model = None
        free_accelerator_memory(self.device)
        return [r.source.name for r in victims]

    def after_fork(self) -> None:
        """Make this copy of the manager usable in a forked process that has the GPU (ZeroGPU's
        worker): fresh locks (a fork copies them in whatever state another thread held them), the
        device probed again, and every loaded model planned for that device. The models stay in
        RAM where the parent loaded them; each moves to the GPU the first time it is locked."""
        self._books = threading.RLock()
        self._lane = threading.Lock()
        self._lane_owner, self._lane_exclusive = None, False
        self._device = None
        for record in self._records.values():
            record.policy = choose_policy(self.requested_policy, self.device, record.size_bytes,
                                          record.largest_component_bytes)
            record.execution_device = "cpu" if record.policy is VramPolicy.CPU else self.device.execution_device
            record.placed = record.resident = False
            record.locks = 0

    def records(self) -> list[ModelRecord]:
        with self._books:
            return list(self._records.values())
