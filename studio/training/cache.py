"""On-disk caches of VAE latents and text-encoder outputs, reused across runs.

A latent is keyed by the image's content, its bucket, resize, crop and flip, and the VAE's
identity, so a changed image, bucket or VAE never reads a stale entry. Latents are stored as the
VAE's posterior mean and std: each step draws its own sample, as an uncached run would. Text
outputs are keyed by the caption text and the text encoders' identity."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from studio.fileio import atomic_path
from studio.training.data import TrainSample

_file_hashes: dict[tuple[str, int, int], str] = {}
_file_hashes_lock = threading.Lock()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _file_hashes_lock:
        if key in _file_hashes:
            return _file_hashes[key]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with _file_hashes_lock:
        _file_hashes[key] = digest
    return digest


def module_identity(*modules) -> str:
    """A short id of model weights: config plus a checksum of every parameter (cheap: a few sums)."""
    import torch

    digest = hashlib.sha256()
    for module in modules:
        config = getattr(module, "config", None)
        digest.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config or {}),
                                 sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, param in module.state_dict().items():
                flat = param.detach().float().flatten()
                digest.update(name.encode())
                digest.update(f"{flat.sum().item():.6e}/{flat[::max(1, flat.numel() // 64)].sum().item():.6e}".encode())
    return digest.hexdigest()[:16]


class TensorCache:
    """key -> tuple of tensors, in memory and as safetensors files under `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.memory: dict[str, tuple] = {}
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> tuple | None:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        path = self._path(key)
        if path.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            value = tuple(tensors[f"t{i}"].clone() for i in range(len(tensors)))
            self.memory[key] = value
            self.hits += 1
            return value
        return None

    def store(self, key: str, value: tuple) -> None:
        from safetensors.torch import save_file

        self.misses += 1
        value = tuple(t.detach().to("cpu").contiguous() for t in value)
        self.memory[key] = value
        with atomic_path(self._path(key)) as tmp:
            save_file({f"t{i}": t for i, t in enumerate(value)}, str(tmp))


class LatentCache(TensorCache):
    def __init__(self, root: Path, vae_id: str, encode: Callable):
        super().__init__(root / "latents" / vae_id)
        self.vae_id, self.encode = vae_id, encode

    def key(self, sample: TrainSample, flip: bool) -> str:
        parts = [file_digest(sample.image), sample.bucket, sample.resized, sample.crop, flip, self.vae_id]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def get(self, sample: TrainSample, flip: bool) -> tuple:
        """(mean, std) of the sample's posterior, each (C, h, w) float32 on the CPU."""
        key = self.key(sample, flip)
        value = self.load(key)
        if value is None:
            from studio.training.data import load_pixels

            mean, std = self.encode(load_pixels(sample, flip)[None])
            value = (mean[0].float(), std[0].float())
            self.store(key, value)
        return value


class TextCache(TensorCache):
    def __init__(self, root: Path, text_id: str, encode: Callable):
        super().__init__(root / "text" / text_id)
        self.text_id, self.encode = text_id, encode

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.text_id}\0{caption}".encode()).hexdigest()

    def get(self, caption: str) -> tuple:
        key = self.key(caption)
        value = self.load(key)
        if value is None:
            value = tuple(t[0] for t in self.encode([caption]))
            self.store(key, value)
        return value
