"""The Train tab: a preset and the essential settings up front, the rest under Advanced; a dataset
summary; Start, Stop and Resume of the one training job; the live loss and learning-rate plots, the
samples and the checkpoints of a run, which go to the Generate tab (as a LoRA, or as the X axis of
its comparison grid).

Components are built first, events wired in a second pass. Training runs as a background job of
the app (studio.training.job); a gr.Timer re-reads the shown run's folder (events.jsonl, loras/),
so a page reload finds the run, its curve and its samples again."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr

from studio.context import AppContext
from studio.errors import ConfigError, StudioError
from studio.jobs import Job
from studio.ui import evaluation_view
from studio.ui import train_form as form
from studio.ui import train_view as view
from studio.ui.caption_form import dataset_choices, dataset_path
from studio.ui.forms import LORA_SLOTS, as_dict, check_text, errors_in_status, named_parameters
from studio.ui.generate_tab import GenerateTab, lora_choices
from studio.ui.publish_view import build_publish_panel, wire_publish_panel

JOB_NAME = "train"  # studio.training.job.JOB_NAME, without importing the engine at app start
REFRESH_SECONDS = 1.0
VIEW = ("datasets", "preset", "run", "status", "loss_plot", "lr_plot", "samples", "checkpoints", "seen")


@dataclass
class TrainTab:
    """Handles to the tab's components: `fields` are the form (form.TRAIN_FIELDS)."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    components: dict[str, gr.components.Component] = field(default_factory=dict)


# -- building ------------------------------------------------------------------------------------
def build(ctx: AppContext) -> TrainTab:
    tab = TrainTab()
    preset = form.default_preset(ctx.settings)
    values = form.form_values(form.preset_config(ctx.settings, preset))
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=420):
            form.build_essentials(ctx, tab.fields, tab.components, values, preset)
            with gr.Accordion("Advanced", open=False):
                form.build_advanced(tab.fields, tab.components, values)
            with gr.Accordion("Save these settings as a preset", open=False), gr.Row(equal_height=False):
                tab.components["preset_name"] = gr.Textbox(label="Preset name", placeholder="my character", scale=3)
                tab.components["preset_save"] = gr.Button("Save", scale=1, min_width=70)
        with gr.Column(scale=3, min_width=480):
            _build_monitor(tab.components)
            tab.components["publish"] = build_publish_panel(ctx, run=tab.components["run"])
    c = tab.components
    c["seen"] = gr.State(None)  # what this page shows already (see refresh)
    c["timer"] = gr.Timer(REFRESH_SECONDS)
    c["api_dataset"] = gr.Textbox(visible=False)
    c["api_preset"] = gr.Textbox(preset, visible=False)
    c["api_steps"] = gr.Number(None, visible=False, precision=0)
    c["api_epochs"] = gr.Number(None, visible=False, precision=0)
    c["api_name"] = gr.Textbox(None, visible=False)
    c["api_settings"] = gr.JSON(None, visible=False)
    c["api_run"] = gr.Textbox(None, label="run folder", visible=False)
    c["api_text"] = gr.Textbox(label="status", visible=False)
    c["api_details"] = gr.JSON(label="details", visible=False)
    c["api_buttons"] = [gr.Button(visible=False) for _ in range(3)]
    c["api_queue"] = gr.Checkbox(False, visible=False)
    c["api_entry"] = gr.Textbox(None, visible=False)
    return tab


def _build_monitor(c: dict) -> None:
    with gr.Row():
        c["start"] = gr.Button("Start training", variant="primary", scale=2, elem_id="train-start")
        c["queue_add"] = gr.Button("Add to queue", scale=1, elem_id="train-queue-add")
        c["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="train-stop")
        c["resume"] = gr.Button("Resume", scale=1, elem_id="train-resume")
    c["run"] = gr.Dropdown([], value=None, label="Run", elem_id="train-run",
                           info="the run shown below, from workspace/runs; Resume continues it with its own config")
    c["status"] = gr.Markdown("", elem_id="train-status")
    with gr.Row(equal_height=True):
        c["loss_plot"] = gr.LinePlot(x="step", y="loss", color="series", color_map=view.SERIES_COLORS,
                                     colors_in_legend=[], height=260, elem_id="train-loss",
                                     label="Loss: raw (light), smoothed (dark), validation (orange)")
        c["lr_plot"] = gr.LinePlot(x="step", y="learning rate", label="Learning rate", height=260,
                                   y_axis_format=".1e", elem_id="train-lr")
    evaluation_view.build(c)  # checkpoint evaluation: its table and plot under the loss plot
    c["samples"] = gr.Gallery(label="Samples (newest first)", columns=5, fit_columns=False, height=260,
                              object_fit="contain", format="png", elem_id="train-samples")
    c["checkpoints"] = gr.CheckboxGroup([], label="Checkpoints (the run's loras/)", elem_id="train-checkpoints",
                                        info="pick one for Generate, or several to compare (none: all)")
    with gr.Row():
        c["use"] = gr.Button("Use in Generate", elem_id="train-use")
        c["compare"] = gr.Button("Compare epochs", elem_id="train-compare")
    with gr.Accordion("Run queue", open=False, elem_id="train-queue-box"):
        c["queue_table"] = gr.Dataframe(headers=list(QUEUE_COLUMNS), interactive=False, elem_id="train-queue",
                                        label="Runs train one after another; the queue survives a restart")
        with gr.Row():
            c["queue_pick"] = gr.Dropdown([], label="Waiting run", scale=3, elem_id="train-queue-pick")
            c["queue_up"] = gr.Button("Up", scale=1, min_width=60, elem_id="train-queue-up")
            c["queue_down"] = gr.Button("Down", scale=1, min_width=60, elem_id="train-queue-down")
            c["queue_cancel"] = gr.Button("Cancel", scale=1, min_width=60, elem_id="train-queue-cancel")
            c["queue_pause"] = gr.Button("Pause / continue", scale=1, min_width=90, elem_id="train-queue-pause")
        c["queue_msg"] = gr.Markdown("", elem_id="train-queue-msg")


# -- handlers: the form ---------------------------------------------------------------------------
def _config(ctx: AppContext, values: tuple):
    return form.config_from_form(as_dict(form.TRAIN_FIELDS, values), ctx.settings)


def on_preset(ctx: AppContext, name: str) -> list:
    try:
        values = form.form_values(form.preset_config(ctx.settings, name))
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    return [values[n] for n in form.PRESET_FIELDS]


def on_datasets(names: list[str], output_name: str):
    """The first dataset names the run, unless the user named it already."""
    if names and (output_name or "").strip() in ("", "lora"):
        return form.run_name(names[0])
    return gr.skip()


def on_summary(ctx: AppContext, *values):
    if not as_dict(form.TRAIN_FIELDS, values)["datasets"]:
        return "Choose a dataset to see its images, buckets and steps.", None
    try:
        config = _config(ctx, values)
        summary = view.summarize(config, ctx.settings.runs_dir, ctx.settings.models_dir)
    except StudioError as exc:
        return f"⚠ {exc}", None
    return view.summary_markdown(summary, config), summary.buckets


def on_plan(ctx: AppContext, *values) -> str:
    """The form's run as a memory plan on this machine's training device."""
    from studio.training.memory_plan import plan_for_this_machine

    try:
        config = config_models_inside(ctx, _config(ctx, values))
        plan = plan_for_this_machine(config, ctx.settings.models_dir, ctx.manager.device)
    except StudioError as exc:
        return f"⚠ {exc}"
    verdict = {True: "✅ fits", False: "⚠ does not fit", None: ""}[plan.fits]
    lines = [f"**{verdict}** {plan.summary()}".strip(), f"{plan.details()}"]
    lines += [f"note: {note}" for note in plan.notes]
    return "  \n".join(lines)


def on_save_preset(ctx: AppContext, name: str, *values):
    try:
        path = form.save_preset(as_dict(form.TRAIN_FIELDS, values), ctx.settings, name)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    gr.Info(f"Saved the preset {path.stem} ({path})")
    return gr.Dropdown(choices=form.preset_store(ctx.settings).names(), value=path.stem)


# -- handlers: the job ----------------------------------------------------------------------------
def config_models_inside(ctx: AppContext, config):
    """The run's base model, VAE and datasets: catalog names, repo ids or paths inside the workspace.
    On a server strangers reach, torch_compile is refused: its first step compiles for minutes on
    the GPU lane, where Stop cannot end it."""
    from studio.paths import Resolver

    if config.torch_compile and ctx.settings.reachable_by_strangers:
        raise ConfigError("torch_compile is for a machine you own: compiling holds the GPU for minutes, past Stop, "
                          "so it is off on a shared server (a Space, --share or a public --host)")
    return Resolver.for_settings(ctx.settings).train_config(config, ctx.manager.catalog)


def start_run(ctx: AppContext, config, run_dir: Path, resume: bool) -> Job:
    """Start the job and wait until it holds the GPU lane (or failed to get it)."""
    from studio.training.job import start_training

    if ctx.settings.zero_gpu:
        raise ConfigError("training cannot run on ZeroGPU (each GPU call is capped): use a dedicated GPU Space")
    config = config_models_inside(ctx, config)
    job = start_training(ctx.jobs, ctx.manager, config, run_dir=run_dir, workspace=ctx.settings.workspace,
                         resume=resume)
    deadline = time.monotonic() + 10
    while job.running and not job.events and time.monotonic() < deadline:
        time.sleep(0.05)
    if job.state == "failed":
        if not resume and not (run_dir / "events.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # it never started: leave no empty run behind
        raise StudioError(job.error or "training failed to start")
    return job


def _started(ctx: AppContext, run_dir: Path, verb: str):
    """The run picker showing the run, and a first status line."""
    names = [p.name for p in view.list_runs(ctx.settings.runs_dir)]
    return gr.Dropdown(choices=names, value=run_dir.name), f"**{verb}** {run_dir.name}..."


def on_start(ctx: AppContext, *values):
    from studio.training.runs import new_run_dir

    try:
        config = _config(ctx, values)
        run_dir = new_run_dir(ctx.settings.runs_dir, config.output_name)
        start_run(ctx, config, run_dir, resume=False)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    return _started(ctx, run_dir, "Starting")


def on_resume(ctx: AppContext, run: str | None):
    from studio.training.checkpoint import list_states
    from studio.training.loop import read_events
    from studio.training.runs import read_run_config

    try:
        run_dir = view.run_folder(ctx.settings.runs_dir, run)
        if not list_states(run_dir):
            raise ConfigError(f"{run_dir.name} has no saved state to resume from (it stopped before its first "
                              "checkpoint): start a new run")
        if view.progress(read_events(run_dir))["ended"] == "done":
            raise ConfigError(f"{run_dir.name} has finished all its steps; to train longer, start a new run")
        start_run(ctx, read_run_config(run_dir), run_dir, resume=True)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    return _started(ctx, run_dir, "Resuming")


def stop_training(ctx: AppContext) -> bool:
    """Ask the running training job to stop after its current step (it saves a checkpoint)."""
    job = ctx.jobs.latest(JOB_NAME)
    if job is None or not job.running:
        return False
    job.stop()
    return True


def on_stop(ctx: AppContext):
    if stop_training(ctx):
        return "**Stopping** after the current step (saving a checkpoint)..."
    gr.Info("No training run is going.")
    return gr.skip()


def _job_state(ctx: AppContext, run_dir: Path) -> tuple[str | None, str, str | None]:
    """(state, message, error) of the training job when it is this run's: the job of the run whose
    config was written last. A finished job's state is its result's (done, stopped, failed)."""
    job = ctx.jobs.latest(JOB_NAME)
    runs = view.list_runs(ctx.settings.runs_dir)
    if job is None or not runs or runs[0] != run_dir:
        return None, "", None
    state = job.state
    if state == "running" and job.stop_requested:
        state = "stopping"
    elif state == "done" and job.result is not None:
        state = job.result.status
    return state, job.message, job.error


def refresh(ctx: AppContext, run: str | None, seen: dict | None) -> dict:
    """The run view, only the parts that changed since `seen` (what this page shows already; None
    on a fresh page, which also gets fresh dataset and preset choices). A page showing the latest
    run follows a newer one (started here, by the API or in another tab); an older run the user
    picked stays."""
    from studio.training.loop import read_events

    settings, out = ctx.settings, {}
    runs = view.list_runs(settings.runs_dir)
    if seen is None:
        out["datasets"] = gr.Dropdown(choices=dataset_choices(settings))
        out["preset"] = gr.Dropdown(choices=form.preset_store(settings).names())
    seen = dict(seen or {})
    names, latest = [p.name for p in runs], (seen.get("runs") or [None])[0]
    following = run not in names or run == latest
    path = (runs[0] if runs else None) if following else settings.runs_dir / run
    if names != seen.get("runs") or (path and path.name) != run:
        out["run"] = gr.Dropdown(choices=names, value=path.name if path else None)
    if path is None:
        out["status"] = "No training run yet: choose a dataset and press Start."
        return {**out, "seen": {**seen, "runs": names}}
    events_file = path / "events.jsonl"
    stamp = events_file.stat().st_mtime_ns if events_file.is_file() else 0
    state = _job_state(ctx, path)
    key = (path.name, stamp, state)
    if key != seen.get("key"):
        events = read_events(path)
        out["status"] = view.status_line(events, *state)
        if (path.name, stamp) != seen.get("events"):
            out["loss_plot"], out["lr_plot"] = view.loss_frame(events), view.lr_frame(events)
        samples = view.sample_entries(events)
        if (path.name, samples) != seen.get("samples"):
            out["samples"] = samples
        seen.update(events=(path.name, stamp), samples=(path.name, samples))
    found = (path.name, view.checkpoints(path))
    if found != seen.get("checkpoints"):  # a new checkpoint keeps the ticks; another run clears them
        same_run = (seen.get("checkpoints") or ("",))[0] == path.name
        out["checkpoints"] = gr.CheckboxGroup(choices=found[1], **({} if same_run else {"value": []}))
    return {**out, "seen": {**seen, "runs": names, "key": key, "checkpoints": found}}


def running_form(ctx: AppContext) -> list:
    """A page opened (or reloaded) while a run trains: the form shows that run's real settings
    (its datasets, steps, name...), not the preset's defaults. Otherwise the form is left alone."""
    from studio.training.runs import read_run_config

    job, runs = ctx.jobs.latest(JOB_NAME), view.list_runs(ctx.settings.runs_dir)
    if job is None or not job.running or not runs:
        return [gr.skip()] * len(form.TRAIN_FIELDS)
    try:
        config = read_run_config(runs[0])
    except StudioError:
        return [gr.skip()] * len(form.TRAIN_FIELDS)
    values = form.form_values(config)
    datasets_dir = ctx.settings.datasets_dir.resolve()
    names = [Path(d.path).name if Path(d.path).parent == datasets_dir else d.path for d in config.datasets]
    values.update(datasets=names, output_name=config.output_name,
                  num_repeats=(config.datasets[0].num_repeats or 0) if config.datasets else 0)
    return [values.get(name, gr.skip()) if name != "preset" else gr.skip() for name in form.TRAIN_FIELDS]


# -- handlers: the run queue -----------------------------------------------------------------------
QUEUE_COLUMNS = ("#", "run", "state", "steps", "datasets", "note")


def queue_view(ctx: AppContext):
    """The queue as the table shows it, the waiting runs to pick, and whether it is paused."""
    state = ctx.run_queue.read()
    rows, waiting, position = [], [], 0
    for entry in state.entries:
        config = entry.config
        if entry.state == "waiting":
            position += 1
            waiting.append((f"{position}. {entry.name} ({entry.id})", entry.id))
        datasets = ", ".join(Path(d["path"]).name for d in config.get("datasets", []))
        steps = config.get("max_train_steps") or f"{config.get('max_train_epochs')} epochs"
        rows.append([position if entry.state == "waiting" else "", entry.name, entry.state, steps, datasets,
                     entry.message])
    note = "**Paused**: press Pause / continue to go on." if state.paused else ""
    return rows, waiting, note


def on_queue_refresh(ctx: AppContext, picked: str | None):
    rows, waiting, note = queue_view(ctx)
    picked = picked if picked in [value for _, value in waiting] else (waiting[0][1] if waiting else None)
    return rows, gr.Dropdown(choices=waiting, value=picked), note


def on_queue_add(ctx: AppContext, *values):
    """Queue the form as a run: checked now (datasets, paths, limits), trained when its turn comes."""
    try:
        config = config_models_inside(ctx, _config(ctx, values))
        if ctx.settings.zero_gpu:
            raise ConfigError("training cannot run on ZeroGPU (each GPU call is capped): use a dedicated GPU Space")
        entry = ctx.run_queue.add(config)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    ctx.start_queue()
    gr.Info(f"{entry.name} is in the run queue.")
    return on_queue_refresh(ctx, None)


def on_queue_action(ctx: AppContext, action: str, picked: str | None):
    try:
        if action == "pause":
            ctx.run_queue.set_paused(not ctx.run_queue.read().paused)
            ctx.start_queue()
        elif not picked:
            raise ConfigError("pick a waiting run first")
        elif action == "cancel":
            ctx.run_queue.cancel(picked)
        else:
            ctx.run_queue.move(picked, -1 if action == "up" else 1)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    return on_queue_refresh(ctx, picked)


# -- handlers: checkpoints to the Generate tab ----------------------------------------------------
def _published(ctx: AppContext, run: str | None, selected: list[str] | None, at_least: int = 1) -> list[Path]:
    run_dir = view.run_folder(ctx.settings.runs_dir, run)
    available = [name for _, name in view.checkpoints(run_dir)]
    names = [n for n in selected or [] if n in available] or (available[-1:] if at_least == 1 else available)
    if len(names) < at_least:
        raise ConfigError(f"{run_dir.name} has {len(available)} checkpoint(s); comparing needs at least {at_least}")
    return [view.publish_checkpoint(run_dir / "loras" / name, run_dir.name, ctx.settings.loras_dir) for name in names]


def on_use(ctx: AppContext, run: str | None, selected: list[str] | None, *slots: str):
    """Copy the chosen checkpoint into workspace/loras, put it in the first free LoRA slot of the
    Generate tab and switch to it."""
    try:
        files = _published(ctx, run, (selected or [])[:1])
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    slots = list(slots)
    name = files[0].name
    if name not in slots:
        slots[next((i for i, value in enumerate(slots) if not value), 0)] = name
    base = run_base_model(ctx, run)
    gr.Info(f"{name} is in workspace/loras and in the LoRA stack of the Generate tab, on its base model {base}.")
    choices = [("", ""), *lora_choices(ctx)]
    return [*(gr.Dropdown(choices=choices, value=v) for v in slots), base, gr.Accordion(open=True),
            gr.Tabs(selected="generate")]


def run_base_model(ctx: AppContext, run: str | None) -> str:
    """The model the run trained on, as the Generate tab's model field takes it: a LoRA is used
    on its own base (an Anima LoRA cannot go on an SDXL model)."""
    from studio.training.runs import read_run_config

    return read_run_config(view.run_folder(ctx.settings.runs_dir, run)).pretrained_model


def on_compare(ctx: AppContext, run: str | None, selected: list[str] | None, slots: int):
    """Copy the checkpoints into workspace/loras and set them as the X axis of Generate's grid."""
    try:
        files = _published(ctx, run, selected, at_least=2)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    gr.Info(f"The grid's X axis holds {len(files)} checkpoints: write a prompt and press Make grid.")
    choices = [("", ""), *lora_choices(ctx)]
    return [*(gr.Dropdown(choices=choices) for _ in range(slots)), run_base_model(ctx, run), "LoRA file",
            ", ".join(p.name for p in files), gr.Accordion(open=True), gr.Tabs(selected="generate")]


# -- the API ---------------------------------------------------------------------------------------
def api_train(ctx: AppContext, dataset: str, preset: str | None, max_train_steps: int | None,
              max_train_epochs: int | None, output_name: str | None, settings: dict | None,
              queue: bool | None = None):
    """/train: start a run from a preset plus overrides; returns the run folder and a status line.
    With `queue`, the run joins the run queue instead (returned: `queue:<id>` and its place)."""
    from studio.training.runs import new_run_dir

    try:
        check_text({"dataset": dataset, "preset": preset, "output_name": output_name}, ("dataset", "preset", "output_name"))
        if settings is not None and not isinstance(settings, dict):
            raise ConfigError(f"settings: expected an object of TrainConfig keys, got {type(settings).__name__}")
        overrides = dict(settings or {})
        names = [n.strip() for n in (dataset or "").split(",") if n.strip()]
        if not names:
            raise ConfigError("name a dataset folder of workspace/datasets")
        overrides["datasets"] = [{"path": str(dataset_path(ctx.settings, n))} for n in names]
        overrides["output_name"] = output_name or overrides.get("output_name") or form.run_name(names[0])
        if max_train_steps:
            overrides.update(max_train_steps=int(max_train_steps), max_train_epochs=None)
        if max_train_epochs:
            overrides["max_train_epochs"] = int(max_train_epochs)
        config = form.preset_config(ctx.settings, preset or form.default_preset(ctx.settings), overrides)
        if queue is not None and not isinstance(queue, bool):
            raise ConfigError(f"queue: expected true or false, got {type(queue).__name__}")
        if queue:
            if ctx.settings.zero_gpu:
                raise ConfigError("training cannot run on ZeroGPU (each GPU call is capped): use a dedicated GPU Space")
            entry = ctx.run_queue.add(config_models_inside(ctx, config))
            ctx.start_queue()
            place = [e.id for e in ctx.run_queue.read().entries if e.state == "waiting"]
            where = f"place {place.index(entry.id) + 1}" if entry.id in place else "starting"
            return f"queue:{entry.id}", f"Queued {entry.name} ({where} in the run queue)"
        run_dir = new_run_dir(ctx.settings.runs_dir, config.output_name)
        start_run(ctx, config, run_dir, resume=False)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    return str(run_dir), f"Started {run_dir.name}"


def api_queue(ctx: AppContext):
    """/train_queue: the run queue, each entry with its id, name, state, run folder and note."""
    state = ctx.run_queue.read()
    return {"paused": state.paused,
            "runs": [{"id": e.id, "name": e.name, "state": e.state, "run_dir": e.run_dir, "note": e.message}
                     for e in state.entries]}


def api_queue_cancel(ctx: AppContext, entry: str):
    """/train_queue_cancel: take a waiting run out of the queue."""
    try:
        check_text({"entry": entry}, ("entry",))
        cancelled = ctx.run_queue.cancel((entry or "").removeprefix("queue:"))
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    return api_queue(ctx) | {"cancelled": cancelled.id}


def api_status(ctx: AppContext, run: str | None):
    """/train_status: a status line and the details of a run (by default the latest)."""
    from studio.training.loop import read_events

    runs = view.list_runs(ctx.settings.runs_dir)
    try:
        run_dir = view.run_folder(ctx.settings.runs_dir, run) if run else (runs[0] if runs else None)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    if run_dir is None:
        return "No training run yet.", {}
    events, state = read_events(run_dir), _job_state(ctx, run_dir)
    now = view.progress(events)
    details = {"run": run_dir.name, "run_dir": str(run_dir), "state": state[0] or now["ended"] or "not running",
               **{k: now[k] for k in ("step", "total_steps", "loss", "smoothed", "it_s", "eta_s")},
               "checkpoints": [str(run_dir / "loras" / name) for _, name in view.checkpoints(run_dir)],
               "samples": [path for path, _ in view.sample_entries(events)]}
    return view.status_line(events, *state).replace("**", ""), details


# -- wiring --------------------------------------------------------------------------------------
def _named(names: tuple[str, ...], handler):
    """A handler returning {name: value} as Gradio's positional outputs (gr.skip() for the rest)."""
    def wrapper(*args):
        result = handler(*args)
        return tuple(result[name] if name in result else gr.skip() for name in names)

    return wrapper


def wire(ctx: AppContext, tab: TrainTab, generate: GenerateTab, tabs: gr.Tabs) -> None:
    f, c = tab.fields, tab.components
    inputs = [f[name] for name in form.TRAIN_FIELDS]
    view_outputs = [f["datasets"], f["preset"], *(c[name] for name in VIEW[2:])]
    show = {"fn": _named(VIEW, partial(refresh, ctx)), "inputs": [c["run"], c["seen"]], "outputs": view_outputs,
            "api_visibility": "private", "show_progress": "hidden",
            "show_progress_on": c["seen"]}  # "hidden" alone still flashes a timer over the outputs on each tick
    c["timer"].tick(**show)
    c["run"].input(**show)
    f["preset"].input(partial(on_preset, ctx), inputs=f["preset"], outputs=[f[n] for n in form.PRESET_FIELDS],
                      api_visibility="private", queue=False)
    f["caption_scheme"].change(lambda scheme: gr.Row(visible=scheme == "mixed"), inputs=f["caption_scheme"],
                               outputs=c["mixed_row"], api_visibility="private", queue=False)
    f["datasets"].input(on_datasets, inputs=[f["datasets"], f["output_name"]], outputs=f["output_name"],
                        api_visibility="private", queue=False)
    c["datasets_refresh"].click(lambda: gr.Dropdown(choices=dataset_choices(ctx.settings)), outputs=f["datasets"],
                                api_visibility="private", queue=False)
    summary_triggers = [f[n].change for n in ("datasets", "num_repeats", "balance_concepts", "resolution", "train_batch_size",
                                              "max_train_steps", "max_train_epochs", "gradient_accumulation_steps",
                                              "validation_images", "pretrained_model")]
    gr.on(summary_triggers, partial(on_summary, ctx), inputs=inputs, outputs=[c["summary"], c["buckets"]],
          api_visibility="private", trigger_mode="always_last", show_progress="hidden")
    c["plan_button"].click(partial(on_plan, ctx), inputs=inputs, outputs=c["plan"], api_visibility="private",
                           concurrency_id="memory-plan", concurrency_limit=1)
    c["preset_save"].click(partial(on_save_preset, ctx), inputs=[c["preset_name"], *inputs], outputs=f["preset"],
                           api_visibility="private")
    c["start"].click(errors_in_status(partial(on_start, ctx), 2, 1), inputs=inputs, outputs=[c["run"], c["status"]],
                     api_visibility="private")
    c["resume"].click(errors_in_status(partial(on_resume, ctx), 2, 1), inputs=c["run"], outputs=[c["run"], c["status"]],
                      api_visibility="private")
    c["stop"].click(lambda: on_stop(ctx), outputs=c["status"], api_visibility="private", queue=False)
    slots = [generate.fields[f"lora_{i}"] for i in range(1, LORA_SLOTS + 1)]
    g = generate.components
    c["use"].click(partial(on_use, ctx), inputs=[c["run"], c["checkpoints"], *slots],
                   outputs=[*slots, generate.fields["model"], g["lora_stack"], tabs], api_visibility="private")
    c["compare"].click(lambda run, selected: on_compare(ctx, run, selected, len(slots)),
                       inputs=[c["run"], c["checkpoints"]],
                       outputs=[*slots, generate.fields["model"], g["x_kind"], g["x_values"], g["grid_accordion"], tabs],
                       api_visibility="private")
    queue_outputs = [c["queue_table"], c["queue_pick"], c["queue_msg"]]
    c["queue_add"].click(partial(on_queue_add, ctx), inputs=inputs, outputs=queue_outputs, api_visibility="private")
    for action in ("up", "down", "cancel", "pause"):
        c[f"queue_{action}"].click(partial(on_queue_action, ctx, action), inputs=c["queue_pick"],
                                   outputs=queue_outputs, api_visibility="private")
    c["queue_timer"] = gr.Timer(REFRESH_SECONDS * 2)
    c["queue_timer"].tick(partial(on_queue_refresh, ctx), inputs=c["queue_pick"], outputs=queue_outputs,
                          api_visibility="private", queue=False, show_progress="hidden")
    wire_publish_panel(ctx, c["publish"])
    evaluation_view.wire(ctx, c)
    _wire_api(ctx, c)


def _wire_api(ctx: AppContext, c: dict) -> None:
    train, status, stop = c["api_buttons"]
    queue_list, queue_cancel = gr.Button(visible=False), gr.Button(visible=False)
    train.click(named_parameters(partial(api_train, ctx), ("dataset", "preset", "max_train_steps", "max_train_epochs",
                                                           "output_name", "settings", "queue"), required=("dataset",)),
                inputs=[c["api_dataset"], c["api_preset"], c["api_steps"], c["api_epochs"], c["api_name"],
                        c["api_settings"], c["api_queue"]],
                outputs=[c["api_run"], c["api_text"]], api_name="train",
                api_description="Start a training run on a dataset folder (a preset plus overrides: max_train_steps, "
                                "max_train_epochs, output_name, settings={kohya key: value}); returns the run folder. "
                                "queue=true adds it to the run queue instead.")
    queue_list.click(named_parameters(partial(api_queue, ctx), ()), outputs=c["api_details"], api_name="train_queue",
                     queue=False, api_description="The run queue: each run's id, name, state and folder.")
    queue_cancel.click(named_parameters(partial(api_queue_cancel, ctx), ("entry",), required=("entry",)),
                       inputs=c["api_entry"], outputs=c["api_details"], api_name="train_queue_cancel", queue=False,
                       api_description="Take a waiting run (its id, or the queue:<id> /train returned) out of the queue.")
    status.click(named_parameters(partial(api_status, ctx), ("run",)), inputs=c["api_run"],
                 outputs=[c["api_text"], c["api_details"]], api_name="train_status", queue=False,
                 api_description="Where a run stands (by default the latest): step, loss, checkpoints, samples.")
    stop.click(lambda: "Stopping after the current step..." if stop_training(ctx) else "No training run is going.",
               outputs=c["api_text"], api_name="train_stop", queue=False,
               api_description="Stop the training run after its current step; a checkpoint is saved.")


def read_only_events(app: gr.Blocks, tab: TrainTab) -> list:
    """The tab's events that only show the state of runs (the status timer, picking a run): a
    signed-out visitor of a multi-user Space may trigger them, and sees no runs."""
    shows = {(tab.components["timer"]._id, "tick"), (tab.components["run"]._id, "input")}
    return [fn for fn in app.fns.values() if shows & {tuple(target) for target in fn.targets}]
