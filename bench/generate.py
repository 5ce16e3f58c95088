"""Benchmark: the studio's generate() against a plain diffusers pipeline call with the same
settings, measured in the same run. Prints the overhead ratio (target <= 1.05).

    python bench/generate.py                 # demo-sdxl on the CPU (or on the GPU if there is one)
    python bench/generate.py --full-size     # GPU: a real-size SDXL with random weights, 832x1216, 28 steps,
                                             # s/image, peak VRAM per VRAM policy, model FLOP utilisation

Nothing is asserted: the numbers are for people. Both sides use the same pipeline object, the same
sampler and the same seed; the studio side also writes the PNG with its infotext.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.generation.generate import generate  # noqa: E402
from studio.generation.samplers import make_scheduler  # noqa: E402
from studio.models.catalog import CatalogEntry  # noqa: E402
from studio.models.loaders import LoadedModel  # noqa: E402
from studio.models.manager import ModelManager  # noqa: E402
from studio.models.vram import pipeline_bytes  # noqa: E402
from studio.schemas import GenerateConfig, PromptStyle  # noqa: E402

PROMPT = "1girl, hatsune miku, vocaloid, solo, long hair, twintails, smile, looking at viewer, outdoors"
NEGATIVE = "lowres, bad anatomy, worst quality"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def timed(fn, repeats: int) -> list[float]:
    import torch

    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def compare(manager: ModelManager, model: str, config: GenerateConfig, repeats: int, outputs: Path) -> dict:
    """Median seconds per image for the studio and for plain diffusers, interleaved warm-ups first."""
    import torch

    record = manager.get(model)
    pipe = record.model

    def studio():
        generate(manager, config, outputs_dir=outputs, default_model=model)

    def plain():
        pipe.scheduler = make_scheduler(config.sampler, dict(pipe.scheduler.config))
        pipe(prompt=config.prompt, negative_prompt=config.negative_prompt, width=config.width, height=config.height,
             num_inference_steps=config.steps, guidance_scale=config.cfg_scale,
             generator=torch.Generator("cpu").manual_seed(config.seed)).images[0]

    studio(), plain()  # warm-up: first-use costs (hashing, kernels) are not what we measure
    studio_times, plain_times = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both sides alike
        studio_times += timed(studio, 1)
        plain_times += timed(plain, 1)
    return {"studio": statistics.median(studio_times), "plain": statistics.median(plain_times)}


def bench_config(size: str, steps: int, model: str) -> GenerateConfig:
    width, height = (int(v) for v in size.split("x"))
    return GenerateConfig(model=model, prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height,
                          steps=steps, cfg_scale=6.0, seed=1234,
                          style=PromptStyle(quality_tags=False, default_negative=False))


def unet_flops_per_image(pipe, config: GenerateConfig) -> float:
    """FLOPs of the denoising loop (UNet, batch 2 for CFG) plus one VAE decode, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, device, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    h, w = config.height // 8, config.width // 8
    latents = torch.randn(2, 4, h, w, device=device, dtype=dtype)
    text = torch.randn(2, 77, 2048, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
             "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([500], device=device), text, added_cond_kwargs=added)
    unet_flops = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.vae.decode(latents[:1].to(pipe.vae.dtype))
    return unet_flops * config.steps + counter.get_total_flops()


def run_full_size(args, outputs: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sdxl_full_size import build_full_size_sdxl

    if not torch.cuda.is_available():
        print("--full-size needs a CUDA GPU (a 2.6B-parameter UNet on a CPU would take hours)")
        return
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    config = bench_config("832x1216", 28, "sdxl-full-size")
    catalog = {"sdxl-full-size": CatalogEntry("sdxl-full-size", "SDXL full size, random weights", "sdxl", "bench:full")}
    print(f"device: {name}; SDXL full size (random weights), 832x1216, 28 steps, Euler a, CFG 6")
    for policy in args.policies.split(","):
        def loader(source, models_dir, dtype, device, progress):
            pipe = build_full_size_sdxl("cpu", torch.bfloat16)
            total, largest = pipeline_bytes(pipe)
            return LoadedModel(pipe, total, largest, None)

        manager = ModelManager(outputs / "models", requested_policy=policy, catalog=catalog, loader=loader)
        torch.cuda.reset_peak_memory_stats()
        result = compare(manager, "sdxl-full-size", config, args.repeats, outputs)
        peak_vram = torch.cuda.max_memory_allocated() / 1024**3
        record = manager.get("sdxl-full-size")
        line = (f"policy {policy:6s}: studio {result['studio']:.2f} s/image, plain diffusers {result['plain']:.2f} "
                f"s/image, ratio {result['studio'] / result['plain']:.3f}, peak VRAM {peak_vram:.1f} GiB")
        if policy == "high" and peak:
            with manager.use(record) as pipe:
                flops = unet_flops_per_image(pipe, config)
            line += f", MFU {flops / result['studio'] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
        print(line, flush=True)
        manager.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--policies", default="high,normal,low")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outputs = Path(tmp)
        if args.full_size:
            run_full_size(args, outputs)
            return
        from studio.models.demo import ensure_demo_sdxl

        ensure_demo_sdxl(outputs / "models")
        manager = ModelManager(outputs / "models", requested_policy="auto")
        config = bench_config(args.size, args.steps, "demo-sdxl")
        result = compare(manager, "demo-sdxl", config, args.repeats, outputs)
        device = manager.device.name
        print(f"demo-sdxl on {device}, {args.size}, {args.steps} steps, {args.repeats} repeats (median s/image):")
        print(f"  studio generate() {result['studio']:.3f}  plain diffusers {result['plain']:.3f}  "
              f"ratio {result['studio'] / result['plain']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
