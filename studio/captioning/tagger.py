"""WD v3 booru taggers (SmilingWolf's wd-eva02-large / wd-vit / wd-swinv2 -tagger-v3) on onnxruntime.

A tagger is a folder holding two files: `model.onnx` (float32 BGR 0-255 pixels in, one sigmoid
probability per tag out; NHWC 448x448 with a dynamic batch for the v3 models) and
`selected_tags.csv` (tag_id, name, category, count; category 9 = rating, 0 = general,
4 = character). The same code runs the real taggers and the offline demo tagger.

The pipeline, for a list of image files:
  1. decode + `preprocess` (pure: alpha onto white, centred white square, bicubic resize, BGR),
     in a thread pool that prepares the next batches while the session runs the current one;
  2. one onnxruntime session run per batch (CUDA provider when present, else CPU);
  3. `postprocess_batch` (pure, vectorised over the batch): thresholds or MCut, rating, names.

Importing this module does no work; onnxruntime and huggingface_hub are imported when used.
"""

from __future__ import annotations

import csv
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from studio.errors import ConfigError, ModelNotFoundError, StudioError
from studio.models.catalog import HUB_ID

Progress = Callable[[float | None, str], None]
ImageSource = str | os.PathLike | Image.Image

TAGGER_FILES = ("model.onnx", "selected_tags.csv")
DEFAULT_TAGGER = "wd-eva02-large-tagger-v3"
DEMO_TAGGER = "demo-tagger"
KNOWN_TAGGERS = {
    name: f"SmilingWolf/{name}"
    for name in ("wd-eva02-large-tagger-v3", "wd-vit-tagger-v3", "wd-swinv2-tagger-v3")
}

# selected_tags.csv categories
RATING, GENERAL, CHARACTER = 9, 0, 4
MCUT_CHARACTER_FLOOR = 0.15
WHITE = (255, 255, 255)

# Tags whose underscores are part of the face: they keep them when `_` becomes a space.
KAOMOJI = frozenset({
    "^_^", "^_^;", ">_<", ">_o", "=_=", "o_o", "0_0", "(o)_(o)", "+_+", "+_-", "u_u", "x_x",
    "|_|", "||_||", ";_;", ":_", "._.", "<o>_<o>", "<|>_<|>", "@_@", "3_3", "6_9",
})


def _noop(fraction: float | None, message: str) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Finding a tagger: known name, local folder, hub repo id, or the demo tagger
# ---------------------------------------------------------------------------------------------
def _missing_files(folder: Path) -> list[str]:
    return [name for name in TAGGER_FILES if not (folder / name).is_file()]


def resolve_tagger(ref: str, models_dir: Path, progress: Progress = _noop) -> Path:
    """The folder holding a tagger's model.onnx and selected_tags.csv. Downloads only what the
    models cache lacks; offline and not cached raises ModelNotFoundError saying what to do.

    `ref` is a known name (wd-eva02-large-tagger-v3, wd-vit-tagger-v3, wd-swinv2-tagger-v3),
    `demo-tagger`, a local folder with the two files, or a hub repo id with the same layout.
    A known tagger placed by hand in `models_dir/<name>/` is used without asking the hub.
    """
    ref = (ref or DEFAULT_TAGGER).strip()
    models_dir = Path(models_dir)
    if ref == DEMO_TAGGER:
        from studio.captioning.demo_tagger import ensure_demo_tagger

        progress(None, "building the demo tagger (first use only)")
        return ensure_demo_tagger(models_dir)
    local = Path(ref).expanduser()  # a relative owner/name is a repo id, never a folder beside the app
    if ref not in KNOWN_TAGGERS and (local.is_absolute() or not HUB_ID.match(ref)) and local.is_dir():
        folder = Path(ref).expanduser()
        if missing := _missing_files(folder):
            raise ModelNotFoundError(
                f"{folder} is not a WD tagger folder: it lacks {', '.join(missing)} "
                "(a tagger folder holds model.onnx and selected_tags.csv)."
            )
        return folder
    repo_id = KNOWN_TAGGERS.get(ref) or (ref if HUB_ID.match(ref) else None)
    if repo_id is None:
        raise ModelNotFoundError(
            f"unknown tagger {ref!r}: use one of {', '.join(KNOWN_TAGGERS)}, {DEMO_TAGGER}, a folder "
            "holding model.onnx and selected_tags.csv, or a hub repo id with those two files."
        )
    by_hand = models_dir / repo_id.split("/")[-1]
    if not _missing_files(by_hand):
        return by_hand
    return _download_tagger(repo_id, models_dir, progress)


def _download_tagger(repo_id: str, models_dir: Path, progress: Progress) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    from studio.models.loaders import tqdm_reporting

    by_hand = models_dir / repo_id.split("/")[-1]
    try:
        folder = Path(snapshot_download(
            repo_id,
            allow_patterns=list(TAGGER_FILES),  # the standard Hugging Face cache (HF_HOME)
            tqdm_class=tqdm_reporting(progress, repo_id),
        ))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"the tagger {repo_id} is not in the models cache and the hub cannot be reached (offline). "
            f"Either connect once so it downloads, or put its model.onnx and selected_tags.csv "
            f"(from https://huggingface.co/{repo_id}) in {by_hand}, or use the demo tagger "
            f"({DEMO_TAGGER}, or start the app with --demo)."
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(
            f"the hub has no accessible repo {repo_id!r}: {exc.__class__.__name__}"
        ) from None
    except OSError as exc:  # network failures surface as OSError subclasses
        raise ModelNotFoundError(f"could not download the tagger {repo_id}: {exc}") from None
    if missing := _missing_files(folder):
        raise ModelNotFoundError(f"{repo_id} is not a WD tagger repo: it has no {', '.join(missing)}.")
    return folder


# ---------------------------------------------------------------------------------------------
# The tag table
# ---------------------------------------------------------------------------------------------
def tag_label(name: str) -> str:
    """Caption form of a tag: underscores become spaces, except in kaomoji such as `^_^`."""
    name = name.strip()
    return name if name in KAOMOJI else name.replace("_", " ")


class TagTable:
    """selected_tags.csv: tag names (raw and caption form), categories and per-category indices."""

    def __init__(self, names: Sequence[str], categories: Sequence[int]):
        self.names = tuple(names)
        self.labels = np.array([tag_label(n) for n in self.names], dtype=object)
        self.categories = np.asarray(categories, dtype=np.int32)
        self.rating_idx = np.flatnonzero(self.categories == RATING)
        self.general_idx = np.flatnonzero(self.categories == GENERAL)
        self.character_idx = np.flatnonzero(self.categories == CHARACTER)
        self.is_general = self.categories == GENERAL
        self.is_character = self.categories == CHARACTER
        self._threshold_vectors: dict[TagThresholds, np.ndarray] = {}
        if len(self.rating_idx) == 0:
            raise ModelNotFoundError("selected_tags.csv has no rating rows (category 9); is it a WD tagger?")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_csv(cls, path: Path) -> TagTable:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            return cls([row["name"] for row in rows], [int(row["category"]) for row in rows])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelNotFoundError(
                f"{path} is not a WD selected_tags.csv (columns tag_id,name,category,count): {exc!r}"
            ) from None

    def threshold_vector(self, thresholds: TagThresholds) -> np.ndarray:
        """One fixed threshold per tag; +inf for ratings, excluded tags and other categories."""
        vector = self._threshold_vectors.get(thresholds)
        if vector is None:
            vector = np.full(len(self), np.inf, dtype=np.float32)
            vector[self.general_idx] = thresholds.general
            vector[self.character_idx] = thresholds.character
            vector[np.isin(self.labels, list(thresholds.exclude))] = np.inf
            self._threshold_vectors[thresholds] = vector
        return vector


# ---------------------------------------------------------------------------------------------
# Post-processing (pure)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TagThresholds:
    """What counts as a tag. MCut replaces the fixed threshold of its category per image."""

    general: float = 0.35
    character: float = 0.85
    general_mcut: bool = False
    character_mcut: bool = False
    exclude: frozenset[str] = field(default_factory=frozenset)  # raw or caption form

    def __post_init__(self):
        for name in ("general", "character"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                value = getattr(self, name)
                raise ConfigError(f"the {name} tag threshold must be between 0 and 1, not {value}")
        object.__setattr__(self, "exclude", frozenset(tag_label(t) for t in self.exclude if t.strip()))


@dataclass(frozen=True)
class TagResult:
    """A tagger's verdict on one image. Tags are in caption form, not yet escaped or ordered."""

    rating: tuple[str, float]
    characters: list[tuple[str, float]]  # by probability, highest first
    general: list[tuple[str, float]]  # by probability, highest first

    @property
    def tags(self) -> list[str]:
        return [tag for tag, _ in self.characters] + [tag for tag, _ in self.general]


@dataclass(frozen=True)
class TagError:
    """An image that could not be tagged, and why; the others are tagged anyway."""

    source: str
    reason: str


def mcut_threshold(probs: np.ndarray) -> np.ndarray:
    """MCut (Largeron et al. 2012) along the last axis: the midpoint of the largest gap between
    consecutive sorted probabilities. With fewer than two values there is no gap: 0 (keep all)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[-1] < 2:
        return np.zeros(probs.shape[:-1], dtype=np.float32)
    ordered = np.sort(probs, axis=-1)[..., ::-1]
    gap_at = np.argmax(ordered[..., :-1] - ordered[..., 1:], axis=-1)[..., None]
    above = np.take_along_axis(ordered, gap_at, axis=-1)
    below = np.take_along_axis(ordered, gap_at + 1, axis=-1)
    return ((above + below) / 2)[..., 0]


def _threshold_rows(probs: np.ndarray, table: TagTable, thresholds: TagThresholds) -> np.ndarray:
    """(T,) fixed thresholds, or (B, T) when MCut sets a per-image threshold."""
    fixed = table.threshold_vector(thresholds)
    if not (thresholds.general_mcut or thresholds.character_mcut):
        return fixed
    rows = np.repeat(fixed[None], len(probs), axis=0)
    if thresholds.general_mcut:
        rows[:, table.general_idx] = mcut_threshold(probs[:, table.general_idx])[:, None]
    if thresholds.character_mcut:
        cut = np.maximum(mcut_threshold(probs[:, table.character_idx]), MCUT_CHARACTER_FLOOR)
        rows[:, table.character_idx] = cut[:, None]
    rows[:, np.isinf(fixed)] = np.inf  # ratings and exclusions stay out
    return rows


def _kept_tags(probs: np.ndarray, keep: np.ndarray, table: TagTable) -> list[tuple[list, list]]:
    """Per row: (characters, general) as (label, probability) lists, highest probability first.

    `keep` holds only general and character tags (ratings have an infinite threshold). One flat
    nonzero over the whole batch and one sort keep this fast (2-D np.nonzero is ~10x slower).
    """
    batch, tags = probs.shape
    rows, cols = np.divmod(np.flatnonzero(keep), tags)
    values = probs[rows, cols]
    is_general = table.is_general[cols]
    order = np.lexsort((-values, is_general, rows))  # by row, characters first, then probability
    rows, cols, values = rows[order], cols[order], values[order]
    pairs = list(zip(table.labels[cols].tolist(), values.tolist()))
    starts = np.searchsorted(rows, np.arange(batch + 1)).tolist()
    characters = np.bincount(rows[~is_general[order]], minlength=batch).tolist()
    return [
        (pairs[start:start + n], pairs[start + n:end])
        for start, end, n in zip(starts, starts[1:], characters)
    ]


def postprocess_batch(
    probs: np.ndarray, table: TagTable, thresholds: TagThresholds = TagThresholds()
) -> list[TagResult]:
    """Turn a (B, T) array of tag probabilities into one TagResult per row."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(table):
        raise ValueError(f"expected probabilities of shape (batch, {len(table)}), got {probs.shape}")
    keep = probs > _threshold_rows(probs, table, thresholds)
    rating_cols = table.rating_idx[np.argmax(probs[:, table.rating_idx], axis=1)]
    ratings = zip(table.labels[rating_cols].tolist(), probs[np.arange(len(probs)), rating_cols].tolist())
    return [TagResult(rating, characters, general)
            for rating, (characters, general) in zip(ratings, _kept_tags(probs, keep, table))]


def postprocess(probs: np.ndarray, table: TagTable, thresholds: TagThresholds = TagThresholds()) -> TagResult:
    """`postprocess_batch` for one probability vector."""
    return postprocess_batch(np.asarray(probs)[None], table, thresholds)[0]


# ---------------------------------------------------------------------------------------------
# Pre-processing (pure) and decoding
# ---------------------------------------------------------------------------------------------
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG) to 8-bit; Pillow's own convert would clip it to white."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode != "I" or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """A WD tagger's input for one image: (size, size, 3) float32, BGR, 0-255, not normalised.

    Transparent pixels are composited onto white (RGBA, LA, PA, P or RGB/L with a transparency
    key); the image is centred on a white square of side max(width, height), which is resized to
    `size` with bicubic filtering.
    """
    if image.mode in _SIXTEEN_BIT:
        image = _to_8bit_grey(image)
    mask = None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        mask = image.getchannel("A")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2), mask)
    if side != size:
        canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(canvas)[:, :, ::-1].astype(np.float32)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully (so broken files fail here), upright per its EXIF orientation."""
    with Image.open(path) as image:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image


_BROKEN_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _prepare(item: ImageSource, size: int) -> np.ndarray | TagError:
    try:
        image = item if isinstance(item, Image.Image) else open_image(item)
        return preprocess(image, size)
    except _BROKEN_IMAGE_ERRORS as exc:
        source = f"<{item.__class__.__name__} image>" if isinstance(item, Image.Image) else str(item)
        return TagError(source, f"{exc.__class__.__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# The tagger
# ---------------------------------------------------------------------------------------------
def default_providers(execution_device: str | None = None) -> list[str]:
    """onnxruntime providers: CUDA first when this onnxruntime build has it (onnxruntime-gpu),
    else CPU. `execution_device="cpu"` forces the CPU."""
    import onnxruntime

    if execution_device != "cpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class InputSpec:
    """What the model's input shape says: image side, layout and batch limit (None = dynamic)."""

    name: str
    size: int
    layout: str  # "NHWC" (WD taggers) or "NCHW"
    max_batch: int | None
    dtype: type

    @classmethod
    def read(cls, node) -> InputSpec:
        shape = list(node.shape)
        dtype = np.float16 if node.type == "tensor(float16)" else np.float32
        if len(shape) == 4 and shape[3] == 3 and isinstance(shape[1], int) and shape[1] == shape[2]:
            layout, size = "NHWC", shape[1]
        elif len(shape) == 4 and shape[1] == 3 and isinstance(shape[2], int) and shape[2] == shape[3]:
            layout, size = "NCHW", shape[2]
        else:
            raise ModelNotFoundError(
                f"the tagger's input shape {shape} is not a fixed-size square RGB image batch "
                "(expected [batch, side, side, 3] as in WD taggers)."
            )
        max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return cls(node.name, size, layout, max_batch, dtype)


class Tagger:
    """A WD-style ONNX tagger: `Tagger.load(folder)`, then `tag_images(...)`.

    The session lives on the provider it was created for; `unload()` drops it (freeing RAM/VRAM)
    and `reload()` creates it again, which is how the model manager evicts and restores it.
    """

    def __init__(self, folder: Path, table: TagTable, providers: list[str]):
        self.folder = Path(folder)
        self.table = table
        self.model_file = self.folder / "model.onnx"
        self.size_bytes = self.model_file.stat().st_size
        self.requested_providers = list(providers)
        self.input: InputSpec | None = None
        self._session = None
        self._output_name: str | None = None

    @classmethod
    def load(cls, folder: str | os.PathLike, providers: list[str] | None = None) -> Tagger:
        folder = Path(folder)
        if missing := _missing_files(folder):
            raise ModelNotFoundError(
                f"{folder} lacks {', '.join(missing)}; a tagger needs model.onnx and selected_tags.csv"
            )
        table = TagTable.from_csv(folder / "selected_tags.csv")
        tagger = cls(folder, table, providers or default_providers())
        tagger.reload()
        return tagger

    # -- the session ---------------------------------------------------------------------------
    def reload(self) -> None:
        """Create the onnxruntime session (again) and read the input spec from the model."""
        import onnxruntime
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: provider fallbacks are reported via .providers
        unloadable = (
            ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile, ort_errors.Fail
        )
        try:
            session = onnxruntime.InferenceSession(
                str(self.model_file), sess_options=options, providers=self.requested_providers
            )
        except unloadable as exc:
            raise ModelNotFoundError(
                f"{self.model_file} is not a loadable ONNX model ({exc}); re-download it."
            ) from None
        spec = InputSpec.read(session.get_inputs()[0])
        output = session.get_outputs()[0]
        outputs = output.shape[-1] if output.shape else None
        if isinstance(outputs, int) and outputs != len(self.table):
            raise ModelNotFoundError(
                f"{self.model_file.name} scores {outputs} tags but selected_tags.csv lists "
                f"{len(self.table)}: the two files come from different taggers."
            )
        self._session, self.input, self._output_name = session, spec, output.name

    def unload(self) -> None:
        self._session = None

    @property
    def is_loaded(self) -> bool:
        return self._session is not None

    @property
    def session(self):
        if self._session is None:
            raise StudioError(f"the tagger {self.folder.name} was unloaded; load it again")
        return self._session

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (onnxruntime falls back to CPU silently)."""
        return self.session.get_providers()

    # -- running -------------------------------------------------------------------------------
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, T) for a batch of preprocessed (B, size, size, 3) BGR images."""
        if self.input.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        feed = {self.input.name: np.ascontiguousarray(batch, dtype=self.input.dtype)}
        (probs,) = self.session.run([self._output_name], feed)
        return np.asarray(probs, dtype=np.float32)

    def tag_images(
        self,
        images: Sequence[ImageSource],
        *,
        batch_size: int = 8,
        thresholds: TagThresholds = TagThresholds(),
        on_progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
        workers: int | None = None,
        prefetch_batches: int = 2,
    ) -> Iterator[tuple[int, TagResult | TagError]]:
        """Tag image files (or PIL images), yielding (index, TagResult | TagError) in index order.

        A broken image yields a TagError and the rest are tagged. Decoding and preprocessing run in
        a thread pool, `prefetch_batches` batches ahead of the session. `stop` is checked between
        batches: once set, no further batch starts (what was yielded is kept).
        """
        if batch_size < 1:
            raise ConfigError(f"the tagger batch size must be at least 1, not {batch_size}")
        batch_size = min(batch_size, self.input.max_batch or batch_size)
        workers = workers or self._default_workers()
        prefetch_batches = max(1, prefetch_batches)
        return self._tag_stream(images, batch_size, thresholds, on_progress, stop, workers, prefetch_batches)

    def _tag_stream(self, images, batch_size, thresholds, on_progress, stop, workers, prefetch_batches):
        total, size = len(images), self.input.size
        starts = iter(range(0, total, batch_size))
        pending: deque[tuple[range, list[Future]]] = deque()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tagger-prep")

        def submit_next_batch() -> None:
            start = next(starts, None)
            if start is not None:
                indices = range(start, min(start + batch_size, total))
                pending.append((indices, [pool.submit(_prepare, images[i], size) for i in indices]))

        try:
            for _ in range(prefetch_batches):
                submit_next_batch()
            done = 0
            while pending and not (stop is not None and stop.is_set()):
                indices, futures = pending.popleft()
                submit_next_batch()
                prepared = [future.result() for future in futures]
                yield from self._tag_prepared(indices, prepared, thresholds)
                done += len(indices)
                if on_progress is not None:
                    on_progress(done, total)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _default_workers(self) -> int:
        """Decoding threads: the CPU is free for them while a GPU runs the model; on CPU they share
        the cores with onnxruntime's own threads."""
        cores = os.cpu_count() or 1
        on_gpu = self.providers[0] != "CPUExecutionProvider"
        return max(1, min(8, cores - 1)) if on_gpu else min(4, cores)

    def _tag_prepared(self, indices: range, prepared: list, thresholds: TagThresholds):
        arrays = [(i, a) for i, a in zip(indices, prepared) if not isinstance(a, TagError)]
        results: dict[int, TagResult | TagError] = {
            i: a for i, a in zip(indices, prepared) if isinstance(a, TagError)
        }
        if arrays:
            probs = self.predict(np.stack([a for _, a in arrays]))
            results.update(zip((i for i, _ in arrays), postprocess_batch(probs, self.table, thresholds)))
        for i in indices:
            yield i, results[i]
