"""Real-size smoke runs on the CPU: full-size SDXL (base 1.0 configs) and full-size Anima (2B DiT,
Qwen3 0.6B, adapter, Qwen-Image VAE), random weights in bf16, written to disk in the layouts users
have, then through the studio's own entry points at 256x256: the manager loads and generates, the
trainer trains 2 LoRA steps (gradient checkpointing, cached latents and text) and saves the file
users load, and the Generate path reloads that file and reproduces the training sample.

Each run records seconds per step and peak RAM in `full_size_report.json` (in the test's folder
and, with STUDIO_FULL_SIZE_REPORT set, at that path). Marked slow: `.ci/run` runs them after the
default tests (`python -m pytest -m full_size`); they need about 16 GB of RAM and a CPU with bf16
(AVX512-BF16 or AMX), and are skipped without them.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.full_size]

SIZE = 256
PROMPT = "1girl, solo, red hair, smile"


def _bf16_cpu() -> bool:
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 1024**3


needs_bf16 = pytest.mark.skipif(not _bf16_cpu() or _available_gb() < 18,
                                reason="needs a CPU with bf16 (AVX512-BF16 or AMX) and 18 GB of free RAM")


def peak_ram_gb() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Report:
    def __init__(self, folder: Path, name: str):
        self.path, self.name, self.values = folder / "full_size_report.json", name, {}

    def record(self, key: str, value) -> None:
        self.values[key] = round(value, 2) if isinstance(value, float) else value
        print(f"[{self.name}] {key}: {self.values[key]}", flush=True)

    def write(self) -> None:
        self.path.write_text(json.dumps({self.name: self.values}, indent=1))
        target = os.environ.get("STUDIO_FULL_SIZE_REPORT")
        if target:
            existing = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
            Path(target).write_text(json.dumps({**existing, self.name: self.values}, indent=1))


class RssPeak:
    """The most resident memory the process gained over its level at the start of the block,
    sampled every 20 ms (what training adds: model, network, activations, caches)."""

    def __enter__(self):
        import threading

        import psutil

        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def make_dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(PROMPT)
    return folder


def manager_for(models: Path):
    from studio.models.devices import DeviceInfo
    from studio.models.manager import ModelManager

    return ModelManager(models, requested_policy="cpu", device=DeviceInfo("cpu", "CPU", bf16=True))


def timed_generate(manager, out: Path, report: Report, key: str, **fields):
    from studio.generation.generate import generate
    from studio.schemas import GenerateConfig

    config = GenerateConfig(**{"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": 2, "seed": 11, **fields})
    start = time.perf_counter()
    result = generate(manager, config, outputs_dir=out, default_model="demo-sdxl")
    report.record(f"{key}_seconds", time.perf_counter() - start)
    report.record(f"{key}_peak_ram_gb", peak_ram_gb())
    return result.images[0]


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def train_and_reproduce(model: str, family: str, tmp_path: Path, models: Path, report: Report, manager,
                        generate_model: str, base, **train_fields):
    """2 LoRA steps through the trainer, a sample of the final step, then the saved file through
    the Generate path (`generate_model`) with the sample's own settings: the images agree, and
    differ from `base` (the same settings without the LoRA)."""
    from studio.generation.infotext import parse_infotext, read_infotext
    from studio.models.lora_format import inspect_lora
    from studio.training.config import TrainConfig
    from studio.training.loop import read_events
    from studio.training.trainer import train

    config = TrainConfig(
        pretrained_model=model, datasets=[{"path": str(make_dataset(tmp_path / "data"))}], resolution=SIZE,
        min_bucket_reso=SIZE, max_bucket_reso=SIZE, network_dim=4, network_alpha=4.0, learning_rate=1e-2,
        max_train_steps=2, train_batch_size=1, mixed_precision="bf16", gradient_checkpointing=True,
        cache_latents=True, cache_text_encoder_outputs=True, save_every_n_epochs=0, tensorboard=False, seed=3,
        sample_prompts=[PROMPT], sample_every_n_steps=2, sample_steps=2, sample_size=(SIZE, SIZE),
        output_name=f"full-{family}", **train_fields,
    )
    from studio.training.memory_plan import config_folder_for, plan_training

    found_family, folder = config_folder_for(config, models)
    plan = plan_training(config, found_family, folder, device="cpu")
    report.record("plan_gb", plan.total / 1024**3)
    report.record("plan_parts", plan.details())
    start = time.perf_counter()
    with RssPeak() as rss:
        result = train(config, run_dir=tmp_path / "run", models_dir=models, cache_dir=tmp_path / "cache")
    assert result.status == "done", result
    report.record("train_measured_gb", rss.peak_delta / 1024**3)
    report.record("plan_error", plan.total / rss.peak_delta - 1)
    assert abs(plan.total / rss.peak_delta - 1) < 0.3, "the memory plan is near the measured peak (goal: 15%)"
    events = read_events(result.run_dir)
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == [1, 2] and all(np.isfinite(e["loss"]) for e in steps)
    report.record("train_seconds_total", time.perf_counter() - start)
    report.record("train_seconds_per_step", 1 / steps[-1]["it_s"])  # over both steps, without loading
    report.record("train_peak_ram_gb", peak_ram_gb())
    lora = result.loras[-1]
    info = inspect_lora(lora)
    assert info.family == family and info.modules > 0
    report.record("lora_file", lora.name)
    sample = result.run_dir / "samples" / "step000002-0.png"
    prompt, negative, params = parse_infotext(read_infotext(sample))
    gc.collect()

    from studio.schemas import LoraSpec

    again = timed_generate(manager, tmp_path / "out", report, "generate_with_lora", model=generate_model,
                           prompt=prompt, negative_prompt=negative, seed=int(params["Seed"]),
                           sampler=params["Sampler"], cfg_scale=float(params["CFG scale"]),
                           style={"quality_tags": False, "default_negative": False},
                           loras=[LoraSpec(path=str(lora), weight=1.0)])
    difference = np.abs(pixels(again.path) - pixels(sample)).mean()
    report.record("sample_vs_generate_mean_abs", float(difference))
    assert difference < 4, "the reloaded LoRA makes the training sample's image"
    assert np.abs(pixels(again.path) - pixels(base.path)).mean() > difference, "and the LoRA changed the image"


@needs_bf16
def test_full_size_sdxl(tmp_path):
    import torch

    from bench.sdxl_full_size import UNET_PARAMETERS, build_full_size_sdxl
    from studio.models.sgm_convert import sdxl_pipeline_to_sgm

    report = Report(tmp_path, "sdxl")
    models = tmp_path / "models"
    start = time.perf_counter()
    pipe = build_full_size_sdxl(device="cpu", dtype=torch.bfloat16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == UNET_PARAMETERS
    folder = models / "sdxl-full"
    pipe.save_pretrained(folder, safe_serialization=True)
    from safetensors.torch import save_file

    single = models / "sdxl-full-single.safetensors"
    save_file({k: v.contiguous() for k, v in sdxl_pipeline_to_sgm(pipe).items()}, str(single))
    del pipe
    gc.collect()
    report.record("build_and_write_seconds", time.perf_counter() - start)

    manager = manager_for(models)
    # the training sample's settings (sample_seed, Euler a, CFG 6), without the LoRA
    as_sample = {"seed": 1234, "sampler": "Euler a", "cfg_scale": 6.0,
                 "style": {"quality_tags": False, "default_negative": False}}
    from studio.training.memory_plan import plan_generation

    plan = plan_generation("sdxl", folder, SIZE, SIZE, policy="high", device="cpu", dtype_bytes=2)
    gc.collect()
    with RssPeak() as rss:
        base = timed_generate(manager, tmp_path / "out", report, "generate_folder", model=str(folder), **as_sample)
    report.record("generate_plan_gb", plan.total / 1024**3)
    report.record("generate_measured_gb", rss.peak_delta / 1024**3)
    report.record("generate_plan_error", plan.total / rss.peak_delta - 1)
    assert abs(plan.total / rss.peak_delta - 1) < 0.3, "the generation plan is near the measured peak"
    assert pixels(base.path).std() > 1
    manager.unload()
    single_image = timed_generate(manager, tmp_path / "out", report, "generate_single_file", model=str(single),
                                  **as_sample)
    assert np.abs(pixels(single_image.path) - pixels(base.path)).max() <= 2, "the SGM file is the same model"
    manager.unload()
    gc.collect()

    train_and_reproduce(str(folder), "sdxl", tmp_path, models, report, manager, str(folder), base)
    report.write()


@needs_bf16
def test_full_size_anima(tmp_path):
    """Anima at real size, as a diffusers folder and as ComfyUI's three files: both load and make
    the same image, the trainer trains from ComfyUI's files, and its LoRA reproduces the sample."""
    import torch

    from bench.anima_full_size import build_full_size_anima
    from studio.models.demo_anima import _index_without_locations
    from tests.anima_comfy_fixture import write_comfy_anima

    report = Report(tmp_path, "anima")
    models = tmp_path / "models"
    start = time.perf_counter()
    pipe = build_full_size_anima("cpu", torch.bfloat16)
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 1.9e9
    folder = models / "anima-full"
    pipe.save_pretrained(str(folder), safe_serialization=True, overwrite_modular_index=True)
    _index_without_locations(folder)
    comfy = write_comfy_anima(pipe, tmp_path / "ComfyUI" / "models", dit_name="anima-full.safetensors",
                              dtype=torch.bfloat16)
    del pipe
    gc.collect()
    report.record("build_and_write_seconds", time.perf_counter() - start)

    manager = manager_for(models)
    as_sample = {"seed": 1234, "sampler": "Euler", "cfg_scale": 6.0,
                 "style": {"quality_tags": False, "default_negative": False}}
    base = timed_generate(manager, tmp_path / "out", report, "generate_folder", model=str(folder), **as_sample)
    assert pixels(base.path).std() > 1
    manager.unload()
    from_comfy = timed_generate(manager, tmp_path / "out", report, "generate_comfyui_files", model=str(comfy),
                                **as_sample)
    assert np.abs(pixels(from_comfy.path) - pixels(base.path)).max() <= 2, "ComfyUI's files are the same model"
    manager.unload()
    gc.collect()

    train_and_reproduce(str(comfy), "anima", tmp_path, models, report, manager, str(comfy), base)
    report.write()
