"""The Train tab's Evaluate panel, under the loss plot: pick a run (the one the tab shows, by
default), Evaluate and Stop; a status line while it runs; the per concept x checkpoint table
(fidelity, bleed over the base model, flexibility), a plot of fidelity and bleed by step, the
recommended checkpoint and the concepts that did not learn. Also the `/evaluate` and
`/evaluate_stop` API endpoints.

The evaluation is a background job of the app (studio.evaluation.run.evaluate) holding the GPU lane;
a timer, switched on while it runs, re-reads RUN/evaluation/evaluation.json, which the job rewrites
after each finished checkpoint, so a page reload (choosing the run again) finds the results. Other
bounds only re-score what was evaluated: no image is made."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.errors import BusyError, ConfigError, StudioError
from studio.ui.forms import check_text, named_parameters

JOB_NAME = "evaluate"
POLL_SECONDS = 1.0
OUTPUTS = ("eval_status", "eval_verdict", "eval_plot", "eval_table", "eval_timer", "eval_seen")
ABOUT = ("For each checkpoint and for the base model: every concept's trigger alone, with its core tags and in four "
         "poses, plus `1girl, solo`, `1boy, solo` and a scene, at fixed seeds; the images are tagged with the WD "
         "tagger. **Fidelity**: the share of a concept's core tags its images show. **Bleed**: its distinctive core "
         "tags on other concepts' and trigger-less images, above what the base model draws there. **Flexibility**: "
         "the pose and background tags its prompts ask for that its images show. Images and scores are kept in the "
         "run's `evaluation/` folder; evaluating again continues where it stopped.")


# -- building ------------------------------------------------------------------------------------
def build(c: dict) -> None:
    """The panel's components, into the Train tab's component dict (keys eval_*)."""
    with gr.Accordion("Evaluate checkpoints", open=False, elem_id="eval-box"):
        gr.Markdown(ABOUT, elem_id="eval-about")
        with gr.Row(equal_height=False):
            c["eval_run"] = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="eval-run",
                                        info="the run shown above, by default")
            c["eval_seeds"] = gr.Slider(1, 8, value=2, step=1, label="Images per prompt (seeds)", scale=2,
                                        elem_id="eval-seeds")
        with gr.Row(equal_height=False):
            c["eval_max_bleed"] = gr.Slider(0, 1, value=0.25, step=0.05, label="Max bleed", elem_id="eval-max-bleed")
            c["eval_min_flexibility"] = gr.Slider(0, 1, value=0.5, step=0.05, label="Min flexibility",
                                                  elem_id="eval-min-flexibility")
            c["eval_min_fidelity"] = gr.Slider(0, 1, value=0.5, step=0.05, label="Learned from fidelity",
                                               elem_id="eval-min-fidelity")
        with gr.Row():
            c["eval_start"] = gr.Button("Evaluate", variant="primary", scale=2, elem_id="eval-start")
            c["eval_stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="eval-stop")
        c["eval_status"] = gr.Markdown("", elem_id="eval-status")
        c["eval_verdict"] = gr.Markdown("", elem_id="eval-verdict")
        c["eval_plot"] = gr.LinePlot(x="step", y="score", color="series", height=320, y_lim=[-0.05, 1.05],
                                     y_title="fidelity (cool) · bleed (warm)", label="Fidelity and bleed by step",
                                     show_label=False, elem_id="eval-plot")  # a label would push the legend out
        c["eval_table"] = gr.Dataframe(interactive=False, wrap=True, elem_id="eval-table",
                                       label="Per concept and checkpoint (bleed: over the base model)")
    c["eval_timer"] = gr.Timer(POLL_SECONDS, active=False)
    c["eval_seen"] = gr.State(None)  # the evaluation.json version this page shows
    c["eval_api_run"] = gr.Textbox(None, visible=False)
    c["eval_api_checkpoints"] = gr.JSON(None, visible=False)
    c["eval_api_seeds"] = gr.Number(None, visible=False, precision=0)
    c["eval_api_settings"] = gr.JSON(None, visible=False)
    c["eval_api_text"] = gr.Textbox(label="status", visible=False)
    c["eval_api_result"] = gr.JSON(label="evaluation", visible=False)
    c["eval_api_buttons"] = [gr.Button(visible=False), gr.Button(visible=False)]


# -- the run and the job ---------------------------------------------------------------------------
def run_dir_for(ctx, run: str | None) -> Path:
    """The run a request names (a folder of workspace/runs; none: the latest run), refused outside it."""
    from studio.paths import Resolver
    from studio.ui.train_view import list_runs

    runs_dir = ctx.settings.runs_dir
    check_text({"run": run}, ("run",))
    run = (run or "").strip()
    if not run:
        runs = list_runs(runs_dir)
        if not runs:
            raise ConfigError("there is no training run yet: train one first")
        run = runs[0].name
    return Resolver.for_settings(ctx.settings).run(run, runs_dir)


def evaluation_config(seeds=None, settings: dict | None = None, checkpoints=None):
    """An EvaluationConfig from the panel or the API (settings: any EvaluationConfig key)."""
    from studio.evaluation.run import EvaluationConfig
    from studio.schemas import validate

    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"settings: expected an object of evaluation settings, got {type(settings).__name__}")
    values = dict(settings or {})
    if isinstance(checkpoints, str):
        checkpoints = [name.strip() for name in checkpoints.split(",") if name.strip()]
    if checkpoints is not None:
        if not isinstance(checkpoints, list):
            raise ConfigError(f"checkpoints: expected a list of file names, got {type(checkpoints).__name__}")
        values["checkpoints"] = checkpoints
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int | float) or seeds != int(seeds):
            raise ConfigError(f"seeds: expected a whole number from 1 to 8, got {str(seeds)[:40]!r}")
        values["seeds"] = int(seeds)
    return validate(EvaluationConfig, values)


def running_job(ctx):
    job = ctx.jobs.latest(JOB_NAME)
    return job if job is not None and job.running else None


def start_evaluation(ctx, run_dir: Path, config):
    """Start the evaluation job; refused at once while another evaluation or a training run goes."""
    from studio.captioning.tagger import DEMO_TAGGER
    from studio.evaluation.run import evaluate
    from studio.paths import Resolver

    if ctx.settings.zero_gpu:
        raise ConfigError("evaluation runs many generations in one job, past ZeroGPU's cap on a GPU call: use a "
                          "dedicated GPU Space")
    if (job := running_job(ctx)) is not None:
        raise BusyError(f"an evaluation is already going ({Path(job.run_dir).name}); stop it first")
    if ctx.training_running():
        raise BusyError("a training run holds the GPU: evaluate when it has finished (or set evaluate_every_save)")
    resolver = Resolver.for_settings(ctx.settings)
    tagger = DEMO_TAGGER if ctx.settings.demo else ""

    def work(job):
        return evaluate(ctx.manager, run_dir, config, resolver=resolver, default_tagger_name=tagger,
                        report=job.report, stop=job.stop_event)

    job = ctx.jobs.start(JOB_NAME, work)
    job.run_dir = str(run_dir)  # which run's view follows this job
    return job


def stop_evaluation(ctx) -> bool:
    job = running_job(ctx)
    if job is None:
        return False
    job.stop()
    return True


def job_line(job) -> str:
    from studio.ui.format import job_status_line

    name = Path(job.run_dir).name
    if job.running:
        verb = "Stopping" if job.stop_requested else "Evaluating"
        return f"**{verb}** {name} · {job_status_line(job)}"
    if job.state == "failed":
        return f"⚠ **Evaluation failed**: {job.error}"
    result = job.result
    if job.state == "stopped" or (result is not None and result.stopped):
        return f"**Stopped** after {len(result.evaluated) if result else 0} checkpoint(s): evaluate again to continue."
    done = f"**Done** in {job.elapsed:.0f}s: {len(result.evaluated)} checkpoint(s) evaluated"
    if result.skipped:
        done += f", {len(result.skipped)} already done"
    warnings = "".join(f"  \n⚠ {w}" for w in result.warnings)
    return done + "." + warnings


# -- the view ------------------------------------------------------------------------------------
def _stamp(run_dir: Path | None):
    from studio.evaluation.run import EVALUATION_FILE, evaluation_dir

    if run_dir is None:
        return None
    path = evaluation_dir(run_dir) / EVALUATION_FILE
    return (run_dir.name, path.stat().st_mtime_ns if path.is_file() else 0)


FIDELITY_COLORS = ("#1d4ed8", "#047857", "#7c3aed", "#0e7490", "#4d7c0f", "#be185d", "#1e40af", "#065f46")
BLEED_COLORS = ("#f97316", "#dc2626", "#d97706", "#e11d48", "#ea580c", "#b91c1c", "#c2410c", "#9f1239")


def series_colors(series: list[str]) -> dict[str, str]:
    """A color per series: fidelity lines cool, bleed lines warm, a concept's two in the same place
    of each palette. The plot is sent with its colors each time: the browser fixes the series of a
    plot at the first frame it draws, and lines of series it did not know then get no color."""
    names = list(dict.fromkeys(s.split(" · ", 1)[-1] for s in series))
    return {s: (BLEED_COLORS if s.startswith("bleed") else FIDELITY_COLORS)[names.index(s.split(" · ", 1)[-1]) % 8]
            for s in series}


def frames(data: dict | None) -> tuple[gr.LinePlot, pd.DataFrame, str]:
    """The plot, the table frame and the verdict (markdown) of an evaluation."""
    from studio.evaluation.report import plot_rows, table, verdict_lines

    plot = pd.DataFrame(plot_rows(data), columns=["step", "score", "series"])
    plot = plot.astype({"step": int, "score": float, "series": str})
    headers, rows = table(data)
    lines = verdict_lines(data)
    verdict = "  \n".join([f"**{lines[0]}**", *lines[1:]]) if data else "Not evaluated yet: press Evaluate."
    colors = series_colors(list(dict.fromkeys(plot["series"])))
    # no points: no frame at all (after an empty frame the browser's plot draws no later line)
    shown = gr.LinePlot(value=plot if len(plot) else None, color_map=colors or None)
    return shown, pd.DataFrame(rows, columns=headers), verdict


def view(ctx, run: str | None, seen) -> dict:
    """The panel for `run`: the job's status when it evaluates this run, and the results when
    evaluation.json changed since `seen`; the timer runs while the job does."""
    from studio.evaluation.run import read_evaluation

    try:
        run_dir = run_dir_for(ctx, run) if run else None
    except StudioError as exc:
        return {"eval_status": f"⚠ {exc}", "eval_timer": gr.Timer(active=False)}
    out: dict = {}
    job = ctx.jobs.latest(JOB_NAME)
    mine = job is not None and run_dir is not None and Path(job.run_dir) == run_dir
    out["eval_status"] = job_line(job) if mine else ""
    out["eval_timer"] = gr.Timer(active=bool(mine and job.running))
    stamp = _stamp(run_dir)
    if stamp != seen:
        try:
            data = read_evaluation(run_dir) if run_dir is not None else None
        except StudioError as exc:
            data, out["eval_status"] = None, f"⚠ {exc}"
        out["eval_plot"], out["eval_table"], out["eval_verdict"] = frames(data)
        out["eval_seen"] = stamp
    return out


def _named(handler):
    """A handler returning {name: value} as the positional OUTPUTS (gr.skip() for the rest)."""
    def wrapper(*args):
        result = handler(*args)
        return tuple(result[name] if name in result else gr.skip() for name in OUTPUTS)

    return wrapper


def on_follow(ctx, train_run: str | None):
    """The Train tab showed another run: the panel shows it too."""
    from studio.ui.train_view import list_runs

    names = [p.name for p in list_runs(ctx.settings.runs_dir)]
    return gr.Dropdown(choices=names, value=train_run if train_run in names else (names[0] if names else None))


def on_start(ctx, run: str | None, seeds, max_bleed, min_flexibility, min_fidelity) -> dict:
    try:
        run_dir = run_dir_for(ctx, run)
        config = evaluation_config(seeds, {"max_bleed": max_bleed, "min_flexibility": min_flexibility,
                                           "min_fidelity": min_fidelity})
        start_evaluation(ctx, run_dir, config)
    except StudioError as exc:
        gr.Warning(str(exc), title="Error")
        return {"eval_status": f"⚠ **Error:** {exc}"}
    return {"eval_status": f"**Evaluating** {run_dir.name}: loading the model and the tagger...",
            "eval_timer": gr.Timer(active=True)}


def on_stop(ctx) -> str:
    if stop_evaluation(ctx):
        return "**Stopping** at the next step (the finished checkpoints are kept)..."
    return "No evaluation is going."


def on_bounds(ctx, run: str | None, max_bleed, min_flexibility, min_fidelity) -> dict:
    """Other bounds: the same scores, another recommendation (nothing is generated)."""
    from studio.evaluation.run import rescore

    try:
        run_dir = run_dir_for(ctx, run)
        if running_job(ctx) is not None and Path(running_job(ctx).run_dir) == run_dir:
            return {}  # the job writes the file; it takes the bounds it was started with
        data = rescore(run_dir, evaluation_config(settings={"max_bleed": max_bleed, "min_flexibility": min_flexibility,
                                                            "min_fidelity": min_fidelity}).bounds)
    except StudioError as exc:
        return {"eval_status": f"⚠ {exc}"}
    plot, table, verdict = frames(data)
    return {"eval_plot": plot, "eval_table": table, "eval_verdict": verdict, "eval_seen": _stamp(run_dir)}


# -- the API ---------------------------------------------------------------------------------------
def summary(data: dict | None) -> dict:
    """evaluation.json without the per-image records (their files and tags stay in the file)."""
    if not data:
        return {}
    out = {k: v for k, v in data.items() if k not in ("base", "checkpoints")}
    out["base"] = {"scores": (data.get("base") or {}).get("scores")}
    out["checkpoints"] = [{k: v for k, v in c.items() if k != "images"} for c in data["checkpoints"]]
    return out


def api_evaluate(ctx, run: str | None, checkpoints=None, seeds=None, settings: dict | None = None):
    """/evaluate: evaluate a run (by default the latest) and wait; returns a status line and the
    evaluation (scores per checkpoint and concept, recommended, not_learned, the json file)."""
    from studio.evaluation.report import verdict_lines

    try:
        config = evaluation_config(seeds, settings, checkpoints)  # the values first: they need no run
        job = start_evaluation(ctx, run_dir_for(ctx, run), config)
    except StudioError as exc:
        raise gr.Error(str(exc)) from None
    while job.running:
        time.sleep(0.2)
    if job.state == "failed":
        raise gr.Error(job.error or "the evaluation failed")
    result = job.result
    line = job_line(job).replace("**", "")
    return (f"{line} " + " · ".join(verdict_lines(result.data)[:2]),
            {**summary(result.data), "evaluation_file": str(result.path)})


def api_stop(ctx) -> str:
    return "Stopping the evaluation at the next step." if stop_evaluation(ctx) else "No evaluation is going."


# -- wiring --------------------------------------------------------------------------------------
def wire(ctx, c: dict) -> None:
    outputs = [c[name] for name in OUTPUTS]
    bounds = [c["eval_max_bleed"], c["eval_min_flexibility"], c["eval_min_fidelity"]]
    quiet = {"api_visibility": "private", "show_progress": "hidden"}
    c["run"].change(partial(on_follow, ctx), inputs=c["run"], outputs=c["eval_run"], queue=False, **quiet)
    c["eval_run"].change(_named(partial(view, ctx)), inputs=[c["eval_run"], c["eval_seen"]], outputs=outputs,
                         queue=False, **quiet)
    c["eval_timer"].tick(_named(partial(view, ctx)), inputs=[c["eval_run"], c["eval_seen"]], outputs=outputs,
                         queue=False, **quiet)
    c["eval_start"].click(_named(partial(on_start, ctx)), inputs=[c["eval_run"], c["eval_seeds"], *bounds],
                          outputs=outputs, api_visibility="private")
    c["eval_stop"].click(partial(on_stop, ctx), outputs=c["eval_status"], api_visibility="private", queue=False)
    for slider in bounds:
        slider.release(_named(partial(on_bounds, ctx)), inputs=[c["eval_run"], *bounds], outputs=outputs, **quiet)
    evaluate_button, stop_button = c["eval_api_buttons"]
    evaluate_button.click(
        named_parameters(partial(api_evaluate, ctx), ("run", "checkpoints", "seeds", "settings")),
        inputs=[c["eval_api_run"], c["eval_api_checkpoints"], c["eval_api_seeds"], c["eval_api_settings"]],
        outputs=[c["eval_api_text"], c["eval_api_result"]], api_name="evaluate", concurrency_id="gpu",
        api_description="Evaluate a run's checkpoints (by default the latest run, all its checkpoints; seeds = images "
                        "per prompt, settings = width, height, steps, cfg_scale, max_bleed, min_flexibility, ...) and "
                        "wait; returns a status line and the scores per checkpoint and concept, the recommended "
                        "checkpoint and the concepts that did not learn.")
    stop_button.click(partial(api_stop, ctx), outputs=c["eval_api_text"], api_name="evaluate_stop", queue=False,
                      api_description="Stop the running evaluation at its next step (finished checkpoints are kept).")
