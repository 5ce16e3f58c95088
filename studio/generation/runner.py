"""What every model family's generation runner shares: one runner per loaded model record, its
LoRA stack, seeded CPU generators, and out-of-memory recovery (free memory, tiled VAE, then a lower
VRAM policy, retried once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from studio.errors import StudioError
from studio.models.devices import free_accelerator_memory, is_out_of_memory
from studio.models.vram import enable_vae_tiling
from studio.schemas import LoraSpec

if TYPE_CHECKING:
    from studio.models.manager import ModelManager, ModelRecord


class Runner:
    def __init__(self, record: ModelRecord, manager: ModelManager | None = None):
        from studio.generation.lora import LoraStack

        self.record = record
        self.manager = manager
        self.pipe = record.model  # placed by the VRAM policy
        self.base_scheduler_config = dict(self.pipe.scheduler.config)
        self.loras = LoraStack(self.pipe, family=record.source.family)

    @classmethod
    def for_record(cls, record: ModelRecord, manager: ModelManager | None = None):
        runner = record.attachments.get("runner")
        if runner is None:
            runner = record.attachments["runner"] = cls(record, manager)
        return runner

    # -- LoRAs ---------------------------------------------------------------------------------
    def apply_loras(self, specs: list[LoraSpec]) -> list[str]:
        return self.loras.apply(specs)

    def lora_hashes(self) -> dict[str, str]:
        return {lora.name: lora.hash for lora in self.loras.applied()}

    @staticmethod
    def _generators(seeds: list[int]):
        import torch

        # CPU generators: the same seed gives the same noise on any GPU or on the CPU.
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    # -- out of memory -------------------------------------------------------------------------
    def _lower_memory(self) -> str | None:
        """One step down in memory use: tiled VAE first, then a lower VRAM policy."""
        if enable_vae_tiling(self.pipe):
            return "tiled VAE decoding"
        if self.manager is not None:
            policy = self.manager.demote(self.record)
            if policy is not None:
                return f"the '{policy.value}' VRAM policy"
        return None

    def run_with_oom_retry(self, fn: Callable[[], list], warnings: list[str]) -> list:
        """Run `fn`; on CUDA out-of-memory free memory, lower the memory use once and retry."""
        advice = "lower the size, batch size or hires scale, or restart with --vram low"
        result, out_of_memory = _attempt(fn)
        if not out_of_memory:
            return result
        free_accelerator_memory()
        change = self._lower_memory()
        if change is None:
            raise StudioError(f"out of GPU memory: {advice}")
        warnings.append(f"ran out of GPU memory; retried with {change}")
        result, out_of_memory = _attempt(fn)
        if not out_of_memory:
            return result
        free_accelerator_memory()
        raise StudioError(f"out of GPU memory even with {change}: {advice}")


def _attempt(fn: Callable[[], list]) -> tuple[list | None, bool]:
    """(result, False), or (None, True) after a CUDA out-of-memory error. Returning from the except
    block lets the failed attempt's frames (and their tensors) be freed before a retry."""
    try:
        return fn(), False
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    return None, True
