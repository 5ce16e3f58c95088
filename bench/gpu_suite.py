"""The GPU suite: one run on one H100/H200 (about 8 minutes) that measures the studio at real size
and writes `bench/results/gpu_suite.json` and a markdown table (`gpu_suite.md`) for the README.

    python bench/gpu_suite.py                 # a CUDA GPU: full-size SDXL and Anima, random weights
    python bench/gpu_suite.py --demo          # any machine: the same code on the demo models, tiny
                                              # sizes (checks the suite itself; numbers mean nothing)

Sections (each one's failure is recorded and the suite goes on; a section that would start after
the time budget is skipped and says so):
1. SDXL generation, 832x1216, 28 steps, per VRAM policy: seconds per image (studio and a plain
   diffusers call, interleaved), peak VRAM, MFU (policy high), and the generation memory plan's
   error against the peak.
2. SDXL LoRA training, 1024x1024: batch 1 and 4, with and without gradient checkpointing, and with
   fp8 base weights: seconds per step, peak VRAM (after warm-up), MFU, the training plan's error.
3. Anima generation (1024x1024, 30 steps, policy high) and training (batch 1, checkpointing).
4. The tagger: images per second through the studio's batched pipeline (bench/caption.py's ViT
   shaped like wd-vit-tagger-v3).
Peak VRAM is `torch.cuda.max_memory_allocated`; MFU is FLOPs counted by torch's FlopCounterMode
over measured seconds against the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GiB = 1024**3


class Suite:
    def __init__(self, args, workdir: Path):
        import torch

        self.args, self.workdir, self.started = args, workdir, time.perf_counter()
        self.cuda = torch.cuda.is_available()
        from train import PEAK_BF16_FLOPS

        self.device = torch.cuda.get_device_name(0) if self.cuda else "CPU"
        self.peak_flops = next((flops for key, flops in PEAK_BF16_FLOPS if key in self.device), None)
        self.results: dict = {"device": self.device, "demo": args.demo, "peak_bf16_flops": self.peak_flops,
                              "sections": {}}

    # -- running ---------------------------------------------------------------------------------
    def section(self, name: str, fn) -> None:
        elapsed = time.perf_counter() - self.started
        if elapsed > self.args.budget:
            self.results["sections"][name] = {"skipped": f"time budget ({self.args.budget} s) spent"}
            print(f"{name}: skipped (budget)", flush=True)
            return
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        try:
            rows = fn()
            self.results["sections"][name] = {"rows": rows, "seconds": round(time.perf_counter() - start, 1)}
        except Exception as exc:  # noqa: BLE001 - one section's failure is recorded; the suite goes on
            traceback.print_exc()
            self.results["sections"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        self.free()

    def free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_vram(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None

    def mfu(self, flops: float, seconds: float) -> float | None:
        return round(flops / seconds / self.peak_flops, 4) if self.peak_flops and seconds else None

    # -- 1. SDXL generation ------------------------------------------------------------------------
    def sdxl_generation(self) -> list[dict]:
        import torch
        from generate import bench_config, compare, unet_flops_per_image
        from sdxl_full_size import build_full_size_sdxl

        from studio.models.catalog import CatalogEntry
        from studio.models.loaders import LoadedModel
        from studio.models.manager import ModelManager
        from studio.models.vram import pipeline_bytes
        from studio.training.memory_plan import plan_generation

        demo = self.args.demo
        size, steps = ("256x256", 4) if demo else ("832x1216", 28)
        model = "demo-sdxl" if demo else "sdxl-full-size"
        config = bench_config(size, steps, model)
        catalog = None if demo else {model: CatalogEntry(model, "SDXL full size", "sdxl", "bench:full")}

        def loader(source, models_dir, dtype, device, progress):
            pipe = build_full_size_sdxl("cpu", torch.bfloat16)
            total, largest = pipeline_bytes(pipe)
            return LoadedModel(pipe, total, largest, None)

        rows = []
        policies = ["cpu"] if not self.cuda else ["high", "normal", "low"]
        for policy in policies:
            extra = {} if demo else {"catalog": catalog, "loader": loader}
            manager = ModelManager(self.workdir / "models", requested_policy=policy, **extra)
            self.free()
            result = compare(manager, model, config, self.args.repeats, self.workdir / "outputs")
            row = {"policy": policy, "size": size, "steps": steps, "studio_s_per_image": round(result["studio"], 3),
                   "plain_s_per_image": round(result["plain"], 3),
                   "overhead_ratio": round(result["studio"] / result["plain"], 3), "peak_vram_gib": self.peak_vram()}
            if policy == "high":
                with manager.use(manager.get(model)) as pipe:
                    row["mfu"] = self.mfu(unet_flops_per_image(pipe, config), result["studio"])
            if self.cuda and not demo:
                plan = plan_generation("sdxl", None, config.width, config.height, policy=policy)
                row["plan_gib"] = round(plan.total / GiB, 2)
                row["plan_error"] = round(plan.total / GiB / row["peak_vram_gib"] - 1, 3)
            rows.append(row)
            manager.unload()
            print(f"  {row}", flush=True)
        return rows

    # -- 2. SDXL training ---------------------------------------------------------------------------
    def sdxl_training(self) -> list[dict]:
        from train import bench_config as train_config
        from train import full_size_case, make_dataset, studio_block, train_flops

        from studio.training.memory_plan import plan_training

        demo = self.args.demo
        size = 128 if demo else 1024
        dataset = make_dataset(self.workdir / "data-sdxl", 8, size)
        cases = [(1, False, False), (1, True, False), (1, True, True), (4, True, False)]
        rows = []
        for batch, checkpointing, fp8 in cases:
            self.free()
            bench = SimpleNamespace(resolution=size, batch=batch, warmup=self.args.warmup, steps=self.args.steps)
            if demo:
                config = train_config(dataset, bench, gradient_checkpointing=checkpointing, fp8_base=fp8,
                                      mixed_precision="no")
                block = studio_block(config, self.workdir, self.workdir / "models", self.args.warmup)
                seconds = sorted(block["times"])[len(block["times"]) // 2]
            else:
                result = full_size_case(self.workdir, dataset, bench, batch, checkpointing, True, "AdamW", size)
                if fp8:  # the same case with fp8 base weights
                    from unittest import mock

                    from train import full_size_loader

                    from studio.training import trainer

                    config = result["config"].model_copy(update={"fp8_base": True})
                    with mock.patch.object(trainer, "_load_model", full_size_loader):
                        block = studio_block(config, self.workdir, self.workdir / "models", self.args.warmup)
                    result = {**block, "config": config, "seconds": sorted(block["times"])[len(block["times"]) // 2]}
                config, block, seconds = result["config"], result, result["seconds"]
            row = {"batch": batch, "checkpointing": checkpointing, "fp8_base": fp8, "size": size,
                   "s_per_step": round(seconds, 3), "images_per_s": round(batch / seconds, 2),
                   "peak_vram_gib": round(block["train"], 2) if self.cuda else None}
            if self.cuda and not demo:
                row["mfu"] = self.mfu(train_flops(config, batch, size), seconds)
                plan = plan_training(config, "sdxl", None, device="cuda")
                row["plan_gib"] = round(plan.total / GiB, 2)
                row["plan_error"] = round(plan.total / GiB / max(block["train"], 1e-9) - 1, 3)
            rows.append(row)
            print(f"  {row}", flush=True)
        return rows

    # -- 3. Anima -----------------------------------------------------------------------------------
    def anima(self) -> list[dict]:
        import torch
        from anima import compare_generation, full_size_train_loader, gen_config, generation_flops
        from anima_full_size import build_full_size_anima
        from train import bench_config as train_config
        from train import full_size_case, make_dataset, studio_block

        from studio.models.catalog import CatalogEntry
        from studio.models.loaders import LoadedModel
        from studio.models.manager import ModelManager
        from studio.models.vram import pipeline_bytes

        demo = self.args.demo
        model = "demo-anima" if demo else "anima-full-size"
        size = "256x256" if demo else "1024x1024"
        config = gen_config(size, 4 if demo else 30, model, 4.0)

        def loader(source, models_dir, dtype, device, progress):
            pipe = build_full_size_anima("cpu", torch.bfloat16)
            total, largest = pipeline_bytes(pipe)
            return LoadedModel(pipe, total, largest, None)

        extra = {} if demo else {"catalog": {model: CatalogEntry(model, "Anima full size", "anima", "bench:full")},
                                 "loader": loader}
        manager = ModelManager(self.workdir / "models", requested_policy="high" if self.cuda else "cpu", **extra)
        result = compare_generation(manager, model, config, self.args.repeats, self.workdir / "outputs")
        row = {"what": "generation", "size": size, "studio_s_per_image": round(result["studio"], 3),
               "plain_s_per_image": round(result["plain"], 3),
               "overhead_ratio": round(result["studio"] / result["plain"], 3), "peak_vram_gib": self.peak_vram()}
        if self.cuda:
            with manager.use(manager.get(model)) as pipe:
                row["mfu"] = self.mfu(generation_flops(pipe, config), result["studio"])
        manager.unload()
        rows = [row]
        print(f"  {row}", flush=True)
        self.free()
        train_size = 128 if demo else 1024
        dataset = make_dataset(self.workdir / "data-anima", 8, train_size)
        bench = SimpleNamespace(resolution=train_size, batch=1, warmup=self.args.warmup, steps=self.args.steps)
        if demo:
            run = train_config(dataset, bench, pretrained_model="demo-anima", gradient_checkpointing=True,
                               mixed_precision="no")
            block = studio_block(run, self.workdir, self.workdir / "models", self.args.warmup)
            seconds = sorted(block["times"])[len(block["times"]) // 2]
        else:
            block = full_size_case(self.workdir, dataset, bench, 1, True, True, "AdamW", train_size,
                                   loader=full_size_train_loader)
            seconds = block["seconds"]
        row = {"what": "training batch 1, checkpointing", "size": train_size, "s_per_step": round(seconds, 3),
               "peak_vram_gib": round(block["train"], 2) if self.cuda else None}
        rows.append(row)
        print(f"  {row}", flush=True)
        return rows

    # -- 4. Tagger ----------------------------------------------------------------------------------
    def tagger(self) -> list[dict]:
        from caption import build_vit_tagger, write_images

        from studio.captioning.tagger import Tagger, default_providers

        folder = build_vit_tagger(self.workdir / "vit-tagger", 2 if self.args.demo else 12)
        tagger = Tagger.load(folder, default_providers("cuda" if self.cuda else "cpu"))
        (self.workdir / "tag-images").mkdir(parents=True, exist_ok=True)
        paths = write_images(self.workdir / "tag-images", 16 if self.args.demo else 64, (1024, 1536))
        list(tagger.tag_images(paths[:8], batch_size=8))  # warm-up
        start = time.perf_counter()
        count = len(list(tagger.tag_images(paths, batch_size=16)))
        seconds = time.perf_counter() - start
        return [{"images": count, "images_per_s": round(count / seconds, 1), "batch": 16}]

    # -- output -------------------------------------------------------------------------------------
    def write(self, out: Path) -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        self.results["total_seconds"] = round(time.perf_counter() - self.started, 1)
        name = "gpu_suite_demo" if self.args.demo else "gpu_suite"
        json_path, md_path = out / f"{name}.json", out / f"{name}.md"
        json_path.write_text(json.dumps(self.results, indent=1, default=str))
        md_path.write_text(markdown(self.results))
        return json_path, md_path


def markdown(results: dict) -> str:
    title = f"GPU suite on {results['device']} ({'demo models' if results['demo'] else 'full size, random weights'})"
    lines = [f"{title}, {results.get('total_seconds', '?')} s", ""]
    for name, section in results["sections"].items():
        lines.append(f"### {name}")
        if "rows" not in section:
            lines += [section.get("error") or section.get("skipped", ""), ""]
            continue
        rows = section["rows"]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |"
                  for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the demo models at tiny sizes, on any device")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--budget", type=int, default=420, help="seconds after which no new section starts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="training: timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="training: untimed steps first")
    parser.add_argument("--only", help="comma-separated sections: sdxl_generation,sdxl_training,anima,tagger")
    args = parser.parse_args(argv)
    import torch

    if not args.demo and not torch.cuda.is_available():
        print("the GPU suite needs a CUDA GPU (or --demo to check it on the demo models)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        suite = Suite(args, Path(tmp))
        wanted = args.only.split(",") if args.only else ["sdxl_generation", "sdxl_training", "anima", "tagger"]
        for name in wanted:
            suite.section(name, getattr(suite, name))
        json_path, md_path = suite.write(args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
