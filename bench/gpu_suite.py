"""The GPU suite: one run on one H100/H200 (about 8 minutes) that measures the studio at real size
and writes `bench/results/gpu_suite.json` and a markdown table (`gpu_suite.md`) for the README.

    python bench/gpu_suite.py                 # a CUDA GPU: full-size SDXL and Anima, random weights
    python bench/gpu_suite.py --demo          # any machine: the same code on the demo models, tiny
                                              # sizes (checks the suite itself; numbers mean nothing)
    python bench/gpu_suite.py --cpu-check     # a CPU with ~20 GB free RAM: the full-size paths at tiny
                                              # resolutions and step counts (run it before a GPU run)

The results are written after every row, so a run cut short still leaves what it measured.

Sections (each one's failure is recorded and the suite goes on; a section that would start after
the time budget is skipped and says so):
1. SDXL generation, 832x1216, 28 steps, per VRAM policy: seconds per image (studio and a plain
   diffusers call, interleaved), peak VRAM, MFU (policy high), and the generation memory plan's
   error against the peak.
2. SDXL LoRA training, 1024x1024: batch 1 and 4, with and without gradient checkpointing, and with
   fp8 base weights: seconds per step, peak VRAM (after warm-up), MFU, the training plan's error;
   for batch 1 without checkpointing also a plain diffusers + peft loop (bench/train.py's
   ReferenceLoop) on the same weights, and the studio/plain ratio.
3. Anima generation (1024x1024, 30 steps, policy high) and training (batch 1, checkpointing).
4. The tagger: images per second through the studio's batched pipeline (bench/caption.py's ViT
   shaped like wd-vit-tagger-v3).
Peak VRAM is `torch.cuda.max_memory_allocated`; MFU is FLOPs counted by torch's FlopCounterMode
over measured seconds against the card's dense bf16 peak. Each full-size model is built once with
random weights (on the GPU, where that takes seconds) and copied for every VRAM policy.
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

# Sizes per mode. "gpu": the settings at full size. "cpu_check": the same full-size models
# and code paths at sizes a CPU gets through in minutes. "demo": the demo models.
SCALES = {
    "gpu": {"gen_size": "832x1216", "gen_steps": 28, "train_size": 1024, "anima_size": "1024x1024",
            "anima_steps": 30, "policies": ("high", "normal", "low"),
            "train_cases": ((1, False, False), (1, True, False), (1, True, True), (4, True, False)),
            "tagger_layers": 12, "tagger_images": 48},
    "cpu_check": {"gen_size": "256x256", "gen_steps": 2, "train_size": 256, "anima_size": "256x256",
                  "anima_steps": 2, "policies": ("cpu",), "train_cases": ((1, False, False), (1, True, True)),
                  "tagger_layers": 2, "tagger_images": 8},
    "demo": {"gen_size": "256x256", "gen_steps": 4, "train_size": 128, "anima_size": "256x256", "anima_steps": 4,
             "policies": ("cpu",),
             "train_cases": ((1, False, False), (1, True, False), (1, True, True), (4, True, False)),
             "tagger_layers": 2, "tagger_images": 16},
}


class Suite:
    def __init__(self, args, workdir: Path):
        import torch

        self.args, self.workdir, self.started = args, workdir, time.perf_counter()
        self.cuda = torch.cuda.is_available()
        self.mode = "demo" if args.demo else ("cpu_check" if args.cpu_check else "gpu")
        self.scale = SimpleNamespace(**SCALES[self.mode])
        self.full = not args.demo  # full-size models (on the GPU, or the CPU check)
        from train import PEAK_BF16_FLOPS

        self.device = torch.cuda.get_device_name(0) if self.cuda else "CPU"
        self.peak_flops = next((flops for key, flops in PEAK_BF16_FLOPS if key in self.device), None)
        self.results: dict = {"device": self.device, "mode": self.mode, "demo": args.demo,
                              "torch": torch.__version__, "peak_bf16_flops": self.peak_flops, "sections": {}}
        self._templates: dict = {}

    # -- running ---------------------------------------------------------------------------------
    def section(self, name: str, fn) -> None:
        elapsed = time.perf_counter() - self.started
        if elapsed > self.args.budget:
            self.results["sections"][name] = {"skipped": f"time budget ({self.args.budget} s) spent"}
            print(f"{name}: skipped (budget)", flush=True)
            self.save()
            return
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        rows: list[dict] = []
        self.results["sections"][name] = {"rows": rows}
        try:
            fn(rows)
        except Exception as exc:  # noqa: BLE001 - one section's failure is recorded; the suite goes on
            traceback.print_exc()
            self.results["sections"][name]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        self.results["sections"][name]["seconds"] = round(time.perf_counter() - start, 1)
        self.free()
        self.save()

    def row(self, rows: list[dict], row: dict, fn) -> None:
        """Measure one row: `fn(row)` fills it in; a failure (out of memory, say) is recorded in the
        row and the section goes on with the next one."""
        if time.perf_counter() - self.started > self.args.budget:
            row["skipped"] = "time budget spent"
        else:
            try:
                fn(row)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
        rows.append(row)
        print(f"  {row}", flush=True)
        self.free()
        self.save()

    def free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_vram(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / GiB, 2) if self.cuda else None

    def mfu(self, flops: float, seconds: float) -> float | None:
        return round(flops / seconds / self.peak_flops, 4) if self.peak_flops and seconds else None

    def template(self, family: str):
        """The full-size pipeline of `family`, built once (on the GPU when there is one: seconds,
        not minutes) and kept in RAM; every VRAM policy gets its own copy."""
        import torch

        if family not in self._templates:
            start = time.perf_counter()
            if family == "sdxl":
                from sdxl_full_size import build_full_size_sdxl as build
            else:
                from anima_full_size import build_full_size_anima as build
            pipe = build("cuda" if self.cuda else "cpu", torch.bfloat16)
            pipe.to("cpu", torch.bfloat16)  # every component in bf16, as the studio's loaders load it
            self._templates[family] = pipe
            self.results.setdefault("build_seconds", {})[family] = round(time.perf_counter() - start, 1)
        return self._templates[family]

    def drop_template(self, family: str) -> None:
        self._templates.pop(family, None)
        gc.collect()

    def manager(self, family: str, model: str, policy: str):
        """A ModelManager whose catalog holds `model`: the demo model, or a copy of the full-size
        template under `policy`."""
        import copy

        from studio.models.catalog import CatalogEntry
        from studio.models.loaders import LoadedModel
        from studio.models.manager import ModelManager
        from studio.models.vram import pipeline_bytes

        if not self.full:
            return ModelManager(self.workdir / "models", requested_policy=policy)

        def loader(source, models_dir, dtype, device, progress):
            pipe = copy.deepcopy(self.template(family))
            total, largest = pipeline_bytes(pipe)
            return LoadedModel(pipe, total, largest, None)

        catalog = {model: CatalogEntry(model, f"{family} full size", family, "bench:full")}
        return ModelManager(self.workdir / "models", requested_policy=policy, catalog=catalog, loader=loader)

    # -- 1. SDXL generation ------------------------------------------------------------------------
    def sdxl_generation(self, rows: list[dict]) -> None:
        from generate import bench_config, compare, unet_flops_per_image

        from studio.training.memory_plan import plan_generation

        scale = self.scale
        model = "sdxl-full-size" if self.full else "demo-sdxl"
        config = bench_config(scale.gen_size, scale.gen_steps, model)
        for policy in scale.policies if self.cuda else ("cpu",):
            def measure(row, policy=policy):
                manager = self.manager("sdxl", model, policy)
                repeats = 1 if policy == "low" else self.args.repeats  # streamed weights: slow, steady
                try:
                    result = compare(manager, model, config, repeats, self.workdir / "outputs")
                    row.update(studio_s_per_image=round(result["studio"], 3),
                               plain_s_per_image=round(result["plain"], 3),
                               overhead_ratio=round(result["studio"] / result["plain"], 3),
                               peak_vram_gib=self.peak_vram())
                    if self.full and policy in ("high", "cpu"):  # FLOPs counted at full-size shapes
                        with manager.use(manager.get(model)) as pipe:
                            row["mfu"] = self.mfu(unet_flops_per_image(pipe, config), result["studio"])
                finally:
                    manager.unload()
                if self.full:
                    plan = plan_generation("sdxl", None, config.width, config.height, policy=policy,
                                           device="cuda" if self.cuda else "cpu")
                    row["plan_gib"] = round(plan.total / GiB, 2)
                    if row.get("peak_vram_gib"):
                        row["plan_error"] = round(plan.total / GiB / row["peak_vram_gib"] - 1, 3)

            self.row(rows, {"policy": policy, "size": scale.gen_size, "steps": scale.gen_steps}, measure)
        self.drop_template("sdxl")

    # -- 2. SDXL training ---------------------------------------------------------------------------
    def sdxl_training(self, rows: list[dict]) -> None:
        from train import bench_config as train_config
        from train import full_size_config, make_dataset, studio_block, train_flops

        from studio.training.memory_plan import plan_training

        size = self.scale.train_size
        dataset = make_dataset(self.workdir / "data-sdxl", 8, size)
        bench = SimpleNamespace(resolution=size, warmup=self.args.warmup, steps=self.args.steps)
        for batch, checkpointing, fp8 in self.scale.train_cases:
            def measure(row, batch=batch, checkpointing=checkpointing, fp8=fp8):
                case = SimpleNamespace(**vars(bench), batch=batch)
                if not self.full:
                    config = train_config(dataset, case, gradient_checkpointing=checkpointing, fp8_base=fp8,
                                          mixed_precision="no")
                    block = studio_block(config, self.workdir, self.workdir / "models", self.args.warmup)
                    seconds = sorted(block["times"])[len(block["times"]) // 2]
                else:
                    from unittest import mock

                    from train import full_size_loader

                    from studio.training import trainer

                    config = full_size_config(dataset, case, batch, checkpointing, True, "AdamW", size, fp8_base=fp8)
                    with mock.patch.object(trainer, "_load_model", full_size_loader):
                        block = studio_block(config, self.workdir, self.workdir / "models", self.args.warmup)
                    seconds = sorted(block["times"])[len(block["times"]) // 2]
                row.update(s_per_step=round(seconds, 3), images_per_s=round(batch / seconds, 2),
                           peak_vram_gib=round(block["train"], 2) if self.cuda else None)
                if self.full:
                    row["mfu"] = self.mfu(train_flops(config, batch, size), seconds)
                    plan = plan_training(config, "sdxl", None, device="cuda" if self.cuda else "cpu")
                    row["plan_gib"] = round(plan.total / GiB, 2)
                    if self.cuda:
                        row["plan_error"] = round(plan.total / GiB / max(block["train"], 1e-9) - 1, 3)
                if self.full and batch == 1 and not checkpointing and not fp8:
                    row["plain_s_per_step"] = self.reference_step(config, dataset)
                    row["overhead_ratio"] = round(seconds / row["plain_s_per_step"], 3)

            self.row(rows, {"batch": batch, "checkpointing": checkpointing, "fp8_base": fp8, "size": size},
                     measure)

    def reference_step(self, config, dataset: Path) -> float:
        """Median seconds of one step of plain diffusers + peft on the same full-size weights."""
        import torch
        from sdxl_full_size import build_full_size_sdxl
        from train import ReferenceLoop

        device = "cuda" if self.cuda else "cpu"
        pipe = build_full_size_sdxl(device, torch.bfloat16)
        reference = ReferenceLoop(pipe, config, sorted(dataset.glob("*.png")), device, torch.bfloat16)
        times = reference.block(self.args.warmup + self.args.steps, self.args.warmup)
        del reference, pipe
        return round(sorted(times)[len(times) // 2], 3)

    # -- 3. Anima -----------------------------------------------------------------------------------
    def anima(self, rows: list[dict]) -> None:
        from anima import compare_generation, full_size_train_loader, gen_config, generation_flops
        from train import bench_config as train_config
        from train import full_size_case, make_dataset, studio_block

        from studio.training.memory_plan import plan_generation, plan_training

        scale = self.scale
        model = "anima-full-size" if self.full else "demo-anima"
        config = gen_config(scale.anima_size, scale.anima_steps, model, 4.0)
        policy = "high" if self.cuda else "cpu"

        def generation(row):
            manager = self.manager("anima", model, policy)
            try:
                result = compare_generation(manager, model, config, self.args.repeats, self.workdir / "outputs")
                row.update(studio_s_per_image=round(result["studio"], 3), plain_s_per_image=round(result["plain"], 3),
                           overhead_ratio=round(result["studio"] / result["plain"], 3), peak_vram_gib=self.peak_vram())
                if self.full:  # FLOPs counted at full-size shapes
                    with manager.use(manager.get(model)) as pipe:
                        row["mfu"] = self.mfu(generation_flops(pipe, config), result["studio"])
            finally:
                manager.unload()
            if self.full:
                plan = plan_generation("anima", None, config.width, config.height, policy=policy,
                                       device="cuda" if self.cuda else "cpu")
                row["plan_gib"] = round(plan.total / GiB, 2)
                if row.get("peak_vram_gib"):
                    row["plan_error"] = round(plan.total / GiB / row["peak_vram_gib"] - 1, 3)

        self.row(rows, {"what": "generation", "size": scale.anima_size, "steps": scale.anima_steps}, generation)
        self.drop_template("anima")
        size = scale.train_size
        dataset = make_dataset(self.workdir / "data-anima", 8, size)

        def training(row):
            bench = SimpleNamespace(resolution=size, batch=1, warmup=self.args.warmup, steps=self.args.steps)
            if not self.full:
                run = train_config(dataset, bench, pretrained_model="demo-anima", gradient_checkpointing=True,
                                   mixed_precision="no")
                block = studio_block(run, self.workdir, self.workdir / "models", self.args.warmup)
                seconds = sorted(block["times"])[len(block["times"]) // 2]
            else:
                block = full_size_case(self.workdir, dataset, bench, 1, True, True, "AdamW", size,
                                       loader=full_size_train_loader)
                run, seconds = block["config"], block["seconds"]
            row.update(s_per_step=round(seconds, 3), peak_vram_gib=round(block["train"], 2) if self.cuda else None)
            if self.full:
                from anima import train_flops

                row["mfu"] = self.mfu(train_flops(run, 1, size), seconds)
                plan = plan_training(run, "anima", None, device="cuda" if self.cuda else "cpu")
                row["plan_gib"] = round(plan.total / GiB, 2)
                if self.cuda:
                    row["plan_error"] = round(plan.total / GiB / max(block["train"], 1e-9) - 1, 3)

        self.row(rows, {"what": "training batch 1, checkpointing", "size": size}, training)

    # -- 4. Tagger ----------------------------------------------------------------------------------
    def tagger(self, rows: list[dict]) -> None:
        from caption import build_vit_tagger, write_images

        from studio.captioning.tagger import Tagger, default_providers

        def measure(row):
            folder = build_vit_tagger(self.workdir / "vit-tagger", self.scale.tagger_layers)
            providers = default_providers("cuda" if self.cuda else "cpu")
            tagger = Tagger.load(folder, providers)
            (self.workdir / "tag-images").mkdir(parents=True, exist_ok=True)
            paths = write_images(self.workdir / "tag-images", self.scale.tagger_images, (1024, 1536))
            list(tagger.tag_images(paths[:8], batch_size=8))  # warm-up
            start = time.perf_counter()
            count = len(list(tagger.tag_images(paths, batch_size=16)))
            seconds = time.perf_counter() - start
            row.update(provider=providers[0], images=count, images_per_s=round(count / seconds, 1))

        self.row(rows, {"layers": self.scale.tagger_layers, "batch": 16}, measure)

    # -- output -------------------------------------------------------------------------------------
    def paths(self) -> tuple[Path, Path]:
        name = {"demo": "gpu_suite_demo", "cpu_check": "gpu_suite_cpu_check", "gpu": "gpu_suite"}[self.mode]
        return self.args.out / f"{name}.json", self.args.out / f"{name}.md"

    def save(self) -> tuple[Path, Path]:
        """Write the JSON and the markdown as they stand (after every row: a cut-short run keeps them)."""
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.results["total_seconds"] = round(time.perf_counter() - self.started, 1)
        json_path, md_path = self.paths()
        for path, text in ((json_path, json.dumps(self.results, indent=1, default=str)),
                           (md_path, markdown(self.results))):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)
        return json_path, md_path


def markdown(results: dict) -> str:
    what = {"demo": "demo models", "cpu_check": "full size at tiny sizes, CPU check",
            "gpu": "full size, random weights"}[results.get("mode", "gpu")]
    lines = [(f"GPU suite on {results['device']} ({what}; torch {results.get('torch', '?')}), "
             f"{results.get('total_seconds', '?')} s"), ""]
    for name, section in results["sections"].items():
        lines.append(f"### {name}")
        rows = section.get("rows") or []
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row if key != "error"))
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |"
                      for row in rows]
            lines += [f"- row {i + 1} failed: {row['error']}" for i, row in enumerate(rows) if row.get("error")]
        for key in ("error", "skipped"):
            if section.get(key):
                lines.append(f"- {key}: {section[key]}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true", help="the demo models at tiny sizes, on any device")
    mode.add_argument("--cpu-check", action="store_true",
                      help="the full-size models at tiny sizes on the CPU (needs ~20 GB free RAM)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--budget", type=int, default=420, help="seconds after which no new row starts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="training: timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="training: untimed steps first")
    parser.add_argument("--only", help="comma-separated sections: sdxl_generation,sdxl_training,anima,tagger")
    args = parser.parse_args(argv)
    import torch

    if not (args.demo or args.cpu_check) and not torch.cuda.is_available():
        print("the GPU suite needs a CUDA GPU (--demo or --cpu-check check it without one)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        suite = Suite(args, Path(tmp))
        # training first: it carries the most targets (VRAM at batch 1, fp8, MFU at batch 4)
        wanted = args.only.split(",") if args.only else ["sdxl_training", "sdxl_generation", "anima", "tagger"]
        for name in wanted:
            suite.section(name, getattr(suite, name))
        json_path, md_path = suite.save()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
