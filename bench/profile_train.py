"""Where a full-size SDXL LoRA training step spends its time on a GPU: the studio's train() against
the plain diffusers + peft loop (bench/train.py's ReferenceLoop), each under torch.profiler for two
steps after warm-up, plus variants (the UNet channels-last, torch.compile, batch 4).

    python bench/profile_train.py [--variants studio,studio_nhwc,reference,b4,b4_compile]

Prints per variant: seconds per step, the GPU's busy share of the step (kernel time / wall time: low
means the step waits on the CPU, i.e. kernel launches), and the top operators by GPU and by CPU
time. CUDA only; random weights (bench/sdxl_full_size.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WARMUP, PROFILED = 3, 2


def summarize(name: str, prof, seconds: list[float], steps: int) -> None:
    """Step time, GPU busy share and the top operators of a profiled window of `steps` steps."""
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    wall = sum(seconds[-steps:])
    print(f"\n== {name}: {statistics.median(seconds):.3f} s/step (median of {len(seconds)}); GPU busy "
          f"{kernel_us / 1e6 / wall:.0%} of the profiled {steps} steps ({kernel_us / 1e6:.3f} s of kernels in "
          f"{wall:.3f} s)", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60), flush=True)


def studio_variant(name: str, workdir: Path, dataset: Path, batch: int, checkpointing: bool, **overrides) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from train import full_size_config, full_size_loader

    from studio.training import trainer
    from studio.training.trainer import train

    args = SimpleNamespace(warmup=WARMUP, steps=PROFILED)
    config = full_size_config(dataset, args, batch, checkpointing, True, "AdamW", 1024, **overrides)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    stamps: list[float] = []

    def on_event(event):
        if event.kind == "message" and "torch.compile" in event.data.get("text", ""):
            print(f"  {event.data['text']}", flush=True)
        if event.kind != "step":
            return
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if event.step == WARMUP:
            prof.start()
        elif event.step == WARMUP + PROFILED:
            prof.stop()

    start = time.perf_counter()
    with mock.patch.object(trainer, "_load_model", full_size_loader):
        train(config, run_dir=Path(tempfile.mkdtemp(dir=workdir)), models_dir=workdir / "models",
              cache_dir=workdir / "cache", on_event=on_event)
    print(f"{name}: run took {time.perf_counter() - start:.1f} s, peak VRAM "
          f"{torch.cuda.max_memory_allocated() / 1024**3:.2f} GiB", flush=True)
    times = [b - a for a, b in itertools.pairwise(stamps)][WARMUP - 1:]
    summarize(name, prof, times, PROFILED)


def reference_variant(workdir: Path, dataset: Path) -> None:
    import torch
    from sdxl_full_size import build_full_size_sdxl
    from torch.profiler import ProfilerActivity, profile
    from train import ReferenceLoop, full_size_config

    config = full_size_config(dataset, SimpleNamespace(warmup=WARMUP, steps=PROFILED), 1, False, True, "AdamW", 1024)
    pipe = build_full_size_sdxl("cuda", torch.bfloat16)
    loop = ReferenceLoop(pipe, config, sorted(dataset.glob("*.png")), "cuda", torch.bfloat16)
    times = loop.block(WARMUP, 0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        times += loop.block(PROFILED, 0)
    summarize("reference (plain diffusers + peft), batch 1", prof, times, PROFILED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="studio,studio_nhwc,reference,b4,b4_compile")
    args = parser.parse_args()
    import torch
    from train import make_dataset

    from studio.training import sdxl

    if not torch.cuda.is_available():
        sys.exit("bench/profile_train.py needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dataset = make_dataset(workdir / "data", 8, 1024)
        for variant in args.variants.split(","):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                if variant == "studio":
                    studio_variant("studio, batch 1", workdir, dataset, 1, False)
                elif variant == "studio_nhwc":
                    with mock.patch.object(sdxl, "CHANNELS_LAST", True):
                        studio_variant("studio, batch 1, UNet channels-last", workdir, dataset, 1, False)
                elif variant == "reference":
                    reference_variant(workdir, dataset)
                elif variant == "b4":
                    studio_variant("studio, batch 4, no checkpointing", workdir, dataset, 4, False)
                elif variant == "b4_compile":
                    studio_variant("studio, batch 4, no checkpointing, torch.compile", workdir, dataset, 4, False,
                                   torch_compile=True)
            except Exception as exc:  # noqa: BLE001 - one variant's failure is reported; the others run
                import traceback

                traceback.print_exc()
                print(f"{variant} failed: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
