"""Benchmark: Anima in the studio against plain diffusers (+ peft), both sides in the same run.

    python bench/anima.py                    # demo-anima on the CPU: generation and training ratios
    python bench/anima.py --full-size        # GPU only: a real-size Anima with random weights at 1024x1024

1. Generation: the studio's generate() on demo-anima against a plain `AnimaModularPipeline` call on
   the same components (same steps, size, CFG guider, seed, Euler flow-matching scheduler), calls
   interleaved, median s/image; prints the overhead ratio (target <= 1.05). The studio side also
   writes the PNG with its infotext.
2. Training: one optimizer step of the studio's `train()` on demo-anima (timed from its own step
   events, as bench/train.py does, whose helpers this reuses) against a minimal loop written with
   plain diffusers + peft on the same transformer weights: the same LoRA config (rank, alpha, target
   modules), a batch of latents and text embeddings encoded once up front, rectified-flow loss
   x_t = (1 - s) x0 + s noise with target noise - x0, clipping, AdamW and `loss.item()`. Blocks of
   studio steps and reference steps alternate; prints the ratio (target <= 1.10).
3. `--full-size` (CUDA GPU only; it was written on a machine without a GPU and has NOT been run
   there, only its configs were checked): the real Anima sizes (Cosmos-Predict2 2B DiT, Qwen3-0.6B,
   the LLM adapter, the Qwen-Image VAE; see bench/anima_full_size.py) with random weights, 1024x1024:
   s/image at 30 steps per VRAM policy with the plain-call ratio, training it/s for batch 1 and 4
   with and without gradient checkpointing, peak VRAM, and model FLOP utilisation from torch's
   FlopCounterMode on one forward (+ backward).

Every run starts with a quick self-check that builds the full-size configs on the meta device and
prints their parameter counts (the DiT should be about 2.0B, the text encoder about 0.6B).

Nothing is asserted: the numbers are for people. On a CPU torch runs one thread by default
(--threads), for the reason bench/train.py gives.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from train import PEAK_BF16_FLOPS, full_size_case, make_dataset, print_flops, report_case, studio_block, sync
from train import bench_config as train_bench_config

from studio.schemas import GenerateConfig, PromptStyle

PROMPT = "1girl, hatsune miku, vocaloid, solo, long hair, twintails, smile, looking at viewer, outdoors"
NEGATIVE = "lowres, bad anatomy, worst quality"
MODEL = "demo-anima"


def peak_flops() -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name(0)
    return name, next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# -- meta-device self-check -------------------------------------------------------------------
def self_check() -> None:
    from anima_full_size import parameter_counts

    counts = parameter_counts()
    print("full-size configs on the meta device (parameters): "
          + ", ".join(f"{name} {count / 1e9:.3f}B ({count:,})" for name, count in counts.items()), flush=True)


# -- generation ---------------------------------------------------------------------------------
def gen_config(size: str, steps: int, model: str, cfg: float) -> GenerateConfig:
    width, height = (int(v) for v in size.split("x"))
    return GenerateConfig(model=model, prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height,
                          steps=steps, cfg_scale=cfg, seed=1234, sampler="Euler",
                          style=PromptStyle(quality_tags=False, default_negative=False))


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def compare_generation(manager, model: str, config: GenerateConfig, repeats: int, outputs: Path) -> dict:
    """Median seconds per image: studio generate() and a plain AnimaModularPipeline call, interleaved."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines import LoopSequentialPipelineBlocks

    from studio.generation.generate import generate
    from studio.models.anima_compat import BLOCK_ERROR_LOGGER, GUIDER_LOGGER, quiet_logger

    record = manager.get(model)
    pipe = record.model
    base_scheduler = dict(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    blocks = [getattr(pipe, "_blocks", None) or pipe.blocks]  # `blocks` returns a copy
    while blocks:  # the denoising loops' progress bars off, as the studio turns off its own
        block = blocks.pop()
        if isinstance(block, LoopSequentialPipelineBlocks):
            block.set_progress_bar_config(disable=True)
        blocks += list((getattr(block, "sub_blocks", None) or {}).values())

    def studio():
        generate(manager, config, outputs_dir=outputs, default_model=model)

    def plain():
        with quiet_logger(GUIDER_LOGGER):
            guider = pipe.get_component_spec("guider").create(guidance_scale=config.cfg_scale)
        pipe.update_components(scheduler=FlowMatchEulerDiscreteScheduler.from_config(base_scheduler), guider=guider)
        with manager.use(record), quiet_logger(BLOCK_ERROR_LOGGER):  # the same placement the studio gets
            pipe(prompt=config.prompt, negative_prompt=config.negative_prompt, width=config.width,
                 height=config.height, num_inference_steps=config.steps, max_sequence_length=512,
                 generator=torch.Generator("cpu").manual_seed(config.seed), output_type="pil", output="images")[0]

    studio(), plain()  # warm-up: first-use costs (hashing, runner, kernels) are not what we measure
    studio_times, plain_times = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both sides alike
        studio_times.append(timed(studio))
        plain_times.append(timed(plain))
    return {"studio": statistics.median(studio_times), "plain": statistics.median(plain_times)}


def run_demo_generation(args, workdir: Path) -> None:
    from studio.models.demo_anima import ensure_demo_anima
    from studio.models.manager import ModelManager

    ensure_demo_anima(workdir / "models")
    manager = ModelManager(workdir / "models", requested_policy="auto")
    config = gen_config(args.size, args.gen_steps, MODEL, args.cfg)
    result = compare_generation(manager, MODEL, config, args.repeats, workdir / "outputs")
    print(f"generation: demo-anima on {manager.device.name}, {args.size}, {args.gen_steps} steps, Euler, "
          f"CFG {args.cfg}, {args.repeats} repeats (median s/image):")
    print(f"  studio generate() {result['studio']:.3f}  plain AnimaModularPipeline {result['plain']:.3f}  "
          f"ratio {result['studio'] / result['plain']:.3f} (target <= 1.05)", flush=True)
    manager.unload()


def lora_parameter_count(path: Path) -> int:
    """LoRA parameters in an exported Anima file (lora_A / lora_B pairs, ComfyUI layout)."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        names = [k for k in fh.keys() if k.endswith(("lora_A.weight", "lora_B.weight"))]  # noqa: SIM118
        return sum(math.prod(fh.get_slice(k).get_shape()) for k in names)


# -- training: the reference loop ---------------------------------------------------------------
class AnimaReferenceLoop:
    """A minimal Anima LoRA step in plain diffusers + peft, on a batch encoded once."""

    def __init__(self, pipe, config, images: list[Path], device: str, weight_dtype):
        import torch
        from peft import LoraConfig

        from studio.training.anima import transformer_targets

        self.device, self.weight_dtype = device, weight_dtype
        self.autocast = weight_dtype != torch.float32
        self.transformer = pipe.transformer.to(device, weight_dtype)
        self.transformer.requires_grad_(False)
        self.shift = pipe.scheduler.config.shift
        self.batch = self._encode(pipe, images[:config.train_batch_size], config.resolutions[0])
        torch.manual_seed(config.seed)
        self.transformer.add_adapter(LoraConfig(r=config.network_dim, lora_alpha=config.network_alpha,
                                                target_modules=transformer_targets(config.network_target),
                                                init_lora_weights=True))
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.max_grad_norm = config.max_grad_norm
        fused = {"fused": True} if device.startswith("cuda") else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                           **fused)

    def _encode(self, pipe, images: list[Path], size: int):
        """Normalised 5-D VAE latents and the DiT's text embeddings (Qwen3 states + T5 ids through the
        LLM adapter) of the batch."""
        import numpy as np
        import torch
        from PIL import Image

        vae, encoder, conditioner = pipe.vae.to(self.device), pipe.text_encoder.to(self.device), \
            pipe.text_conditioner.to(self.device)
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)),
                                                          dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                              for p in images]).to(self.device, vae.dtype)
        captions = [p.with_suffix(".txt").read_text() for p in images]
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(1, z, 1, 1, 1)
        with torch.no_grad():
            latents = (vae.encode(pixels[:, :, None]).latent_dist.sample().float() - mean) / std
            qwen = pipe.tokenizer(captions, padding="longest", max_length=512, truncation=True, return_tensors="pt")
            t5 = pipe.t5_tokenizer(captions, padding="longest", max_length=512, truncation=True, return_tensors="pt")
            mask = qwen.attention_mask.to(self.device)
            states = encoder(input_ids=qwen.input_ids.to(self.device), attention_mask=mask).last_hidden_state
            states = states * mask.to(states).unsqueeze(-1)
            text = conditioner(source_hidden_states=states.to(self.weight_dtype),
                               target_input_ids=t5.input_ids.to(self.device),
                               target_attention_mask=t5.attention_mask.to(self.device), source_attention_mask=mask)
        for module in (vae, encoder, conditioner):
            module.to("cpu")
        return latents, text

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        latents, text = self.batch
        dtype = self.weight_dtype
        noise = torch.randn_like(latents)
        s = torch.sigmoid(torch.randn(latents.shape[0], device=self.device))  # logit-normal, shifted
        s = self.shift * s / (1 + (self.shift - 1) * s)
        sv = s.view(-1, 1, 1, 1, 1)
        noisy = (1 - sv) * latents + sv * noise
        padding_mask = noisy.new_zeros(1, 1, latents.shape[-2] * 8, latents.shape[-1] * 8, dtype=dtype)
        with torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=self.autocast):
            prediction = self.transformer(hidden_states=noisy.to(dtype), timestep=s.to(dtype),
                                          encoder_hidden_states=text.to(dtype), padding_mask=padding_mask,
                                          return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise - latents)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def block(self, count: int, warmup: int) -> list[float]:
        times = []
        for _ in range(count):
            times.append(timed(self.step))
        return times[warmup:]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)


def load_plain_pipeline(folder: Path):
    """demo-anima as a user would load it with diffusers (plus the studio's torchvision shim)."""
    from diffusers import AnimaModularPipeline

    from studio.models.anima_compat import GUIDER_LOGGER, ensure_cosmos_resize, quiet_logger

    ensure_cosmos_resize()  # the DiT's padding-mask resize needs torchvision otherwise
    with quiet_logger(GUIDER_LOGGER):
        pipe = AnimaModularPipeline.from_pretrained(str(folder))
    pipe.load_components()
    return pipe


def run_demo_training(args, workdir: Path) -> None:
    import torch

    from studio.models.demo_anima import ensure_demo_anima

    models = workdir / "models"
    folder = ensure_demo_anima(models)
    dataset = make_dataset(workdir / "data", max(4, 2 * args.batch), args.resolution)
    config = train_bench_config(dataset, args, pretrained_model=MODEL, tensorboard=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = AnimaReferenceLoop(load_plain_pipeline(folder), config, sorted(dataset.glob("*.png")), device,
                                   torch.float32)
    studio_times, reference_times, loras = [], [], []
    for _ in range(args.rounds):  # interleaved blocks
        block = studio_block(config, workdir, models, args.warmup)
        studio_times += block["times"]
        loras = block["loras"] or loras
        reference_times += reference.block(args.warmup + args.steps, args.warmup)
    studio, plain = statistics.median(studio_times), statistics.median(reference_times)
    print(f"training: demo-anima on {device} ({torch.get_num_threads()} thread(s)), "
          f"{args.resolution}x{args.resolution}, batch {args.batch}, LoRA rank {config.network_dim} on "
          f"{config.network_target}, AdamW, fp32, cached latents + text; {args.rounds} rounds x {args.steps} "
          f"steps after {args.warmup} warm-up steps")
    studio_count = f"{lora_parameter_count(loras[-1]):,}" if loras else "n/a (no LoRA file)"
    print(f"  trainable parameters: studio {studio_count}  reference {reference.parameter_count:,}")
    print(f"  s/step (median): studio {studio:.3f}  plain diffusers + peft {plain:.3f}  "
          f"ratio {studio / plain:.3f} (target <= 1.10)")
    print(f"  s/step (fastest): studio {min(studio_times):.3f}  plain {min(reference_times):.3f}  "
          f"ratio {min(studio_times) / min(reference_times):.3f}", flush=True)


# -- full size on a GPU -------------------------------------------------------------------------
def generation_flops(pipe, config: GenerateConfig) -> float:
    """FLOPs of one image: the DiT at batch 2 (CFG) per step, plus one VAE decode, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    transformer, vae = pipe.transformer, pipe.vae
    device, dtype = transformer.device, transformer.dtype
    h, w = config.height // 8, config.width // 8
    latents = torch.randn(2, 16, 1, h, w, device=device, dtype=dtype)
    text = torch.randn(2, 512, 1024, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, config.height, config.width, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(hidden_states=latents, timestep=torch.full((2,), 0.5, device=device, dtype=dtype),
                    encoder_hidden_states=text, padding_mask=mask, return_dict=False)
    dit = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(latents[:1].to(vae.dtype))
    return dit * config.steps + counter.get_total_flops()


def train_flops(config, batch: int, size: int) -> float:
    """FLOPs of one forward + backward of the full-size DiT with the run's LoRA, on the meta device."""
    import torch
    from anima_full_size import ANIMA_TRANSFORMER
    from diffusers import CosmosTransformer3DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from studio.training.anima import transformer_targets

    with torch.device("meta"):
        transformer = CosmosTransformer3DModel(**ANIMA_TRANSFORMER)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config.network_dim, lora_alpha=config.network_alpha,
                                       target_modules=transformer_targets(config.network_target)))
    transformer.train()
    h = size // 8
    with torch.device("meta"):
        inputs = dict(hidden_states=torch.randn(batch, 16, 1, h, h), timestep=torch.rand(batch),
                      encoder_hidden_states=torch.randn(batch, 512, 1024), padding_mask=torch.zeros(1, 1, size, size))
    with FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)[0].float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def full_size_train_loader(config, models_dir, device, weight_dtype, report):
    """Stands in for the trainer's model loading: the real-size random Anima, built on the GPU."""
    from anima_full_size import build_full_size_anima

    from studio.training.anima import AnimaTrainingModel

    pipe = build_full_size_anima(str(device), weight_dtype)
    return AnimaTrainingModel(pipe, config, device, weight_dtype), SimpleNamespace(name="anima-full-size",
                                                                                   family="anima")


def run_full_size(args, workdir: Path) -> None:
    import torch

    from studio.models.catalog import CatalogEntry
    from studio.models.loaders import LoadedModel
    from studio.models.manager import ModelManager
    from studio.models.vram import pipeline_bytes

    if not torch.cuda.is_available():
        print("--full-size needs a CUDA GPU (a 2B-parameter DiT at 1024x1024 on a CPU would take hours)")
        return
    from anima_full_size import build_full_size_anima

    name, peak = peak_flops()
    model = "anima-full-size"
    config = gen_config("1024x1024", 30, model, args.cfg)
    catalog = {model: CatalogEntry(model, "Anima full size, random weights", "anima", "bench:full")}
    print(f"device: {name}; Anima full size (random weights), 1024x1024, 30 steps, Euler, CFG {args.cfg}", flush=True)

    def loader(source, models_dir, dtype, device, progress):
        pipe = build_full_size_anima("cpu", torch.bfloat16)
        total, largest = pipeline_bytes(pipe)
        return LoadedModel(pipe, total, largest, None)

    for policy in args.policies.split(","):
        manager = ModelManager(workdir / "models", requested_policy=policy, catalog=catalog, loader=loader)
        torch.cuda.reset_peak_memory_stats()
        try:
            result = compare_generation(manager, model, config, args.repeats, workdir / "outputs")
        except torch.cuda.OutOfMemoryError:
            print(f"policy {policy:6s}: out of GPU memory", flush=True)
            manager.unload()
            continue
        peak_vram = torch.cuda.max_memory_allocated() / 1024**3
        line = (f"policy {policy:6s}: studio {result['studio']:.2f} s/image, plain {result['plain']:.2f} s/image, "
                f"ratio {result['studio'] / result['plain']:.3f}, peak VRAM {peak_vram:.1f} GiB")
        if policy == "high" and peak:
            record = manager.get(model)
            with manager.use(record) as pipe:
                flops = generation_flops(pipe, config)
            line += f", MFU {flops / result['studio'] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
        print(line, flush=True)
        manager.unload()
        gc.collect()
        torch.cuda.empty_cache()

    size = 1024
    dataset = make_dataset(workdir / "data", 8, size)
    print(f"training: LoRA rank 16 on attention_ff, bf16, AdamW, cached latents + text, {args.steps} steps after "
          f"{args.warmup} warm-up steps; peak VRAM during training (after warm-up) and during setup", flush=True)
    flops: dict[int, float] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        for checkpointing in (False, True):
            label = f"batch {batch} checkpointing {'on ' if checkpointing else 'off'}"
            report_case(label, batch, lambda: full_size_case(workdir, dataset, args, batch, checkpointing, True,
                                                             "AdamW", size, loader=full_size_train_loader),
                        flops, lambda config: train_flops(config, batch, size), peak)
    print_flops(flops, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="generation: timed calls per side")
    parser.add_argument("--size", default="512x512", help="generation size (multiples of 16)")
    parser.add_argument("--gen-steps", type=int, default=8, help="generation: sampling steps")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--resolution", type=int, default=512, help="training resolution")
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--steps", type=int, default=8, help="training: timed steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="training: untimed steps at the start of each block")
    parser.add_argument("--rounds", type=int, default=3, help="training: interleaved studio/reference blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip", choices=("generation", "training"), help="leave one half out")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--policies", default="high,normal,low", help="--full-size: VRAM policies for generation")
    parser.add_argument("--batches", default="1,4", help="--full-size: training batch sizes")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step pays one-time costs")
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    self_check()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.full_size:
            run_full_size(args, workdir)
            return
        if args.skip != "generation":
            run_demo_generation(args, workdir)
        if args.skip != "training":
            run_demo_training(args, workdir)


if __name__ == "__main__":
    main()
