"""Natural-language captions: a vision-language model (VLM) writes `{stem}_nl.txt` beside each
image, grounded on the image's booru tags.

The prompt names what the tags know and a VLM cannot (the character, the series, the artist) and
asks for flowing sentences whose first one carries the name and series: "An illustration of
Hakurei Reimu from Touhou ...". The template is a plain string with placeholders, editable by the
user and stored with presets:

    {characters}  the characters' names ("Hakurei Reimu and Kirisame Marisa", or "none")
    {series}      the series ("Touhou", or "unknown")
    {artists}     the artist tags ("@ke-ta", or "unknown")
    {tags}        the other tags, for context
    {opening}     how the first sentence must start (name and series, or the main subject)

Two backends:
- `OpenAICompatibleBackend`: any OpenAI-compatible server (vLLM, LM Studio, Ollama, llama.cpp):
  POST {base}/chat/completions with the image as a base64 data URL, several requests in flight,
  retries with backoff on 429/5xx/connection errors, a StudioError naming the URL when the
  server cannot be reached.
- `TransformersVLMBackend`: a VLM in-process through transformers (`AutoModelForImageTextToText`:
  Qwen2-VL / Qwen2.5-VL / Qwen3-VL, Florence-2), batched greedy generation.

`caption_images` runs either over a list of images: skips images that already have an NL caption
(unless asked to overwrite), writes each caption atomically, reports per-image errors and keeps
going, checks a stop flag between batches and reports progress (done, total).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from studio.captioning.tag_rules import ARTIST, CHARACTER, COUNT, GENERAL, SERIES, CaptionParts, tag_key
from studio.errors import ConfigError, ModelNotFoundError, StudioError
from studio.fileio import atomic_write_text

DEFAULT_NL_TEMPLATE = (
    "You are writing the caption of an anime-style illustration for an image-generation training set.\n"
    "What the image's tags say:\n"
    "- Character: {characters}\n"
    "- Series: {series}\n"
    "- Artist: {artists}\n"
    "- Tags: {tags}\n"
    "\n"
    "Describe what is visible in 3 to 5 flowing English sentences: the subject, their appearance and "
    "clothing, pose and expression, the setting, the composition and the lighting. {opening} "
    "Use the names exactly as given and invent no names. Use the tags as hints, but describe only "
    "what you can see. Write plain prose: no lists, no headings, no markdown, no quotation marks, "
    'and no preamble such as "This image shows".'
)
PLACEHOLDERS = ("characters", "series", "artists", "tags", "opening")
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_SMALL_WORDS = frozenset(
    {"a", "an", "and", "at", "de", "from", "in", "no", "of", "on", "the", "to", "wa", "ga"}
)


class CaptionError(StudioError):
    """One image could not be captioned (the job goes on with the next)."""


class BackendUnavailable(StudioError):
    """The captioning backend cannot work at all (server down, wrong URL or key): the job stops."""


# --- grounding and the prompt -----------------------------------------------------------------


def display_name(tag: str) -> str:
    """A tag as a name in prose: `saber \\(fate\\)` -> "Saber", `fate (series)` -> "Fate",
    `sousou no frieren` -> "Sousou no Frieren". Artist tags (`@name`) stay as they are."""
    text = " ".join(_unescape(tag).replace("_", " ").split())
    if text.startswith("@"):
        return text
    text = re.sub(r"\s*\([^()]*\)$", "", text) or text  # the Danbooru qualifier
    words = text.split(" ")
    return " ".join(
        w if (i and w.lower() in _SMALL_WORDS) or not w[:1].isalpha() else w[:1].upper() + w[1:]
        for i, w in enumerate(words)
    )


def _unescape(tag: str) -> str:
    return tag.replace("\\(", "(").replace("\\)", ")")


def _names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass(frozen=True)
class Grounding:
    """What an image's tags say about it, as tags (unescaped or escaped, either is fine)."""

    characters: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    artists: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def from_parts(cls, parts: CaptionParts) -> Grounding:
        """From `tag_rules.caption_parts(result, rules)`: the tagger's result under the dataset's rules."""

        def unique(*sections: int) -> tuple[str, ...]:
            return tuple(dict.fromkeys(t for s in sections for t in parts.texts(s)))

        return cls(unique(CHARACTER), unique(SERIES), unique(ARTIST), unique(COUNT, GENERAL))

    @classmethod
    def from_tags(
        cls,
        tags: Iterable[str],
        characters: Iterable[str] = (),
        series: Iterable[str] = (),
        ignore: Iterable[str] = (),
    ) -> Grounding:
        """From a caption file's tags: `@name` tags are artists, tags listed in `characters` /
        `series` are those, tags in `ignore` (trigger, quality and other special tags) are left out."""
        character_keys = {tag_key(t) for t in characters}
        series_keys = {tag_key(t) for t in series}
        ignore_keys = {tag_key(t) for t in ignore}
        found: dict[str, list[str]] = {"characters": [], "series": [], "artists": [], "tags": []}
        for tag in tags:
            key = tag_key(tag)
            if not key or key in ignore_keys:
                continue
            if key.startswith("@"):
                found["artists"].append(tag)
            elif key in character_keys:
                found["characters"].append(tag)
            elif key in series_keys:
                found["series"].append(tag)
            else:
                found["tags"].append(tag)
        return cls(**{name: tuple(dict.fromkeys(values)) for name, values in found.items()})

    def opening(self) -> str:
        """The instruction for the first sentence: name and series when the tags have them."""
        characters = [display_name(c) for c in self.characters]
        series = [display_name(s) for s in self.series]
        if characters:
            subject = _names(characters) + (f" from {_names(series)}" if series else "")
            return f'Start the first sentence with "An illustration of {subject}".'
        if series:
            start = f"An illustration from {_names(series)} showing"
            return f'Start the first sentence with "{start}" and the main subject.'
        return (
            'Start the first sentence with "An illustration of" followed by the main subject '
            '(for example "An illustration of a girl with long silver hair").'
        )


def check_template(template: str) -> str:
    """The template, if every `{placeholder}` in it is known; a ConfigError otherwise."""
    if not template.strip():
        raise ConfigError("the NL prompt template is empty: restore the default or write one")
    unknown = sorted({name for name in _PLACEHOLDER.findall(template) if name not in PLACEHOLDERS})
    if unknown:
        known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        raise ConfigError(f"unknown placeholder(s) in the NL prompt template: {unknown}; use {known}")
    return template


def render_prompt(template: str, grounding: Grounding) -> str:
    """The template with its placeholders filled from the grounding."""

    def named(tags: tuple[str, ...], default: str) -> str:
        return _names([display_name(t) for t in tags]) if tags else default

    values = {
        "characters": named(grounding.characters, "none"),
        "series": named(grounding.series, "unknown"),
        "artists": ", ".join(_unescape(a) for a in grounding.artists) or "unknown",
        "tags": ", ".join(_unescape(t) for t in grounding.tags) or "none",
        "opening": grounding.opening(),
    }
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), check_template(template))


# --- post-processing --------------------------------------------------------------------------

_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
_LINE_MARKER = re.compile(r"^\s*(?:#{1,6}\s+|[-*+\u2022]\s+|\d{1,3}[.)]\s+|>\s*)")
_EMPHASIS = re.compile(r"\*\*|__|\*|`")
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|of course|okay)\b[^.!?:\n]*[.!?:]\s*)?(?:here(?:'s| is)\b[^:\n]*:\s*)?",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)")


def _strip_quotes(text: str, *, unmatched_leading: bool = False) -> str:
    while len(text) >= 2 and text[0] in _QUOTE_PAIRS and text[-1] == _QUOTE_PAIRS[text[0]]:
        text = text[1:-1].strip()
    if unmatched_leading and text[:1] in _QUOTE_PAIRS and _QUOTE_PAIRS[text[0]] not in text[1:]:
        text = text[1:].lstrip()
    return text


def clean_caption(text: str, truncated: bool = False) -> str:
    """A model's answer as one caption: markdown and list markers, code fences, a chatty preamble
    and surrounding quotes removed, whitespace collapsed. When generation hit its token limit
    (`truncated`), the trailing unfinished sentence is dropped (if a finished one precedes it)."""
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [line for line in text.splitlines() if not line.strip().startswith("```")]
    text = " ".join(_LINE_MARKER.sub("", line).strip() for line in lines)
    text = " ".join(_EMPHASIS.sub("", text).split())
    text = _strip_quotes(_PREAMBLE.sub("", _strip_quotes(text), count=1).strip())
    if truncated:
        ends = list(_SENTENCE_END.finditer(text))
        if ends:
            text = text[: ends[-1].end()]
        text = _strip_quotes(text, unmatched_leading=True)
    return text.strip()


# --- backends ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawCaption:
    text: str
    truncated: bool = False  # generation stopped at the token limit


class NLBackend(Protocol):
    batch_size: int  # images per `caption` call
    concurrency: int  # `caption` calls in flight at once

    def caption(self, images: list[Any], prompts: list[str]) -> list[RawCaption]: ...


def _data_url(image, max_side: int) -> str:
    """A PIL image as a JPEG data URL, its long side at most `max_side`."""
    from PIL import Image

    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def normalise_base_url(base_url: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1` (vLLM, LM Studio and Ollama all serve /v1);
    a URL with a path is kept as given."""
    base_url = base_url.strip().rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{base_url!r} is not a server URL; expected e.g. http://127.0.0.1:8000/v1")
    return base_url if parts.path else base_url + "/v1"


class OpenAICompatibleBackend:
    """Chat completions on an OpenAI-compatible server; thread-safe, `concurrency` in flight."""

    batch_size = 1

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        concurrency: int = 4,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int = 300,
        temperature: float = 0.0,
        max_image_side: int = 1536,
    ):
        import httpx

        if not model.strip():
            raise ConfigError("name the model the server should use (e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
        self.base_url = normalise_base_url(base_url)
        self.endpoint = self.base_url + "/chat/completions"
        self.model = model.strip()
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_image_side = max_image_side
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        local = urlsplit(self.base_url).hostname in ("127.0.0.1", "localhost", "::1")
        # A server on this machine is never reached through a proxy from the environment.
        self._client = httpx.Client(timeout=timeout, headers=headers, limits=limits, trust_env=not local)

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def caption(self, images: list[Any], prompts: list[str]) -> list[RawCaption]:
        return [self.caption_one(image, prompt) for image, prompt in zip(images, prompts, strict=True)]

    def caption_one(self, image, prompt: str) -> RawCaption:
        content = [
            {"type": "image_url", "image_url": {"url": _data_url(image, self.max_image_side)}},
            {"type": "text", "text": prompt},
        ]
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return self._parse(self._post(payload))

    def _post(self, payload: dict) -> dict:
        """POST with retries (backoff, or the server's Retry-After) on 429, 5xx, timeouts and
        connection errors; a per-image CaptionError or a run-ending BackendUnavailable otherwise."""
        import httpx

        problem, reachable, wait_s = "", True, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(wait_s if wait_s is not None else self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.endpoint, json=payload)
            except httpx.TimeoutException:
                problem, reachable, wait_s = f"no answer within {self.timeout:g} s", False, None
            except httpx.TransportError as exc:
                problem, reachable, wait_s = f"cannot connect ({exc.__class__.__name__}: {exc})", False, None
            else:
                if response.status_code < 400:
                    return self._json(response)
                problem, reachable = self._retryable_problem(response), True
                wait_s = _retry_after(response.headers.get("retry-after"))
        tries = f"{self.max_retries + 1} tries"
        if not reachable:
            raise BackendUnavailable(
                f"the captioning server at {self.base_url} is not answering ({problem}, {tries}). "
                "Is it running (vLLM, LM Studio, Ollama) and is the URL right?"
            )
        raise CaptionError(f"{self.endpoint} kept failing ({problem}, {tries})")

    def _json(self, response) -> dict:
        try:
            return response.json()
        except ValueError:
            raise CaptionError(f"{self.endpoint} answered with something that is not JSON") from None

    def _retryable_problem(self, response) -> str:
        """What went wrong, for a status worth retrying (429, 5xx); raises for the others."""
        code = response.status_code
        detail = response.text.strip().replace("\n", " ")[:300]
        if code in (401, 403):
            raise BackendUnavailable(
                f"{self.endpoint} refused the request (HTTP {code}): check the API key. {detail}"
            )
        if code == 404:
            raise BackendUnavailable(
                f"{self.endpoint} answered 404: check the base URL (it usually ends in /v1) and that "
                f"the server has the model {self.model!r}. {detail}"
            )
        if code != 429 and code < 500:
            raise CaptionError(f"{self.endpoint} rejected the image (HTTP {code}): {detail}")
        return f"HTTP {code}: {detail}"

    def _parse(self, data: dict) -> RawCaption:
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise CaptionError(f"{self.endpoint} answered without a message: {str(data)[:200]}") from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return RawCaption(str(content or ""), truncated=choice.get("finish_reason") == "length")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


def load_vlm_processor(model: str):
    """`AutoProcessor.from_pretrained(model)`, except where transformers 5 cannot build it without
    torchvision: Qwen-VL processors carry a video processor that needs torchvision (which the
    studio does not install), so their images-only subclass is built instead (same class name,
    same image processing, no video)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if importlib.util.find_spec("torchvision") is None:
        name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(model).model_type)
        base = getattr(transformers, name, None) if name else None
        if base is not None and "video_processor" in base.get_attributes():
            attributes = [a for a in base.get_attributes() if a != "video_processor"]
            images_only = type(name, (base,), {"get_attributes": classmethod(lambda cls: list(attributes))})
            return images_only.from_pretrained(model)
    return AutoProcessor.from_pretrained(model)


class TransformersVLMBackend:
    """A vision-language model run in-process: chat template with the image and the prompt (plain
    prompt text for models without one, e.g. Florence-2's task tokens), greedy decoding."""

    concurrency = 1

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        max_new_tokens: int = 300,
        batch_size: int = 1,
    ):
        self.model = str(model)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, batch_size)
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText

        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        elif self.dtype in dtypes:
            dtype = dtypes[self.dtype]
        else:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose auto, {', '.join(dtypes)}")
        try:
            processor = load_vlm_processor(self.model)
            model = AutoModelForImageTextToText.from_pretrained(self.model, dtype=dtype)
        except OSError as exc:
            raise ModelNotFoundError(
                f"cannot load the captioning model {self.model!r}: {exc}. Give a local folder, or download "
                "it first (the app may be offline)."
            ) from exc
        except ValueError as exc:
            raise ConfigError(
                f"{self.model!r} is not a vision-language model transformers can run: {exc}"
            ) from exc
        self._model, self._processor = model.to(self.device).eval(), processor

    def unload(self) -> None:
        self._model = self._processor = None

    def reload(self) -> None:
        self.load()

    @property
    def size_bytes(self) -> int:
        """Parameter and buffer bytes of the loaded model (0 when unloaded)."""
        if self._model is None:
            return 0
        tensors = list(self._model.parameters()) + list(self._model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def caption(self, images: list[Any], prompts: list[str]) -> list[RawCaption]:
        import torch

        self.load()
        processor, model = self._processor, self._model
        processor.tokenizer.padding_side = "left"  # batched decoder-only models generate after the prompt
        texts = [self._chat_text(p) for p in prompts]
        rgb = [image.convert("RGB") for image in images]
        inputs = processor(text=texts, images=rgb, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt = inputs["input_ids"]
        if output.shape[1] > prompt.shape[1] and torch.equal(output[:, : prompt.shape[1]], prompt):
            output = output[:, prompt.shape[1] :]  # decoder-only models echo the prompt
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return [
            RawCaption(text, truncated=len(row) >= self.max_new_tokens and not eos_ids & set(row.tolist()))
            for text, row in zip(processor.batch_decode(output, skip_special_tokens=True), output)
        ]

    def _chat_text(self, prompt: str) -> str:
        """The prompt inside the model's chat template, with the image before it; models without
        a chat template (Florence-2) take the prompt text as it is."""
        if not getattr(self._processor, "chat_template", None):
            return prompt
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        return self._processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)


# --- captioning a folder ----------------------------------------------------------------------


Outcome = str | Exception  # a cleaned caption, or why there is none


@dataclass(frozen=True)
class NLItem:
    image: Path
    grounding: Grounding = Grounding()


@dataclass
class NLReport:
    written: list[Path] = field(default_factory=list)  # the _nl.txt files written
    skipped: list[Path] = field(default_factory=list)  # images that already had one
    errors: dict[Path, str] = field(default_factory=dict)  # image -> what went wrong
    stopped: bool = False  # the stop flag ended the run early; what was written is kept

    def merge(self, other: NLReport) -> None:
        """Add another batch's report (runs made of several batches: ZeroGPU calls)."""
        self.written += other.written
        self.skipped += other.skipped
        self.errors.update(other.errors)
        self.stopped = self.stopped or other.stopped


def nl_caption_path(image: str | Path) -> Path:
    image = Path(image)
    return image.with_name(image.stem + "_nl.txt")


def _open_image(path: Path):
    """RGB, transparency composited onto white (as the taggers do)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")


def _caption_batch(backend: NLBackend, items: list[NLItem], prompts: list[str]) -> list[tuple[Path, Outcome]]:
    """Captions (or per-image errors) for one batch, in order; BackendUnavailable propagates."""
    outcomes: dict[int, Outcome] = {}
    images, ready = [], []
    for index, item in enumerate(items):
        try:
            images.append(_open_image(item.image))
            ready.append(index)
        except OSError as exc:
            outcomes[index] = CaptionError(f"cannot read the image: {exc}")
    if images:
        try:
            raws: list[RawCaption | Exception] = list(backend.caption(images, [prompts[i] for i in ready]))
        except BackendUnavailable:
            raise
        except StudioError as exc:
            raws = [exc] * len(images)
        except (RuntimeError, ValueError) as exc:  # the model failed on this batch (e.g. out of memory)
            raws = [CaptionError(f"{exc.__class__.__name__}: {exc}")] * len(images)
        for index, raw in zip(ready, raws, strict=True):
            text = raw if isinstance(raw, Exception) else clean_caption(raw.text, truncated=raw.truncated)
            outcomes[index] = text or CaptionError("the model returned an empty caption")
    return [(item.image, outcomes[index]) for index, item in enumerate(items)]


def _needing_captions(items: list[NLItem], existing: str) -> tuple[list[NLItem], list[Path]]:
    """(items to caption, images skipped because they have a non-empty `_nl.txt`)."""
    todo, skipped = [], []
    for item in items:
        target = nl_caption_path(item.image)
        if existing == "skip" and target.is_file() and target.read_text(encoding="utf-8").strip():
            skipped.append(item.image)
        else:
            todo.append(item)
    return todo, skipped


def caption_images(
    items: Iterable[NLItem],
    backend: NLBackend,
    template: str = DEFAULT_NL_TEMPLATE,
    existing: Literal["skip", "overwrite"] = "skip",
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> NLReport:
    """Write `{stem}_nl.txt` beside each image. Returns what was written, skipped and failed
    (and whether the stop flag ended the run early); raises BackendUnavailable (a StudioError)
    when the backend cannot work at all. Existing captions: "skip" keeps them, "overwrite" redoes."""
    # 1. Check inputs; decide which images need a caption.
    if existing not in ("skip", "overwrite"):
        raise ConfigError(f"existing NL captions: choose 'skip' or 'overwrite', not {existing!r}")
    check_template(template)
    items = list(items)
    todo, skipped = _needing_captions(items, existing)
    report = NLReport(skipped=skipped)
    total, done = len(items), len(skipped)
    if progress:
        progress(done, total)

    # 2. Batches in flight on a thread pool (stop checked before each); results are written as
    #    they come back, in this thread.
    batches = [todo[i : i + backend.batch_size] for i in range(0, len(todo), backend.batch_size)]
    pending: set[Future] = set()
    with ThreadPoolExecutor(max_workers=backend.concurrency, thread_name_prefix="nl-caption") as pool:
        try:
            while batches or pending:
                while batches and len(pending) < backend.concurrency and not (stop and stop.is_set()):
                    batch = batches.pop(0)
                    prompts = [render_prompt(template, item.grounding) for item in batch]
                    pending.add(pool.submit(_caption_batch, backend, batch, prompts))
                if not pending:
                    break  # stopped before submitting the rest
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    for image, outcome in future.result():
                        _record(report, image, outcome)
                        done += 1
                if progress:
                    progress(done, total)
        finally:
            for future in pending:
                future.cancel()
    report.stopped = bool(batches)
    return report


def _record(report: NLReport, image: Path, outcome: Outcome) -> None:
    if isinstance(outcome, Exception):
        report.errors[image] = str(outcome)
        return
    try:
        report.written.append(atomic_write_text(nl_caption_path(image), outcome))
    except OSError as exc:
        report.errors[image] = f"cannot write {nl_caption_path(image).name}: {exc}"
