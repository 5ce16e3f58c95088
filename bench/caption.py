"""Captioning throughput, measured against a baseline in the same run. Prints; never asserts.

    python bench/caption.py [--images 32] [--batch 8] [--vit-layers 2] [--captions 20000]

1. Tagger pipeline: the studio's `Tagger.tag_images` over N image files on disk (decode +
   preprocess in the thread pool, overlapped with batched inference, + post-processing), against a
   bare onnxruntime session run over the same images already preprocessed into arrays, with the
   same batch size. Reported: images/s of each and the ratio pipeline / bare.
   Models: the demo tagger (inference is nearly free, so this measures the pipeline's own cost),
   and a random-weight ViT shaped like wd-vit-tagger-v3 (448x448 NHWC BGR input, patch 16, width
   768, 12 heads, 10,861 tags) with `--vit-layers` blocks (the real model has 12; 0 skips it).
   Building the ViT needs torch and onnxscript (dev dependencies).
2. Tag post-processing: `postprocess_batch` and `postprocess` over random probability vectors
   with a WD v3-sized tag table (target: at least 50,000 captions/s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.captioning.tagger import (
    Tagger,
    TagTable,
    TagThresholds,
    open_image,
    postprocess,
    postprocess_batch,
    preprocess,
    resolve_tagger,
)

WD_V3_TAGS = {"rating": 4, "general": 8_000, "character": 2_857}  # 10,861 like wd-*-tagger-v3


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Illustration-like files (flat colours, shapes, some noise), half PNG with alpha, half JPEG."""
    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    for i in range(count):
        pixels = np.empty((h, w, 3), dtype=np.uint8)
        pixels[:] = rng.integers(120, 256, 3)
        for _ in range(12):
            top, left = rng.integers(0, h - 64), rng.integers(0, w - 64)
            bottom, right = top + rng.integers(32, h // 2), left + rng.integers(32, w // 2)
            pixels[top:bottom, left:right] = rng.integers(0, 256, 3)
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
        if i % 2:
            alpha = np.full((h, w, 1), 255, np.uint8)
            alpha[: h // 8] = 0
            path = folder / f"{i:04d}.png"
            Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA").save(path)
        else:
            path = folder / f"{i:04d}.jpg"
            Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def build_vit_tagger(folder: Path, layers: int) -> Path:
    """A random-weight ViT with wd-vit-tagger-v3's input, width and tag count, exported to ONNX."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int, heads: int):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x):
            y = self.norm1(x)
            x = x + self.attn(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class ViTTagger(nn.Module):
        def __init__(self, tags: int, side=448, patch=16, width=768, heads=12):
            super().__init__()
            self.patch = nn.Conv2d(3, width, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, (side // patch) ** 2, width) * 0.02)
            self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, tags)

        def forward(self, bgr):  # NHWC BGR 0-255, like the WD taggers
            x = bgr.permute(0, 3, 1, 2).flip(1) / 127.5 - 1.0
            x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return torch.sigmoid(self.head(self.norm(self.blocks(x)).mean(dim=1)))

    folder.mkdir(parents=True, exist_ok=True)
    table = synthetic_wd_table()
    (folder / "selected_tags.csv").write_text(
        "tag_id,name,category,count\n"
        + "".join(f"{i},{name},{category},1\n"
                  for i, (name, category) in enumerate(zip(table.names, table.categories))),
        encoding="utf-8",
    )
    torch.manual_seed(0)
    model = ViTTagger(len(table)).eval()
    example = torch.rand(2, 448, 448, 3) * 255
    torch.onnx.export(
        model, (example,), str(folder / "model.onnx"), input_names=["input"], output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False,
    )
    return folder


def synthetic_wd_table() -> TagTable:
    names = ["general", "sensitive", "questionable", "explicit"]
    names += [f"general_tag_{i}" for i in range(WD_V3_TAGS["general"])]
    names += [f"character_{i}_(series)" for i in range(WD_V3_TAGS["character"])]
    categories = [9] * 4 + [0] * WD_V3_TAGS["general"] + [4] * WD_V3_TAGS["character"]
    return TagTable(names, categories)


# ---------------------------------------------------------------------------------------------
# 1. Tagger pipeline against the bare session
# ---------------------------------------------------------------------------------------------
def bench_tagger(label: str, tagger: Tagger, paths: list[Path], batch: int, rounds: int) -> None:
    """Bare session and pipeline timed alternately, `rounds` times each; the best time of each
    counts (the machine may be shared, and noise only ever adds time)."""
    size = tagger.input.size
    arrays = [preprocess(open_image(p), size) for p in paths]
    batches = [np.stack(arrays[i:i + batch]) for i in range(0, len(arrays), batch)]
    session, name = tagger.session, tagger.input.name
    session.run(None, {name: batches[0]})  # warm-up (allocations, kernel selection)
    list(tagger.tag_images(paths[:batch], batch_size=batch))

    bare, pipeline, prep = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for array in batches:
            session.run(None, {name: array})
        bare.append(time.perf_counter() - start)

        start = time.perf_counter()
        results = list(tagger.tag_images(paths, batch_size=batch))
        pipeline.append(time.perf_counter() - start)

        start = time.perf_counter()
        for p in paths:
            preprocess(open_image(p), size)
        prep.append(time.perf_counter() - start)
    bare, pipeline, prep = min(bare), min(pipeline), min(prep)

    n = len(paths)
    tagged = sum(1 for _, r in results if hasattr(r, "tags"))
    print(f"  {label}: input {size}x{size}, batch {batch}, {n} files ({tagged} tagged), best of {rounds}")
    print(f"    bare session on prepared arrays : {n / bare:8.1f} images/s")
    print(f"    studio pipeline (files -> tags) : {n / pipeline:8.1f} images/s")
    print(f"    ratio pipeline / bare           : {bare / pipeline:8.2f}")
    print(f"    decode + preprocess, one thread : {n / prep:8.1f} images/s ({1000 * prep / n:.1f} ms/image; "
          f"pipeline / this = {prep / pipeline:.2f})")


# ---------------------------------------------------------------------------------------------
# 2. Post-processing
# ---------------------------------------------------------------------------------------------
def realistic_probs(count: int, tags: int, rng: np.random.Generator) -> np.ndarray:
    """Most tags near 0, a few dozen high, as a tagger's sigmoid outputs look on real images."""
    probs = 1 / (1 + np.exp(-rng.normal(-7.0, 2.0, (count, tags)))).astype(np.float32)
    hot = rng.integers(4, tags, (count, 40))
    np.put_along_axis(probs, hot, rng.uniform(0.2, 1.0, hot.shape).astype(np.float32), axis=1)
    return probs


def _time_postprocess(probs: np.ndarray, table: TagTable, thresholds: TagThresholds, batch: int) -> float:
    start = time.perf_counter()
    if batch == 1:
        for row in probs:
            postprocess(row, table, thresholds)
    else:
        for i in range(0, len(probs), batch):
            postprocess_batch(probs[i:i + batch], table, thresholds)
    return time.perf_counter() - start


def bench_postprocess(captions: int, rounds: int, distinct: int = 1024) -> None:
    table = synthetic_wd_table()
    pool = realistic_probs(distinct, len(table), np.random.default_rng(0))
    probs = np.concatenate([pool] * (captions // distinct + 1))[:captions]
    cases = [("fixed thresholds", TagThresholds()),
             ("fixed + 5 exclusions", TagThresholds(exclude=frozenset(f"general_tag_{i}" for i in range(5)))),
             ("MCut general + character", TagThresholds(general_mcut=True, character_mcut=True))]
    print(f"  tag table of {len(table)} tags, {captions} probability vectors ({distinct} distinct); "
          "target >= 50,000 captions/s")
    for label, thresholds in cases:
        postprocess_batch(probs[:64], table, thresholds)  # warm the threshold cache
        for batch in (64, 1):
            best = min(_time_postprocess(probs, table, thresholds, batch) for _ in range(rounds))
            print(f"    {label:26s} batch {batch:3d}: {len(probs) / best:10,.0f} captions/s")
    sample = postprocess(probs[0], table)
    counts = f"{len(sample.general)} general, {len(sample.characters)} character"
    print(f"    (a sample caption has {counts} tags)")


def bench_full_postprocess(captions: int, rounds: int, distinct: int = 1024) -> None:
    """Thresholds plus the dataset's tag rules plus joining: the whole text side of a caption."""
    from studio.captioning.tag_rules import TagRules, build_caption, join_caption

    table = synthetic_wd_table()
    pool = realistic_probs(distinct, len(table), np.random.default_rng(0))
    probs = np.concatenate([pool] * (captions // distinct + 1))[:captions]
    for template in ("animagine", "anima"):
        rules = TagRules(template=template, trigger="ohwx", year=2023, quality=["masterpiece", "best quality"],
                         exclude=["general_tag_1*"])

        def once():
            start = time.perf_counter()
            for i in range(0, len(probs), 64):
                for result in postprocess_batch(probs[i:i + 64], table):
                    join_caption(build_caption(result, rules))
            return time.perf_counter() - start

        once()  # warm the per-tag caches
        best = min(once() for _ in range(rounds))
        print(f"    thresholds + {template} rules + join : {len(probs) / best:10,.0f} captions/s (target >= 50,000)")


def bench_header_scan(folder: Path, count: int) -> None:
    """Header scan of `count` small PNG files, as opening a dataset does (sizes without decoding)."""
    from studio.dataset.config import ScanOptions
    from studio.dataset.scan import scan_headers

    folder.mkdir()
    tile = Image.new("RGB", (64, 48), "white")
    for i in range(count):
        tile.save(folder / f"{i:05d}.png", compress_level=1)
    paths = sorted(folder.glob("*.png"))
    scan_headers(paths[:100])  # warm imports
    for check in ("none", "quick"):
        start = time.perf_counter()
        headers = scan_headers(paths, ScanOptions(check=check))
        seconds = time.perf_counter() - start
        print(f"    {count} files, check={check:5s}: {seconds:.2f} s ({len(headers) / seconds:,.0f} files/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="image files to tag")
    parser.add_argument("--image-size", default="1024x1536", help="WxH of the generated files")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vit-layers", type=int, default=2,
                        help="blocks of the ViT-shaped tagger (real: 12; 0 skips it)")
    parser.add_argument("--vit-images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best of each counts")
    parser.add_argument("--captions", type=int, default=10_000, help="probability vectors to post-process")
    parser.add_argument("--scan-images", type=int, default=10_000, help="files for the header-scan benchmark")
    args = parser.parse_args()
    w, h = (int(v) for v in args.image_size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = write_images(tmp / "images", args.images, (w, h))
        print(f"1. tagger throughput ({w}x{h} files, half PNG with alpha, half JPEG)")
        demo = Tagger.load(resolve_tagger("demo-tagger", tmp / "models"))
        bench_tagger("demo-tagger", demo, paths, args.batch, args.rounds)
        if args.vit_layers > 0:
            start = time.perf_counter()
            folder = build_vit_tagger(tmp / "vit", args.vit_layers)
            vit = Tagger.load(folder)
            label = f"ViT-B/16 448 shaped, {args.vit_layers} of 12 blocks, {vit.size_bytes / 1e6:.0f} MB"
            print(f"  (built {label} in {time.perf_counter() - start:.1f} s)")
            bench_tagger(label, vit, paths[: args.vit_images], min(args.batch, 4), args.rounds)
        print("2. tag post-processing")
        bench_postprocess(args.captions, args.rounds)
        bench_full_postprocess(args.captions, args.rounds)
        print("3. dataset header scan")
        bench_header_scan(tmp / "scan", args.scan_images)


if __name__ == "__main__":
    main()
