"""Benchmark: one optimizer step of the studio's trainer against a minimal diffusers + peft loop
with the same settings, measured in the same run. Prints the overhead ratio (target <= 1.10).

    python bench/train.py                    # demo-sdxl on the CPU, 512x512, batch 2
    python bench/train.py --full-size        # GPU: a real-size SDXL with random weights at 1024x1024:
                                             # it/s, peak VRAM and model FLOP utilisation for batch 1
                                             # and 4, with and without gradient checkpointing and caching

The studio side is the real engine: `train()` on a small dataset, with cached latents and text
embeddings, timed from its own step events (the seconds between two consecutive events are one
optimizer step: batch building, forward, backward, clipping, optimizer, scheduler, event log).
The reference is what a user would write with plain diffusers + peft: the same UNet weights and
LoraConfig, a batch of latents and text embeddings encoded once up front, noise and timesteps,
MSE loss, clipping, an AdamW step and `loss.item()` for the log. The two sides run interleaved
(a block of studio steps, then a block of reference steps, repeated) so that drift on a shared
machine hits both alike; the first steps of every block are warm-up and not counted.

Nothing is asserted: the numbers are for people.

On a CPU the benchmark runs torch on one thread by default (--threads): on a small shared machine,
two OpenMP threads fighting other processes make a step 10-50x slower and erratic, which would
measure the machine, not the code.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # sdxl_full_size
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from studio.training.config import TrainConfig

CAPTIONS = ["1girl, solo, red hair, smile", "1girl, solo, blue hair", "1boy, solo, hat", "1girl, long hair, outdoors"]
# Dense bf16 tensor-core peaks (FLOP/s) by a part of the device name; PCIe H100 first.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("4090", 165e12))


# -- data -----------------------------------------------------------------------------------------
def make_dataset(folder: Path, count: int, size: int) -> Path:
    """`count` random square images with booru captions, all in one bucket."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return folder


def bench_config(dataset: Path, args, **overrides) -> TrainConfig:
    values = {
        "pretrained_model": "demo-sdxl", "datasets": [{"path": str(dataset)}], "resolution": args.resolution,
        "min_bucket_reso": 64, "max_bucket_reso": max(2048, args.resolution), "network_dim": 16,
        "network_alpha": 8.0, "learning_rate": 1e-4, "optimizer_type": "AdamW",
        "max_train_steps": args.warmup + args.steps, "train_batch_size": args.batch, "mixed_precision": "no",
        "cache_latents": True, "cache_text_encoder_outputs": True, "save_every_n_epochs": 0, "seed": 7,
    }
    values.update(overrides)
    return TrainConfig(**values)


# -- the studio side ------------------------------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def studio_block(config: TrainConfig, workdir: Path, models_dir: Path, warmup: int) -> dict:
    """Run `train()` once; seconds per optimizer step after `warmup` steps, from its step events,
    plus the peak VRAM before (setup, caching, warm-up) and after the warm-up."""
    import torch

    from studio.training.trainer import train

    stamps, peaks = [], {"setup": None, "train": 0.0}
    cuda = torch.cuda.is_available()

    def on_event(event):
        if event.kind != "step":
            return
        stamps.append(time.perf_counter())
        if cuda and event.step == warmup:
            peaks["setup"] = torch.cuda.max_memory_allocated() / 1024**3
            torch.cuda.reset_peak_memory_stats()
        elif cuda and event.step > warmup:
            peaks["train"] = max(peaks["train"], torch.cuda.max_memory_allocated() / 1024**3)

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        result = train(config, run_dir=run_dir, models_dir=models_dir, cache_dir=workdir / "cache",
                       on_event=on_event)
    except Exception as exc:  # after the timed steps (e.g. in the final save): report it, keep the timings
        if len(stamps) < config.max_train_steps:
            raise
        print(f"  warning: the studio run failed after its timed steps: {type(exc).__name__}: {exc}", flush=True)
        loras = []
    else:
        if result.status != "done":
            raise RuntimeError(f"the studio run did not finish: {result.message}")
        loras = result.loras
    times = [b - a for a, b in itertools.pairwise(stamps)][warmup - 1:]
    return {"times": times, "loras": loras, **peaks}


def lora_parameter_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        names = [k for k in fh.keys() if k.endswith(("lora_down.weight", "lora_up.weight"))]  # noqa: SIM118
        return sum(math.prod(fh.get_slice(k).get_shape()) for k in names)


# -- the reference side ---------------------------------------------------------------------------
class ReferenceLoop:
    """A minimal LoRA training step in plain diffusers + peft, on a batch encoded once."""

    def __init__(self, pipe, config: TrainConfig, images: list[Path], device: str, weight_dtype):
        import torch
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from studio.training.sdxl import unet_targets

        self.device, self.weight_dtype = device, weight_dtype
        self.autocast = weight_dtype != torch.float32
        self.unet = pipe.unet.to(device, weight_dtype)
        self.unet.requires_grad_(False)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.batch = self._encode(pipe, images[:config.train_batch_size], config.resolutions[0])
        torch.manual_seed(config.seed)
        self.unet.add_adapter(LoraConfig(r=config.network_dim, lora_alpha=config.network_alpha,
                                         target_modules=unet_targets(config.network_target), init_lora_weights=True))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.max_grad_norm = config.max_grad_norm
        self.optimizer = self._optimizer(config.optimizer_type, config.learning_rate, config.weight_decay)

    def _optimizer(self, name: str, lr: float, weight_decay: float):
        import torch

        if name == "AdamW8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self.params, lr=lr, weight_decay=weight_decay)
        fused = {"fused": True} if self.device.startswith("cuda") else {}
        return torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, **fused)

    def _encode(self, pipe, images: list[Path], size: int):
        """Latents and SDXL text conditioning of the batch, the usual diffusers way."""
        import numpy as np
        import torch
        from PIL import Image

        pipe.vae.to(self.device)
        pipe.text_encoder.to(self.device)
        pipe.text_encoder_2.to(self.device)
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)),
                                                          dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                              for p in images]).to(self.device, pipe.vae.dtype)
        captions = [p.with_suffix(".txt").read_text() for p in images]
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            text, _, pooled, _ = pipe.encode_prompt(captions, device=self.device, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(images), device=self.device)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.to("cpu")
        return latents.float(), text, pooled, time_ids

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        latents, text, pooled, time_ids = self.batch
        dtype = self.weight_dtype
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=self.autocast):
            prediction = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=text.to(dtype),
                                   added_cond_kwargs={"text_embeds": pooled.to(dtype),
                                                      "time_ids": time_ids.to(dtype)}).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def block(self, count: int, warmup: int) -> list[float]:
        times = []
        for _ in range(count):
            sync()
            start = time.perf_counter()
            self.step()
            sync()
            times.append(time.perf_counter() - start)
        return times[warmup:]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)


# -- CPU (or small-GPU) comparison on demo-sdxl ---------------------------------------------------
def run_demo(args, workdir: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from studio.models.demo import ensure_demo_sdxl

    models = workdir / "models"
    demo = ensure_demo_sdxl(models)
    count = max(4, 2 * args.batch)
    dataset = make_dataset(workdir / "data", count, args.resolution)
    bf16 = getattr(args, "precision", "fp32") == "bf16"
    config = bench_config(dataset, args, mixed_precision="bf16" if bf16 else "no")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(demo.folder))
    reference = ReferenceLoop(pipe, config, sorted(dataset.glob("*.png")), device,
                              torch.bfloat16 if bf16 else torch.float32)

    studio_times, reference_times, loras = [], [], []
    for _ in range(args.rounds):  # interleaved blocks
        block = studio_block(config, workdir, models, args.warmup)
        studio_times += block["times"]
        loras = block["loras"]
        reference_times += reference.block(args.warmup + args.steps, args.warmup)

    studio, plain = statistics.median(studio_times), statistics.median(reference_times)
    print(f"demo-sdxl on {device} ({torch.get_num_threads()} thread(s)), {args.resolution}x{args.resolution}, "
          f"batch {args.batch}, LoRA rank {config.network_dim} on {config.network_target}, AdamW, "
          f"{'bf16' if bf16 else 'fp32'}, "
          f"cached latents + text; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps")
    studio_count = f"{lora_parameter_count(loras[-1]):,}" if loras else "n/a (no LoRA file)"
    print(f"  trainable parameters: studio {studio_count}  reference {reference.parameter_count:,}")
    print(f"  s/step (median): studio {studio:.3f}  plain diffusers + peft {plain:.3f}  "
          f"ratio {studio / plain:.3f} (target <= 1.10)")
    print(f"  s/step (fastest): studio {min(studio_times):.3f}  plain {min(reference_times):.3f}  "
          f"ratio {min(studio_times) / min(reference_times):.3f}")


# -- full size on a GPU ---------------------------------------------------------------------------
def train_flops(config: TrainConfig, batch: int, size: int) -> float:
    """FLOPs of one forward + backward of the full-size UNet with the run's LoRA, counted by torch
    on the meta device (no memory, no time). Checkpointing's recomputed forward is not counted:
    MFU counts the model's FLOPs, not the extra work a memory saving costs."""
    import torch
    from diffusers import UNet2DConditionModel
    from sdxl_full_size import SDXL_UNET
    from torch.utils.flop_counter import FlopCounterMode

    from studio.training.sdxl import network_config, unet_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet.requires_grad_(False)
    unet.add_adapter(network_config(config, unet_targets(config.network_target)))
    unet.train()
    h = size // 8
    with torch.device("meta"):
        inputs = (torch.randn(batch, 4, h, h), torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 2048))
        added = {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}
    with FlopCounterMode(display=False) as counter:
        unet(*inputs, added_cond_kwargs=added).sample.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def full_size_loader(config, models_dir, device, weight_dtype, report):
    """Stands in for the trainer's model loading: the real-size random SDXL, built on the GPU."""
    from sdxl_full_size import build_full_size_sdxl

    from studio.training.sdxl import SDXLTrainingModel

    pipe = build_full_size_sdxl(str(device), weight_dtype)
    return SDXLTrainingModel(pipe, config, device, weight_dtype), SimpleNamespace(name="sdxl-full-size", family="sdxl")


def full_size_config(dataset: Path, args, batch: int, checkpointing: bool, cached: bool, optimizer: str,
                     size: int = 1024, precision: str = "bf16", **overrides) -> TrainConfig:
    """The TrainConfig of one full-size case (`args`: warmup and steps)."""
    return bench_config(dataset, SimpleNamespace(resolution=size, batch=batch, warmup=args.warmup, steps=args.steps),
                        pretrained_model="sdxl-full-size", mixed_precision=precision, optimizer_type=optimizer,
                        gradient_checkpointing=checkpointing, cache_latents=cached,
                        cache_text_encoder_outputs=cached, tensorboard=False, **overrides)


def full_size_case(workdir: Path, dataset: Path, args, batch: int, checkpointing: bool, cached: bool,
                   optimizer: str, size: int = 1024, loader=full_size_loader, precision: str = "bf16") -> dict:
    """One configuration of the full-size matrix: the studio's train() on the random SDXL."""
    from studio.training import trainer

    config = full_size_config(dataset, args, batch, checkpointing, cached, optimizer, size, precision)
    with mock.patch.object(trainer, "_load_model", loader):
        block = studio_block(config, workdir, workdir / "models", args.warmup)
    return {**block, "config": config, "seconds": statistics.median(block["times"])}


def report_case(label: str, batch: int, run, flops: dict, flops_for, peak: float | None) -> None:
    """Run one full-size case and print it/s, peak VRAM and MFU (FLOPs counted once per batch)."""

    import torch

    try:
        result = run()
    except torch.cuda.OutOfMemoryError:
        print(f"{label}: out of GPU memory", flush=True)
        result = None
    gc.collect()
    torch.cuda.empty_cache()
    if result is None:
        return
    if batch not in flops:
        flops[batch] = flops_for(result["config"])
    seconds = result["seconds"]
    line = (f"{label}: {1 / seconds:.2f} it/s ({batch / seconds:.2f} images/s), peak VRAM "
            f"{result['train']:.1f} GiB (setup {result['setup']:.1f} GiB)")
    if peak:
        line += f", MFU {flops[batch] / seconds / peak:.1%}"
    print(line, flush=True)


def print_flops(flops: dict, peak: float | None) -> None:
    print("FLOPs of one forward + backward (torch's FlopCounterMode): "
          + ", ".join(f"batch {b}: {f / 1e12:.1f} TFLOP" for b, f in flops.items())
          + (f"; MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "; unknown GPU peak: no MFU"))


def run_full_size(args, workdir: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        print("--full-size needs a CUDA GPU (a 2.6B-parameter UNet on a CPU would take hours)")
        return
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    size = 1024
    dataset = make_dataset(workdir / "data", 8, size)
    print(f"device: {name}; SDXL full size (random weights), {size}x{size}, LoRA rank 16 on attention_ff, bf16, "
          f"{args.steps} steps after {args.warmup} warm-up steps; peak VRAM during training (after warm-up) and "
          f"during setup (loading, caching, warm-up)", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    cases = [(b, ckpt, cached, "AdamW") for b in batches for ckpt in (False, True) for cached in (True, False)]
    cases += [(b, True, True, "AdamW8bit") for b in batches]
    flops: dict[int, float] = {}
    for batch, checkpointing, cached, optimizer in cases:
        label = (f"batch {batch} {optimizer:9s} checkpointing {'on ' if checkpointing else 'off'} "
                 f"cached {'yes' if cached else 'no '}")
        report_case(label, batch, lambda: full_size_case(workdir, dataset, args, batch, checkpointing, cached,
                                                         optimizer, size),
                    flops, lambda config: train_flops(config, batch, size), peak)
    print_flops(flops, peak)
    print("targets: AdamW8bit + checkpointing + cached at batch 1 <= 10 GB peak VRAM; at batch 4 >= 35% MFU on an H100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved studio/reference blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="demo: the mixed precision of both loops (bf16 on a CPU needs AVX512-BF16 or AMX)")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--batches", default="1,4", help="--full-size: batch sizes to run (e.g. 4, to split runs)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step pays one-time costs")
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside the libraries
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.full_size:
            run_full_size(args, Path(tmp))
        else:
            run_demo(args, Path(tmp))


if __name__ == "__main__":
    main()
