"""A1111 "parameters" infotext: writing it, reading it back, and carrying it in image files.

The format (A1111's PNG Info tab, sd-parsers and sd-prompt-reader all read it):

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>      (left out when empty)
    Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 832x1216, Model hash: ..., ...

The last line holds `Key: value` pairs; a value with `,` `:` `"`, a newline or edge spaces is
JSON-quoted. Readers find that line by its pairs, so a prompt may use any characters and only a
line *starting* with `Negative prompt:` ends the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from studio.fileio import atomic_path
from studio.generation.samplers import sampler_from_infotext
from studio.schemas import GenerateConfig, HiresConfig

if TYPE_CHECKING:
    from PIL import Image

NEGATIVE_PREFIX = "Negative prompt:"
PNG_TEXT_KEY = "parameters"

# One `Key: value` pair at a given position: a JSON-quoted value, or plain text up to a comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*")
_MIN_PAIRS = 3  # fewer pairs than this and the last line is prompt text, as A1111 decides

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


# ---------------------------------------------------------------------------------------------
# Writing and reading the text
# ---------------------------------------------------------------------------------------------


def _format_value(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # "CFG scale: 7", as A1111 writes it
    text = str(value)
    if any(ch in text for ch in ',:"\n\r') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative: str, params: dict[str, object]) -> str:
    """The infotext for one image. `params` keeps its order; None values are left out."""
    pairs = []
    for key, value in params.items():
        if not _KEY.fullmatch(key) or key != key.strip():
            raise ValueError(f"infotext key {key!r} must be letters, digits, spaces, '-' or '/'")
        if value is not None:
            pairs.append(f"{key}: {_format_value(value)}")

    lines = [prompt] if prompt else []
    if negative:
        lines.append(f"{NEGATIVE_PREFIX} {negative}")
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            unquoted = json.loads(value)
        except json.JSONDecodeError:
            return value
        return unquoted if isinstance(unquoted, str) else value
    return value


def _parse_params_line(line: str) -> list[tuple[str, str]]:
    """The `Key: value` pairs of a line, read left to right. A piece that is not a pair (a bare
    flag, prompt text such as `(worst quality:1.4)`) is skipped up to the next comma."""
    pairs = []
    pos = 0
    while pos < len(line):
        match = _PAIR.match(line, pos)
        if match:
            pairs.append((match.group(1).strip(), _unquote(match.group(2).strip())))
            pos = match.end()
            continue
        comma = line.find(",", pos)
        if comma < 0:
            break
        pos = comma + 1
    return pairs


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative, params) from an infotext; the inverse of `format_infotext`.

    Text without a params line and without a `Negative prompt:` line is all prompt.
    """
    lines = text.replace("\r\n", "\n").split("\n")

    # 1. The params line: the last non-blank line, if it holds enough pairs.
    params: dict[str, str] = {}
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    if end:
        pairs = _parse_params_line(lines[end - 1])
        if len(pairs) >= _MIN_PAIRS:
            params = dict(pairs)
            lines = lines[: end - 1]

    # 2. Prompt lines, then (from the first line starting "Negative prompt:") negative lines.
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.lstrip().startswith(NEGATIVE_PREFIX):
            first = line.lstrip()[len(NEGATIVE_PREFIX) :]
            negative_lines = [first.removeprefix(" ")]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines or []), params


def format_lora_hashes(hashes: dict[str, str]) -> str:
    """`name: 0123456789ab, name2: ...`; `:` and `,` are dropped from names, as A1111 does."""
    parts = []
    for name, short_hash in hashes.items():
        clean = " ".join(name.replace(":", "").replace(",", "").split())
        parts.append(f"{clean}: {short_hash}")
    return ", ".join(parts)


def parse_lora_hashes(value: str) -> dict[str, str]:
    """{name: short hash} from a `Lora hashes` value (quoted or not); malformed parts skipped."""
    hashes = {}
    for part in _unquote(value.strip()).split(","):
        name, sep, short_hash = part.rpartition(":")
        if sep and name.strip() and short_hash.strip():
            hashes[name.strip()] = short_hash.strip()
    return hashes


# ---------------------------------------------------------------------------------------------
# Hashes (cached per process: a 6 GB checkpoint is read once)
# ---------------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, str, int, int], str] = {}
_HASH_CACHE_LOCK = threading.Lock()
_HASH_CACHE_SIZE = 256


def _cached_hash(path: str | os.PathLike, kind: str, compute) -> str:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (kind, str(resolved), stat.st_size, stat.st_mtime_ns)
    with _HASH_CACHE_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    digest = compute(resolved)  # outside the lock: hashing a checkpoint takes seconds
    with _HASH_CACHE_LOCK:
        if len(_HASH_CACHE) >= _HASH_CACHE_SIZE:
            _HASH_CACHE.pop(next(iter(_HASH_CACHE)))
        _HASH_CACHE[key] = digest
    return digest


def clear_hash_cache() -> None:
    with _HASH_CACHE_LOCK:
        _HASH_CACHE.clear()


def _sha256_from(path: Path, offset: int, chunk: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of the whole file, hex, read in chunks."""
    return _cached_hash(path, "sha256", lambda p: _sha256_from(p, 0, chunk))


def _safetensors_data_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    if header_len <= 0 or 8 + header_len > path.stat().st_size:
        raise ValueError(f"{path} is not a safetensors file (its header length is {header_len})")
    return 8 + header_len


def safetensors_data_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a .safetensors file's tensor data, its JSON header left out: the hash
    A1111 shows for LoRAs and Civitai calls AutoV3, so editing metadata does not change it."""
    return _cached_hash(path, "autov3", lambda p: _sha256_from(p, _safetensors_data_offset(p), chunk))


def model_hash(path: str | os.PathLike) -> str:
    """A1111's `Model hash`: the first 10 hex of the checkpoint file's SHA-256."""
    return file_sha256(path)[:10]


_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)))?(?::[^>]*)?>", re.IGNORECASE)


def lora_tags(loras) -> str:
    """A1111's way of recording the LoRAs in the prompt: `<lora:name:weight>` each."""
    return "".join(f", <lora:{name}:{weight:g}>" for name, weight in loras)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:name:weight>` tags, and those (name, weight) in order (A1111
    writes them into the prompt; a missing weight is 1)."""
    found = [(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0) for m in _LORA_TAG.finditer(prompt)]
    rest = _LORA_TAG.sub("", prompt)
    rest = re.sub(r"\s*,(\s*,)+", ",", rest)  # the commas the tags sat between
    return rest.strip().strip(",").strip(), found


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's `Lora hashes` entry: the first 12 hex of the AutoV3 hash for a .safetensors
    file, of the whole file's SHA-256 otherwise."""
    if str(path).lower().endswith(".safetensors"):
        return safetensors_data_sha256(path)[:12]
    return file_sha256(path)[:12]


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def write_png(image: Image.Image, path: Path, infotext: str) -> Path:
    """Save `image` as a PNG carrying `infotext` in a `parameters` text chunk, atomically.

    ASCII text goes in a tEXt chunk; anything else in a UTF-8 iTXt chunk, so that Japanese or
    emoji come back exactly (tEXt is Latin-1 only, and readers disagree on how to decode it).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        save_png(image, tmp, infotext)
    return path


def save_png(image: Image.Image, path: Path, infotext: str) -> None:
    """`image` as a PNG with `infotext` in its `parameters` chunk (write_png's content, not atomic)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext.isascii():
        info.add_text(PNG_TEXT_KEY, infotext)
    else:
        info.add_itxt(PNG_TEXT_KEY, infotext)
    image.save(path, format="PNG", pnginfo=info)


def write_new_png(image: Image.Image, folder: Path, name_for, infotext: str, start: int = 0) -> Path:
    """A PNG under a new numbered name in `folder` (see fileio.write_new_numbered): never
    replaces an image, however many writers number at once."""
    from studio.fileio import write_new_numbered

    return write_new_numbered(folder, name_for, lambda tmp: save_png(image, tmp, infotext), start)


def encode_user_comment(text: str) -> bytes:
    """An EXIF UserComment holding `text` the way A1111 writes it into JPEG and WebP files."""
    return b"UNICODE\0" + text.encode("utf-16-be")


def _decode_user_comment(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw or None
    prefix, payload = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        # A1111 (via piexif) writes big-endian; some tools write little-endian. ASCII-heavy text
        # has its zero bytes first in each pair when big-endian.
        big_endian = payload[0::2].count(0) >= payload[1::2].count(0)
        text = payload.decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = payload.decode("utf-8", errors="replace")
    else:
        return None  # JIS or no prefix: not something A1111 writes
    text = text.rstrip("\0")
    return text or None


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_TEXT_KEY)
    if text is None:
        # Text chunks after the image data show up only once the file is read to the end.
        try:
            text = (getattr(image, "text", None) or {}).get(PNG_TEXT_KEY)
        except (OSError, ValueError):  # a truncated file, or one already closed
            text = None
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if text is not None:
        return str(text)
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (KeyError, ValueError, TypeError, OSError):
        return None
    return _decode_user_comment(raw) if raw else None


def read_infotext(image_or_path: Image.Image | str | os.PathLike) -> str | None:
    """The infotext stored in a PNG `parameters` chunk or a JPEG/WebP EXIF UserComment, if any."""
    from PIL import Image

    if isinstance(image_or_path, Image.Image):
        return _infotext_of(image_or_path)
    with Image.open(image_or_path) as image:
        return _infotext_of(image)


# ---------------------------------------------------------------------------------------------
# Back into the generate form
# ---------------------------------------------------------------------------------------------


def _to_int(text: str) -> int:
    """An int from "28" or "28.0"; anything else raises ValueError."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _field_is_valid(field: str, value: object) -> bool:
    try:
        GenerateConfig.model_validate({"prompt": "x", field: value})
    except ValidationError:
        return False
    return True


def _hires_from(params: dict[str, str], first_pass_steps: int | None) -> dict | None:
    if "Hires upscale" not in params and "Hires steps" not in params:
        return None  # "Denoising strength" alone means img2img, not a hires fix
    wanted = {"scale": "Hires upscale", "denoise": "Denoising strength", "steps": "Hires steps"}
    hires: dict[str, object] = {}
    for name, key in wanted.items():
        try:
            value = _to_int(params[key]) if name == "steps" else float(params[key])
        except (KeyError, ValueError, TypeError, OverflowError):
            continue
        if name == "steps" and value == 0:  # A1111: 0 means "as many as the first pass"
            if first_pass_steps is None:
                continue
            value = first_pass_steps
        try:
            HiresConfig.model_validate({name: value})
        except ValidationError:
            continue
        hires[name] = value
    return hires


def _size_from(value: str) -> tuple[int, int] | None:
    width, sep, height = value.lower().partition("x")
    try:
        return (int(width), int(height)) if sep else None
    except ValueError:
        return None


def infotext_to_form(params: dict[str, str]) -> dict:
    """GenerateConfig fields from parsed infotext params. Unknown keys, unknown samplers and
    values the form would reject are left out; this never raises on odd input."""
    form: dict[str, object] = {}
    converters = {"Steps": ("steps", _to_int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", _to_int)}
    for key, (field, convert) in converters.items():
        try:
            value = convert(params[key])
        except (KeyError, ValueError, TypeError, OverflowError):
            continue
        if _field_is_valid(field, value):
            form[field] = value

    size = _size_from(str(params.get("Size", "")))
    if size and _field_is_valid("width", size[0]) and _field_is_valid("height", size[1]):
        form["width"], form["height"] = size

    sampler = sampler_from_infotext(str(params.get("Sampler", "")), str(params.get("Schedule type", "")))
    if sampler:
        form["sampler"] = sampler

    if params.get("Model"):
        form["model"] = str(params["Model"])

    hires = _hires_from(params, form.get("steps"))
    if hires is not None:
        form["hires"] = hires
    return form
