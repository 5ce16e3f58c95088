"""Near-duplicate detection by perceptual hash: the same picture resized, recompressed or slightly
retouched hashes to nearly the same 64 bits; a different picture differs in about half of them.

pHash (default): grayscale 32x32, 2-D DCT-II, the 8x8 lowest frequencies, one bit per coefficient
above their median. dHash: grayscale 9x8, one bit per horizontally adjacent pair (left brighter).
Images are grouped when a chain of pairs lies within `max_distance` differing bits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from studio.dataset.images import load_rgb
from studio.dataset.model import Problem
from studio.errors import DatasetError

HashMethod = Literal["phash", "dhash"]
DEFAULT_MAX_DISTANCE = 6  # of 64 bits; copies are 0-4 apart, unrelated images around 32


def dhash(image: Image.Image) -> int:
    gray = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return _bits_to_int(gray[:, :-1] > gray[:, 1:])


def phash(image: Image.Image) -> int:
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = _dct_matrix(32)
    low = (dct @ gray @ dct.T)[:8, :8]
    return _bits_to_int(low > np.median(low))


def image_hash(path: Path, method: HashMethod = "phash") -> int:
    # JPEGs decode at a reduced scale: the hash only looks at 32x32 pixels
    image = load_rgb(path, draft_size=(64, 64))
    return phash(image) if method == "phash" else dhash(image)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def group_near_duplicates(hashes: Sequence[int], max_distance: int = DEFAULT_MAX_DISTANCE) -> list[list[int]]:
    """Indices grouped by single linkage (a-b and b-c close puts a, b, c together); only groups of
    two or more, each sorted, in order of their first index."""
    values = np.array(hashes, dtype=np.uint64)
    parent = list(range(len(values)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(values) - 1):
        distances = _popcount(values[i + 1 :] ^ values[i])
        for j in np.nonzero(distances <= max_distance)[0]:
            parent[find(i + 1 + int(j))] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(values)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def find_near_duplicates(
    paths: Sequence[Path],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    method: HashMethod = "phash",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[Path]], list[Problem]]:
    """Groups of near-duplicate images, and the files that could not be hashed (skipped)."""
    hashed: list[Path] = []
    hashes: list[int] = []
    problems: list[Problem] = []
    for done, path in enumerate(paths, start=1):
        try:
            hashes.append(image_hash(path, method))
            hashed.append(path)
        except DatasetError as exc:
            problems.append(Problem(path, str(exc), "skip", "unhashable"))
        if on_progress is not None and (done % 32 == 0 or done == len(paths)):
            on_progress(done, len(paths))
    groups = group_near_duplicates(hashes, max_distance)
    return [[hashed[i] for i in group] for group in groups], problems


@cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: row k is cos(pi * (2x + 1) * k / 2n), scaled."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def _bits_to_int(bits: np.ndarray) -> int:
    value = 0
    for bit in bits.ravel():
        value = (value << 1) | int(bit)
    return value


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1)
