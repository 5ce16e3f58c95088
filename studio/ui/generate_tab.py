"""The Generate tab: prompt builder, LoRA stack, sampler settings, hires pass, PNG Info and the
comparison grid. Components are built first, events wired in a second pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr

from studio.context import AppContext
from studio.errors import ConfigError, StudioError
from studio.generation.generate import config_from_form
from studio.generation.grid import run_grid
from studio.generation.infotext import (
    infotext_to_form,
    parse_infotext,
    parse_lora_hashes,
    read_infotext,
    split_lora_tags,
)
from studio.generation.prompt import builder_for
from studio.generation.samplers import SAMPLERS
from studio.jobs import Job
from studio.schemas import (
    AESTHETIC_TAGS,
    ANIMAGINE_SIZES,
    RATING_TAGS,
    SCORE_TAGS,
    YEAR_TAGS,
    GridConfig,
    PromptStyle,
    validate,
)
from studio.ui.format import job_status_line
from studio.ui.forms import (
    GENERATE_FIELDS,
    GENERATE_TEXT_FIELDS,
    LORA_SLOTS,
    as_dict,
    check_text,
    errors_in_status,
    generate_form,
    named_parameters,
    workspace_file,
)

CUSTOM = "Custom"
SIZE_CHOICES = [f"{w}x{h}" for w, h in ANIMAGINE_SIZES] + [CUSTOM]
AXIS_CHOICES = {"LoRA file": "lora", "LoRA weight": "lora_weight", "Seed": "seed", "CFG scale": "cfg", "Steps": "steps"}
POLL_SECONDS = 0.25


@dataclass
class GenerateTab:
    """Handles to the tab's components, for wiring and for tests."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    components: dict[str, gr.components.Component] = field(default_factory=dict)
    reconnect_outputs: list = field(default_factory=list)


def lora_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """(label, value): the workspace's LoRAs by name, then those of the owner's model folders
    (ComfyUI's loras/, A1111's Lora/) by absolute path."""
    from studio.models.folders import model_files

    folder = ctx.settings.loras_dir
    own = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    return [(name, name) for name in own] + model_files(ctx.settings.model_dirs, "lora")


def model_choices(ctx: AppContext, family: str | None = None) -> list[tuple[str, str]]:
    """(label, value): the catalog's models (of `family`, if given), then the checkpoints of the
    owner's model folders (ComfyUI's checkpoints/, A1111's Stable-diffusion/)."""
    from studio.models.folders import model_files

    names = [name for name, entry in ctx.manager.catalog.items() if family is None or entry.family == family]
    return [(name, name) for name in names] + model_files(ctx.settings.model_dirs, "checkpoint")


def lora_dropdowns(tab: GenerateTab) -> list:
    return [tab.fields[f"lora_{i}"] for i in range(1, LORA_SLOTS + 1)]


def model_defaults(ctx: AppContext, model: str | None = None) -> dict:
    entry = ctx.manager.catalog.get(model or ctx.settings.default_model)
    return dict(entry.defaults) if entry else {}


def family_defaults(ctx: AppContext, model: str) -> dict:
    """A catalog model's own defaults; for a file or folder of the Anima family (ComfyUI's
    Anima file), those of the catalog's Anima model, whose sampler and size it needs too."""
    if model in ctx.manager.catalog:
        return model_defaults(ctx, model)
    if model and model_family(ctx, model) == "anima":
        default = ctx.manager.catalog.get(ctx.settings.default_model)
        demo = default is not None and default.demo  # --demo: the demo's small sizes and steps
        entries = [e for e in ctx.manager.catalog.values() if e.family == "anima"]
        entry = next((e for e in entries if e.demo == demo), entries[0] if entries else None)
        return dict(entry.defaults) if entry else {}
    return {}


def sampler_choices(ctx: AppContext, model: str) -> list[str]:
    """The samplers the model's family can use (Anima's flow matching takes Euler and UniPC)."""
    from studio.generation.anima import ANIMA_SAMPLERS

    return list(ANIMA_SAMPLERS) if model_family(ctx, model) == "anima" else list(SAMPLERS)


def on_model_change(ctx: AppContext, model: str):
    """A catalog model, or a file of the Anima family, brings its recommended size, steps, CFG
    and sampler (the user's prompt stays); any other reference leaves the form as it is."""
    defaults = family_defaults(ctx, model)
    if not defaults:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Dropdown(choices=list(SAMPLERS))
    size = f"{defaults.get('width')}x{defaults.get('height')}"
    choices = sampler_choices(ctx, model)
    sampler = defaults.get("sampler") if defaults.get("sampler") in choices else choices[0]
    return (size if size in SIZE_CHOICES else CUSTOM, defaults.get("width", gr.skip()),
            defaults.get("height", gr.skip()), defaults.get("steps", gr.skip()),
            defaults.get("cfg_scale", gr.skip()), gr.Dropdown(choices=choices, value=sampler))


# -- building ------------------------------------------------------------------------------------
def build(ctx: AppContext) -> GenerateTab:
    tab = GenerateTab()
    f, c = tab.fields, tab.components
    defaults = model_defaults(ctx)
    size = f"{defaults.get('width', 1024)}x{defaults.get('height', 1024)}"
    with gr.Row():
        with gr.Column(scale=3):
            f["prompt"] = gr.Textbox(label="Prompt", lines=3, placeholder="1girl, hatsune miku, vocaloid, solo, smile",
                                     elem_id="gen-prompt")
            f["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, elem_id="gen-negative")
            builder = builder_for(model_family(ctx, ctx.settings.default_model))
            with gr.Accordion(builder.title, open=False, elem_id="gen-builder") as c["builder"]:
                with gr.Row():
                    f["quality_tags"] = gr.Checkbox(True, label=builder.quality_label, elem_id="gen-quality")
                    f["default_negative"] = gr.Checkbox(True, label="Model's negative prompt")
                with gr.Row():
                    f["aesthetic"] = gr.Dropdown(["", *AESTHETIC_TAGS], value="", label="Aesthetic",
                                                 visible="aesthetic" in builder.fields)
                    f["score"] = gr.Dropdown(["", *SCORE_TAGS], value="", label="Score (in place of score_7)",
                                             visible="score" in builder.fields, elem_id="gen-score")
                    f["year"] = gr.Dropdown(["", *YEAR_TAGS], value="", label="Year")
                    f["rating"] = gr.Dropdown(["", *RATING_TAGS], value="", label="Rating")
                f["artist"] = gr.Textbox("", label="Artist (written @name, after your tags)", max_lines=1,
                                         visible="artist" in builder.fields, elem_id="gen-artist")
                c["final_prompt"] = gr.Textbox(label="Final prompt", interactive=False, lines=2,
                                               elem_id="gen-final-prompt")
                c["final_negative"] = gr.Textbox(label="Final negative prompt", interactive=False, lines=2)
            with gr.Row():
                f["model"] = gr.Dropdown(model_choices(ctx), value=ctx.settings.default_model, label="Model",
                                         elem_id="gen-model",
                                         allow_custom_value=True, info="catalog name, hub id, or a path in the workspace")
                c["size"] = gr.Dropdown(SIZE_CHOICES, value=size if size in SIZE_CHOICES else CUSTOM, label="Size")
            with gr.Row():
                # number boxes the schema checks: a value typed outside 64-4096 is refused with a
                # message in the status line (a slider would clamp it silently; Gradio's own range
                # check would leave only a toast)
                f["width"] = gr.Number(defaults.get("width", 1024), label="Width", step=8, precision=0,
                                       info="64-4096, a multiple of 8", elem_id="gen-width")
                f["height"] = gr.Number(defaults.get("height", 1024), label="Height", step=8, precision=0,
                                        info="64-4096, a multiple of 8", elem_id="gen-height")
            with gr.Row():
                f["sampler"] = gr.Dropdown(sampler_choices(ctx, ctx.settings.default_model),
                                           value=defaults.get("sampler", "Euler a"), label="Sampler")
                f["steps"] = gr.Slider(1, 100, value=defaults.get("steps", 28), step=1, label="Steps")
                f["cfg_scale"] = gr.Slider(1, 15, value=defaults.get("cfg_scale", 6.0), step=0.5, label="CFG scale")
            with gr.Row():
                f["seed"] = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                f["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                f["batch_count"] = gr.Slider(1, 16, value=1, step=1, label="Batch count")
            with gr.Accordion("LoRA stack", open=False) as c["lora_stack"]:
                choices = lora_choices(ctx)
                for i in range(1, LORA_SLOTS + 1):
                    with gr.Row():
                        f[f"lora_{i}"] = gr.Dropdown([("", ""), *choices], value="", label=f"LoRA {i}",
                                                     allow_custom_value=True,
                                                     scale=3, elem_id=f"gen-lora-{i}")
                        f[f"lora_{i}_weight"] = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2,
                                                          elem_id=f"gen-lora-{i}-weight")
                with gr.Row():
                    c["lora_upload"] = gr.File(label="Add a LoRA (.safetensors) to workspace/loras",
                                               file_types=[".safetensors"], scale=3)
                    c["lora_refresh"] = gr.Button("Refresh list", scale=1)
            with gr.Accordion("Hires pass", open=False):
                f["hires"] = gr.Checkbox(False, label="Enable (upscale, then img2img)")
                with gr.Row():
                    f["hires_scale"] = gr.Slider(1.05, 4, value=1.5, step=0.05, label="Upscale by")
                    f["hires_denoise"] = gr.Slider(0.05, 1, value=0.55, step=0.05, label="Denoising strength")
                    f["hires_steps"] = gr.Slider(1, 100, value=15, step=1, label="Hires steps")
            with gr.Accordion("Advanced", open=False):
                f["vae"] = gr.Textbox("", label="Separate VAE (optional)", info="e.g. an fp16-fix VAE in workspace/models")
        with gr.Column(scale=4):
            with gr.Row():
                c["generate"] = gr.Button("Generate", variant="primary", elem_id="gen-button", scale=3)
                c["stop"] = gr.Button("Stop", variant="stop", elem_id="gen-stop", scale=1)
            f["wait_for_training"] = gr.Checkbox(False, label="While a run trains: wait for it to finish (ahead of "
                                                 "the queued runs) instead of being refused", elem_id="gen-wait")
            c["status"] = gr.Markdown("", elem_id="gen-status")
            c["gallery"] = gr.Gallery(label="This session's images", columns=3, height=520, elem_id="gen-gallery",
                                      format="png")
            c["infotext"] = gr.Textbox(label="Parameters (infotext) of the selected image", lines=4,
                                       interactive=False, buttons=["copy"])
    with gr.Accordion("PNG Info: read the parameters of any image", open=False):
        with gr.Row():
            c["png_file"] = gr.File(label="Drop a PNG made by the studio, A1111, Forge or ComfyUI", file_types=["image"],
                                    elem_id="gen-png-file")
            c["png_text"] = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="gen-png-text")
        c["png_send"] = gr.Button("Send to the form", elem_id="gen-png-send")
    grid_title = "Comparison grid (X/Y plot): pick an epoch and a weight"
    with gr.Accordion(grid_title, open=False) as c["grid_accordion"]:
        with gr.Row():
            c["x_kind"] = gr.Dropdown(list(AXIS_CHOICES), value="LoRA file", label="X axis")
            c["x_values"] = gr.Textbox(label="X values (comma separated; LoRA file names from workspace/loras)")
        with gr.Row():
            c["y_kind"] = gr.Dropdown(["", *AXIS_CHOICES], value="LoRA weight", label="Y axis")
            c["y_values"] = gr.Textbox("0.6, 0.8, 1.0", label="Y values")
        c["grid_button"] = gr.Button("Make grid", elem_id="gen-grid-button")
        c["grid_image"] = gr.Image(label="Grid", type="filepath", format="png", interactive=False,
                                   elem_id="gen-grid-image")
    c["session_images"] = gr.State([])
    c["api_gallery"] = gr.Gallery(visible=False, format="png")
    c["api_button"] = gr.Button(visible=False)
    c["grid_api_button"] = gr.Button(visible=False)
    return tab


# -- handlers ------------------------------------------------------------------------------------
VISITOR_LIMITS = ("Signed out, you can generate with the catalog models ({models}) without LoRAs or a separate "
                  "VAE: sign in with Hugging Face for your own workspace.")


def check_visitor_form(ctx: AppContext, values: dict) -> None:
    """A signed-out visitor of a multi-user Space generates with catalog models only."""
    if not ctx.is_visitor:
        return
    model = (values.get("model") or "").strip()
    loras = [values.get(f"lora_{i}") for i in range(1, LORA_SLOTS + 1)]
    if (model and model not in ctx.manager.catalog) or (values.get("vae") or "").strip() or any(loras):
        raise ConfigError(VISITOR_LIMITS.format(models=", ".join(ctx.manager.catalog)))


def _config(ctx: AppContext, values: tuple):
    values = as_dict(GENERATE_FIELDS, values)
    check_text(values, GENERATE_TEXT_FIELDS)
    check_visitor_form(ctx, values)
    form = generate_form(values, loras_dir=ctx.settings.loras_dir, workspace=ctx.settings.workspace,
                         catalog=ctx.manager.catalog, model_dirs=ctx.settings.model_dirs)
    return config_from_form(form, ctx.manager, ctx.settings.default_model)


def _start_generation(ctx: AppContext, values: tuple) -> Job:
    try:
        config = _config(ctx, values)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    run = ctx.generate_function()
    wait = as_dict(GENERATE_FIELDS, values).get("wait_for_training") is True

    def work(job: Job):
        if wait:
            wait_for_training(ctx, job)
        return run(ctx.manager, config, outputs_dir=ctx.settings.outputs_dir,
                   default_model=ctx.settings.default_model, report=job.report, stop=job.stop_event)

    return ctx.jobs.start("generate", work)


def wait_for_training(ctx: AppContext, job: Job, poll: float = 0.5) -> None:
    """Asked to wait rather than be refused: hold until the training run ends (and the queue's
    next run does not start before this generation has the GPU). Stop ends the wait."""
    if not ctx.training_running():
        return
    with ctx.generation_waiting():
        while ctx.training_running():
            job.check_stop()
            queued = sum(1 for e in ctx.run_queue.read().entries if e.state == "waiting")
            job.report(None, "waiting for the training run to finish" + (f" (then before the {queued} queued run(s))"
                                                                          if queued else ""))
            time.sleep(poll)


def _finish(job: Job):
    """The job's result, or a gr.Error carrying its message."""
    if job.state == "failed":
        raise gr.Error(job.error or "generation failed")
    for warning in getattr(job.result, "warnings", []):
        gr.Warning(warning)
    return job.result


def done_status(count: int, elapsed: float, result) -> str:
    """'Done: 2 image(s) in 3.1s · model X · memory: needs ~9.1 GB of VRAM, you have 24.0 GB free'."""
    status = f"Done: {count} image(s) in {elapsed:.1f}s · model {result.model}"
    return status + (f" · memory: {result.memory_plan}" if result.memory_plan else "")


def on_generate(ctx: AppContext, session: list, *values):
    """UI handler: streams progress while the job runs, then shows the session's images."""
    job = _start_generation(ctx, values)
    while job.running:
        yield gr.skip(), job_status_line(job), gr.skip(), gr.skip()
        time.sleep(POLL_SECONDS)
    if job.state == "stopped":
        yield gr.skip(), "Stopped.", gr.skip(), gr.skip()
        return
    result = _finish(job)
    new = [(str(image.path), f"seed {image.seed}") for image in result.images]
    session = new + list(session)
    status = done_status(len(result.images), job.elapsed, result)
    yield session, status, result.images[0].infotext if result.images else "", session


def on_reconnect(ctx: AppContext):
    """A page opened (or reloaded) while a generation or grid runs: follow its progress in the
    status line, then show what it made, as the page that started it would have."""
    job = next((j for j in map(ctx.jobs.latest, ("generate", "grid")) if j is not None and j.running), None)
    if job is None:
        return
    while job.running:
        yield gr.skip(), job_status_line(job), gr.skip(), gr.skip(), gr.skip()
        time.sleep(POLL_SECONDS)
    if job.state == "stopped":
        yield gr.skip(), "Stopped.", gr.skip(), gr.skip(), gr.skip()
    elif job.state == "failed":
        yield gr.skip(), f"⚠ **Error:** {job.error}", gr.skip(), gr.skip(), gr.skip()
    elif job.name == "grid":
        yield gr.skip(), f"Grid done in {job.elapsed:.1f}s: {job.result.path.name}", gr.skip(), gr.skip(), \
            str(job.result.path)
    else:
        shown = [(str(image.path), f"seed {image.seed}") for image in job.result.images]
        status = done_status(len(shown), job.elapsed, job.result)
        infotext = job.result.images[0].infotext if job.result.images else ""
        yield shown, status, infotext, shown, gr.skip()


def api_generate(ctx: AppContext, *values):
    """The /generate API endpoint: same inputs as the form, returns the image files."""
    job = _start_generation(ctx, values)
    job.wait()
    result = _finish(job)
    if job.state == "stopped":
        raise gr.Error("generation was stopped")
    return [(str(image.path), f"seed {image.seed}") for image in result.images]


def on_stop(ctx: AppContext):
    running = [job for job in map(ctx.jobs.latest, ("generate", "grid")) if job is not None and job.running]
    if not running:
        return "Nothing is being generated."
    for job in running:
        job.stop()
    return "Stopping after the current step..."


def on_select(evt: gr.SelectData):
    path = evt.value["image"]["path"] if isinstance(evt.value, dict) else None
    return (read_infotext(path) or "") if path else ""


PREVIEW_STYLE = ("quality_tags", "aesthetic", "year", "rating", "default_negative", "score", "artist")


def on_preview(ctx: AppContext, model, prompt, negative, *style_values):
    """Exactly the prompts the model will get: its own family's builder."""
    values = {k: v if isinstance(v, bool) else (v or "") for k, v in zip(PREVIEW_STYLE, style_values)}
    try:
        style = validate(PromptStyle, values)
    except StudioError as exc:
        return f"⚠ {exc}", ""
    return builder_for(model_family(ctx, model)).build(prompt or "", negative or "", style)


def model_family(ctx: AppContext, model: str | None) -> str:
    """The family of a catalog name, or of a model folder or file in the workspace; SDXL when
    it cannot tell (a hub id not downloaded yet)."""
    from studio.paths import Resolver

    entry = ctx.manager.catalog.get(model or "")
    if entry is not None:
        return entry.family
    try:
        reference = Resolver.for_settings(ctx.settings).model(model, ctx.manager.catalog)
        return ctx.manager.resolve(reference).family if reference else "sdxl"
    except StudioError:
        return "sdxl"


def on_builder(ctx: AppContext, model: str):
    """The prompt builder of the model's family: its title, its quality tags, its own fields."""
    builder = builder_for(model_family(ctx, model))
    return (gr.update(label=builder.title), gr.update(label=builder.quality_label),
            *(gr.update(visible=name in builder.fields) for name in ("aesthetic", "score", "artist")))


def on_size(choice: str):
    if choice == CUSTOM:
        return gr.skip(), gr.skip()
    width, height = (int(v) for v in choice.split("x"))
    return width, height


def on_png_file(path: str | None):
    if not path:
        return ""
    return read_infotext(path) or "This image carries no generation parameters."


def png_to_form(text: str, field_names: list[str], loras_dir: Path | None = None):
    """Fill the form from infotext; fields the text does not mention are left as they are. With
    `loras_dir`, the LoRA stack becomes the image's (`<lora:name:weight>` in the prompt, as A1111
    writes it, or its `Lora hashes`), each found by name or hash; the ones not there are named."""
    prompt, negative, params = parse_infotext(text or "")
    if not params and not prompt:
        raise gr.Error("no parameters to send: drop an image with generation parameters first")
    prompt, tags = split_lora_tags(prompt)
    values = {"prompt": prompt, "negative_prompt": negative, **infotext_to_form(params)}
    if loras_dir is not None:
        values.update(png_loras(loras_dir, tags, parse_lora_hashes(str(params.get("Lora hashes", "")))))
    hires = values.pop("hires", None)
    if hires:
        values.update(hires=True, hires_scale=hires.get("scale"), hires_denoise=hires.get("denoise"),
                      hires_steps=hires.get("steps"))
    return [values[name] if values.get(name) is not None else gr.skip() for name in field_names]


def png_loras(loras_dir: Path, tags: list[tuple[str, float]], hashes: dict[str, str]) -> dict:
    """The LoRA slots for an image's LoRAs: found in `loras_dir` by file name, else by hash."""
    from studio.generation.infotext import lora_hash

    listed = tags or [(name, None) for name in hashes]
    by_hash: dict[str, Path] | None = None
    slots: dict = {}
    missing, unweighted = [], []
    for name, weight in listed:
        path = loras_dir / f"{name}.safetensors"
        if not path.is_file() and hashes.get(name):
            if by_hash is None:
                by_hash = {lora_hash(f): f for f in sorted(loras_dir.glob("*.safetensors")) if f.is_file()}
            path = by_hash.get(hashes[name], path)
        if not path.is_file():
            missing.append(f"{name}" + (f" (hash {hashes[name]})" if hashes.get(name) else ""))
            continue
        if len(slots) // 2 == LORA_SLOTS:
            missing.append(f"{name} (only {LORA_SLOTS} LoRA slots)")
            continue
        index = len(slots) // 2 + 1
        slots[f"lora_{index}"], slots[f"lora_{index}_weight"] = path.name, 1.0 if weight is None else weight
        if weight is None:
            unweighted.append(path.name)
    for index in range(len(slots) // 2 + 1, LORA_SLOTS + 1):
        slots[f"lora_{index}"], slots[f"lora_{index}_weight"] = "", 1.0
    if missing:
        gr.Warning(f"Not in {loras_dir.name}/, so left out of the LoRA stack: {', '.join(missing)}. "
                   "Upload it and send the image again.")
    if unweighted:
        gr.Info(f"The image names {', '.join(unweighted)} without a weight: set to 1.")
    return slots


def on_lora_upload(ctx: AppContext, path: str | None):
    if path and ctx.is_visitor:
        from studio.ui.users import SIGN_IN

        raise gr.Error(SIGN_IN)
    if path:
        from studio.generation.lora import import_lora_file

        try:
            import_lora_file(Path(path), ctx.settings.loras_dir)
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
    return on_lora_refresh(ctx)


def on_lora_refresh(ctx: AppContext):
    choices = [("", ""), *lora_choices(ctx)]
    return [gr.Dropdown(choices=choices) for _ in range(LORA_SLOTS)]


def _axis_values(ctx: AppContext, kind: str, text: str) -> list:
    values = [v.strip() for v in (text or "").split(",") if v.strip()]
    if kind == "lora":
        return [workspace_file(v, [ctx.settings.loras_dir], ctx.settings.workspace, "LoRA", ctx.settings.model_dirs)
                for v in values]
    return values


def on_grid(ctx: AppContext, x_kind, x_values, y_kind, y_values, *values):
    try:
        base = _config(ctx, values)
        x = {"kind": AXIS_CHOICES[x_kind], "values": _axis_values(ctx, AXIS_CHOICES[x_kind], x_values)}
        y = {"kind": AXIS_CHOICES[y_kind], "values": _axis_values(ctx, AXIS_CHOICES[y_kind], y_values)} if y_kind else None
        grid = validate(GridConfig, {"base": base.model_dump(), "x": x, "y": y})
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    job = ctx.jobs.start("grid", lambda job: run_grid(
        ctx.manager, grid, outputs_dir=ctx.settings.outputs_dir, default_model=ctx.settings.default_model,
        report=job.report, stop=job.stop_event, generate_cell=ctx.generate_function()))
    while job.running:
        yield gr.skip(), job_status_line(job)
        time.sleep(POLL_SECONDS)
    if job.state == "stopped":
        yield gr.skip(), "Grid stopped."
        return
    result = _finish(job)
    yield str(result.path), f"Grid done in {job.elapsed:.1f}s: {result.path.name}"


# -- wiring --------------------------------------------------------------------------------------
def wire(ctx: AppContext, tab: GenerateTab) -> None:
    f, c = tab.fields, tab.components
    inputs = [f[name] for name in GENERATE_FIELDS]
    c["generate"].click(
        errors_in_status(partial(on_generate, ctx), 4, 1),
        inputs=[c["session_images"], *inputs],
        outputs=[c["gallery"], c["status"], c["infotext"], c["session_images"]],
        api_visibility="private",
        concurrency_id="gpu",
    )
    c["api_button"].click(named_parameters(partial(api_generate, ctx), GENERATE_FIELDS, required=("prompt",)),
                          inputs=inputs, outputs=c["api_gallery"],
                          api_name="generate", concurrency_id="gpu",
                          api_description="Generate images; returns the PNG files (with A1111 infotext).")
    c["stop"].click(lambda: on_stop(ctx), outputs=c["status"], api_name="stop", queue=False)
    tab.reconnect_outputs = [c["gallery"], c["status"], c["infotext"], c["session_images"], c["grid_image"]]
    c["gallery"].select(on_select, outputs=c["infotext"], api_visibility="private")
    preview_inputs = [f["model"], f["prompt"], f["negative_prompt"], *(f[n] for n in PREVIEW_STYLE)]
    for component in preview_inputs:
        # one at a time, in order: answers to quick edits never land out of order (a stale preview)
        component.change(partial(on_preview, ctx), inputs=preview_inputs,
                         outputs=[c["final_prompt"], c["final_negative"]], api_visibility="private",
                         show_progress="hidden", concurrency_id="preview", concurrency_limit=1,
                         trigger_mode="always_last")
    f["model"].change(partial(on_builder, ctx), inputs=f["model"],
                      outputs=[c["builder"], f["quality_tags"], f["aesthetic"], f["score"], f["artist"]],
                      api_visibility="private", queue=False, show_progress="hidden")
    f["model"].change(partial(on_model_change, ctx), inputs=f["model"],
                      outputs=[c["size"], f["width"], f["height"], f["steps"], f["cfg_scale"], f["sampler"]],
                      api_visibility="private", queue=False)
    c["size"].change(on_size, inputs=c["size"], outputs=[f["width"], f["height"]], api_visibility="private",
                     queue=False)
    c["png_file"].change(on_png_file, inputs=c["png_file"], outputs=c["png_text"], api_name="png_info")
    field_names = [n for n in GENERATE_FIELDS if n not in ("model", "vae")]
    c["png_send"].click(lambda text: png_to_form(text, field_names, ctx.settings.loras_dir), inputs=c["png_text"],
                        outputs=[f[n] for n in field_names], api_visibility="private")
    lora_dropdowns = [f[f"lora_{i}"] for i in range(1, LORA_SLOTS + 1)]
    c["lora_upload"].upload(lambda path: on_lora_upload(ctx, path), inputs=c["lora_upload"], outputs=lora_dropdowns,
                            api_visibility="private")
    c["lora_refresh"].click(lambda: on_lora_refresh(ctx), outputs=lora_dropdowns, api_visibility="private")
    grid_inputs = [c["x_kind"], c["x_values"], c["y_kind"], c["y_values"], *inputs]
    c["grid_button"].click(errors_in_status(partial(on_grid, ctx), 2, 1), inputs=grid_inputs,
                           outputs=[c["grid_image"], c["status"]], api_visibility="private", concurrency_id="gpu")
    c["grid_api_button"].click(  # the API's errors stay errors
        named_parameters(partial(on_grid, ctx), ("x_axis", "x_values", "y_axis", "y_values", *GENERATE_FIELDS),
                         required=("x_axis", "x_values", "y_axis", "y_values", "prompt")),
        inputs=grid_inputs,
        outputs=[c["grid_image"], c["status"]],
        api_name="grid",
        concurrency_id="gpu",
    )
