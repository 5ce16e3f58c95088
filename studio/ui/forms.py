"""Form values <-> config dicts, and workspace path checks. Pure functions, tested without a
browser. Gradio passes inputs positionally; each tab declares its field names once and zips."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

from studio.errors import ConfigError
from studio.paths import Resolver, model_reference

LORA_SLOTS = 4

GENERATE_FIELDS: tuple[str, ...] = (
    "prompt",  # first: the API's one required input
    "negative_prompt",
    "model",
    "vae",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampler",
    "seed",
    "batch_size",
    "batch_count",
    "quality_tags",
    "aesthetic",
    "year",
    "rating",
    "default_negative",
    "score",
    "artist",
    *(name for i in range(1, LORA_SLOTS + 1) for name in (f"lora_{i}", f"lora_{i}_weight")),
    "hires",
    "hires_scale",
    "hires_denoise",
    "hires_steps",
    "wait_for_training",  # last: positional API callers keep their order
)
STYLE_FIELDS = ("quality_tags", "aesthetic", "year", "rating", "default_negative", "score", "artist")


def as_dict(names: tuple[str, ...], values: tuple) -> dict:
    if len(names) != len(values):
        raise ValueError(f"form has {len(values)} values for {len(names)} fields")
    return dict(zip(names, values))


def named_parameters(fn: Callable, names: tuple[str, ...], required: tuple[str, ...] = ()) -> Callable:
    """`fn(*values)` with a signature of named parameters, so the API documents each input by its
    form name (`prompt`, `steps`, ...) rather than `param_3`. Gradio takes the defaults from the
    components' initial values; only `required` names have none."""

    if inspect.isgeneratorfunction(fn):  # keep streaming handlers streaming

        @functools.wraps(fn)
        def wrapper(*values):
            yield from fn(*values)
    else:

        @functools.wraps(fn)
        def wrapper(*values):
            return fn(*values)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    wrapper.__signature__ = inspect.Signature(
        [inspect.Parameter(name, kind, **({} if name in required else {"default": None})) for name in names]
    )
    return wrapper


def workspace_file(value: str, search_dirs: list[Path], workspace: Path, what: str,
                   model_dirs: tuple[Path, ...] = ()) -> str:
    """A file a request names (see Resolver.file)."""
    return Resolver(workspace, tuple(model_dirs)).file(value, search_dirs, what)


GENERATE_TEXT_FIELDS = ("prompt", "negative_prompt", "model", "vae", "sampler", "aesthetic", "year", "rating", "score",
                        "artist",
                        *(f"lora_{i}" for i in range(1, LORA_SLOTS + 1)))


def check_text(values: dict, names) -> None:
    """API callers may send any JSON: a text input must be text (or left out)."""
    for name in names:
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name}: expected text, got {type(value).__name__} {str(value)[:40]!r}")


def generate_form(values: dict, *, loras_dir: Path, workspace: Path, catalog: dict,
                  model_dirs: tuple[Path, ...] = ()) -> dict:
    """The Generate tab's flat form as GenerateConfig fields (nested style, LoRA list, hires)."""
    check_text(values, GENERATE_TEXT_FIELDS)
    form = {k: values[k] for k in ("prompt", "negative_prompt", "model", "vae", "width", "height", "steps",
                                   "cfg_scale", "sampler", "seed", "batch_size", "batch_count")}
    for name in ("width", "height", "steps", "seed", "batch_size", "batch_count"):
        if form[name] is not None:
            form[name] = int(form[name])
    form["model"] = model_reference(form["model"], catalog, workspace, model_dirs=model_dirs)
    form["vae"] = model_reference(form["vae"], {}, workspace, what="VAE", model_dirs=model_dirs)
    form["style"] = {name: values[name] for name in STYLE_FIELDS if values.get(name) is not None}
    form["loras"] = [
        {"path": workspace_file(values[f"lora_{i}"], [loras_dir], workspace, "LoRA", model_dirs),
         "weight": float(values[f"lora_{i}_weight"])}
        for i in range(1, LORA_SLOTS + 1)
        if values.get(f"lora_{i}")
    ]
    if values["hires"]:
        form["hires"] = {"scale": values["hires_scale"], "denoise": values["hires_denoise"],
                         "steps": int(values["hires_steps"])}
    return form


def input_names(app) -> dict[int, str]:
    """Each input component's name as the API documents it (the handler's parameter name), else
    its label: what a refusal of its value should say."""
    names: dict[int, str] = {}
    public_first = sorted(app.fns.values(), key=lambda fn: getattr(fn, "api_visibility", "") != "public")
    for fn in public_first:
        try:
            params = [name for name, p in inspect.signature(fn.fn).parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] if fn.fn else []
        except (TypeError, ValueError):
            params = []
        for index, block in enumerate(fn.inputs):
            if index < len(params) and not params[index].startswith("_") and block._id not in names:
                names[block._id] = params[index]
    for block in app.blocks.values():
        label = getattr(block, "label", None)
        if block._id not in names and isinstance(label, str) and label:
            names[block._id] = label
    return names


def name_input_errors(app) -> None:
    """Gradio refuses a value outside a slider's range or a dropdown's choices itself, before any
    handler runs, with "Value 100000 is greater than maximum value 2048." or "Could not preprocess
    input component at index 6": the refusal names the field instead (`width: ...`)."""
    import gradio as gr

    for block_id, name in input_names(app).items():
        block = app.blocks.get(block_id)
        if block is None or not hasattr(block, "preprocess") or getattr(block, "_names_errors", False):
            continue
        expected = "a number" if isinstance(block, (gr.Slider, gr.Number)) else f"a {type(block).__name__} value"
        block.preprocess = _naming(block.preprocess, name, expected, gr.Error)
        block._names_errors = True


def _naming(preprocess: Callable, name: str, expected: str, error: type) -> Callable:
    @functools.wraps(preprocess)
    def wrapper(payload):
        try:
            return preprocess(payload)
        except error as exc:
            raise error(f"{name}: {exc.message}") from None
        except Exception:  # noqa: BLE001 - a wrong-typed value: say which field and what came
            raise error(f"{name}: expected {expected}, got {str(payload)[:60]!r}") from None

    return wrapper


def errors_in_status(fn: Callable, outputs: int, status: int) -> Callable:
    """`fn` (a handler, or a generator of updates) for a button whose outputs include a status
    line at index `status`: an error it raises shows as a toast *and* stays in the status line
    ("⚠ Error: ..."), instead of a toast that fades and leaves a stale progress line marked
    "Error". The handler itself still raises, for its callers and tests."""
    import gradio as gr

    def failed(exc: gr.Error):
        gr.Warning(exc.message, title="Error")
        values = [gr.skip()] * outputs
        values[status] = f"⚠ **Error:** {exc.message}"
        return tuple(values) if outputs > 1 else values[0]

    if inspect.isgeneratorfunction(fn) or inspect.isgeneratorfunction(getattr(fn, "func", None)):

        @functools.wraps(fn)
        def streaming(*args):
            try:
                yield from fn(*args)
            except gr.Error as exc:
                yield failed(exc)

        return streaming

    @functools.wraps(fn)
    def plain(*args):
        try:
            return fn(*args)
        except gr.Error as exc:
            return failed(exc)

    return plain
