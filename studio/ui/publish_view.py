"""The "Publish" accordion: a run's checkpoint to a Hugging Face model repository (one commit: the
LoRA, its model card, the samples), or the folder that would be uploaded (dry run), and a
CivitAI-ready folder; plus the `/publish` API endpoint. The work is studio.publish; it runs as a
job ("publish") whose progress the button's handler streams.

Whose token: the one typed in the form or passed to the API, else the Space's "Sign in with
Hugging Face" token (gr.OAuthToken). HF_TOKEN and the local login of whoever runs the app are used
only where strangers cannot reach it (studio.settings.reachable_by_strangers).

Built in two passes like the tabs: `build_publish_panel` (components, inside the page's layout)
and `wire_publish_panel` (events, with the other tab's events, so that a multi-user Space's guard
keeps signed-out visitors away from them)."""

# No `from __future__ import annotations` here: Gradio reads the handlers' gr.OAuthToken hints
# as objects (string hints would be resolved in the globals of whatever wraps the handler).

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import gradio as gr

from studio.context import AppContext
from studio.errors import ConfigError, StudioError
from studio.jobs import Job
from studio.ui import train_view as view
from studio.ui.forms import check_text

JOB_NAME = "publish"
POLL_SECONDS = 0.25
# the dropdown's default entry: a value of its own (Gradio refuses "" as a dropdown value once its
# choices were updated in the page), read as "no checkpoint named" by the handler
DEFAULT_VALUE = "(default)"
DEFAULT_CHECKPOINT = ("default: the evaluation's recommended one, else the final one", DEFAULT_VALUE)
FIELDS = ("run", "checkpoint", "repo_id", "private", "license", "token", "dry_run", "civitai")
INTRO = ("From the chosen checkpoint: a Hugging Face model repository with the LoRA, a model card (trigger words, "
         "concepts, training settings, the evaluation) and the samples, in **one commit** (a failed upload publishes "
         "nothing; publish again to retry). A *dry run* only writes that folder, in the run's `publish/` folder.")
TOKEN_INFO = ("a write token of yours, used for this upload only and never stored. Leave it empty to use your "
              "Hugging Face sign-in (on a Space), or, on your own machine, HF_TOKEN / `hf auth login`")


@dataclass
class PublishPanel:
    components: dict[str, gr.components.Component] = field(default_factory=dict)
    own_run: bool = True  # the panel made its own run dropdown (else it follows the Train tab's)


# -- building ------------------------------------------------------------------------------------
def build_publish_panel(ctx: AppContext, run: gr.Dropdown | None = None) -> PublishPanel:
    """The accordion; `run`: the Train tab's run dropdown, if the panel sits under it."""
    panel = PublishPanel(own_run=run is None)
    c = panel.components
    with gr.Accordion("Publish", open=False, elem_id="publish-box") as c["box"]:
        gr.Markdown(INTRO)
        c["run"] = run if run is not None else gr.Dropdown(run_choices(ctx), label="Run", elem_id="publish-run")
        c["checkpoint"] = gr.Dropdown([DEFAULT_CHECKPOINT], value=DEFAULT_VALUE, label="Checkpoint", elem_id="publish-checkpoint")
        with gr.Row():
            c["repo_id"] = gr.Textbox(label="Repository (OWNER/NAME)", placeholder="your-name/my-character-lora",
                                      scale=3, elem_id="publish-repo")
            c["private"] = gr.Checkbox(True, label="Private", scale=1, elem_id="publish-private")
            c["license"] = gr.Textbox(label="License", placeholder="the base model's", scale=2,
                                      elem_id="publish-license")
        c["token"] = gr.Textbox(label="Hugging Face token", type="password", info=TOKEN_INFO, elem_id="publish-token")
        with gr.Row():
            c["dry_run"] = gr.Checkbox(False, label="Dry run: only write the folder", elem_id="publish-dry-run")
            c["civitai"] = gr.Checkbox(False, label="Also write a CivitAI folder", elem_id="publish-civitai")
        c["publish"] = gr.Button("Publish", variant="primary", elem_id="publish-button")
        c["status"] = gr.Markdown("", elem_id="publish-status")
    # the API's own inputs (the form's may be another user's view of the page)
    c["api_inputs"] = [gr.Textbox(None, visible=False), gr.Textbox(None, visible=False),
                       gr.Textbox(None, visible=False), gr.Checkbox(True, visible=False),
                       gr.Textbox(None, visible=False), gr.Textbox(None, visible=False),
                       gr.Checkbox(False, visible=False), gr.Checkbox(False, visible=False)]
    c["api_text"] = gr.Textbox(label="status", visible=False)
    c["api_details"] = gr.JSON(label="details", visible=False)
    c["api_button"] = gr.Button(visible=False)
    return panel


def run_choices(ctx: AppContext) -> list[str]:
    return [path.name for path in view.list_runs(ctx.settings.runs_dir)]


def checkpoint_choices(ctx: AppContext, run: str | None):
    try:
        run_dir = view.run_folder(ctx.settings.runs_dir, run)
    except StudioError:
        return gr.Dropdown(choices=[DEFAULT_CHECKPOINT], value=DEFAULT_VALUE)
    return gr.Dropdown(choices=[DEFAULT_CHECKPOINT, *view.checkpoints(run_dir)], value=DEFAULT_VALUE)


# -- the work ----------------------------------------------------------------------------------------
def start_publish(ctx: AppContext, values: dict, token: str | None) -> Job:
    """Validate a request and start the publish job. On a server strangers reach, only the
    caller's own token is used; the run and every folder lie inside the caller's workspace."""
    from studio.paths import Resolver
    from studio.publish import PublishConfig, check, publish
    from studio.schemas import validate

    if ctx.is_visitor:
        from studio.ui.users import SIGN_IN

        raise ConfigError(SIGN_IN)
    check_text(values, ("run", "checkpoint", "repo_id", "license", "token"))
    for name in ("private", "dry_run", "civitai"):
        if values.get(name) is not None and not isinstance(values[name], bool):
            raise ConfigError(f"{name}: expected true or false, got {type(values[name]).__name__}")
    form = {k: v for k, v in values.items() if k != "token" and v is not None}
    config = validate(PublishConfig, {**form, "run": (form.get("run") or "").strip()})
    allowed = not ctx.settings.reachable_by_strangers
    resolver = Resolver.for_settings(ctx.settings)
    check(config, resolver, token, owner_login_allowed=allowed)  # refused now, before any work
    running = ctx.jobs.latest(JOB_NAME)
    if running is not None and running.running:
        raise ConfigError("a publish is already running: wait for it to end")
    return ctx.jobs.start(JOB_NAME, lambda job: publish(config, resolver, token=token, owner_login_allowed=allowed,
                                                        report=job.report))


def follow(job: Job) -> Iterator[tuple[str, dict | None]]:
    """(status line, details) while the job runs, then its result; a failure as gr.Error."""
    while job.running:
        percent = f"{job.fraction * 100:.0f}% · " if job.fraction is not None else ""
        yield f"**Publishing** · {percent}{job.message or 'starting'}", None
        time.sleep(POLL_SECONDS)
    if job.state != "done":
        raise gr.Error(job.error or job.message or f"publish {job.state}")
    result = job.result
    yield "  \n".join([f"✓ {result.message}", *(f"note: {note}" for note in result.notes)]), result.to_json()


def _token(typed: str | None, oauth) -> str | None:
    if isinstance(typed, str) and typed.strip():
        return typed.strip()
    return oauth.token if oauth is not None else None


def _start(ctx: AppContext, form: tuple, oauth) -> Job:
    """The button's and the API's common start: the form's values (FIELDS order), the dropdown's
    default entry read as no checkpoint named, the typed token else the sign-in's."""
    values = dict(zip(FIELDS, form))
    if values["checkpoint"] == DEFAULT_VALUE:
        values["checkpoint"] = ""
    try:
        return start_publish(ctx, values, _token(values["token"], oauth))
    except StudioError as exc:
        raise gr.Error(str(exc)) from None


def on_publish(ctx: AppContext):
    """The button's handler: streams the status line."""

    def handler(run: str | None, checkpoint: str | None, repo_id: str | None, private: bool, license: str | None,
                token: str | None, dry_run: bool, civitai: bool, oauth: gr.OAuthToken | None) -> Iterator[str]:
        job = _start(ctx, (run, checkpoint, repo_id, private, license, token, dry_run, civitai), oauth)
        for text, _ in follow(job):
            yield text

    return handler


def api_publish(ctx: AppContext):
    """/publish: the same, for API callers (a token they pass, or their signed-in session's)."""

    def publish(run: str, checkpoint: str | None = None, repo_id: str | None = None, private: bool | None = None,
                license: str | None = None, token: str | None = None, dry_run: bool | None = None,
                civitai: bool | None = None, oauth: gr.OAuthToken | None = None):
        yield from follow(_start(ctx, (run, checkpoint, repo_id, private, license, token, dry_run, civitai), oauth))

    return publish


# -- wiring --------------------------------------------------------------------------------------
def wire_publish_panel(ctx: AppContext, panel: PublishPanel) -> None:
    from studio.ui.forms import errors_in_status

    c = panel.components
    c["run"].change(lambda run: checkpoint_choices(ctx, run), inputs=c["run"], outputs=c["checkpoint"],
                    api_visibility="private", queue=False, show_progress="hidden")
    refresh = [c["checkpoint"]] if not panel.own_run else [c["run"], c["checkpoint"]]

    def on_open(run):
        choices = checkpoint_choices(ctx, run)
        # one output takes the update itself (a list would become the dropdown's value)
        return choices if not panel.own_run else (gr.Dropdown(choices=run_choices(ctx)), choices)

    c["box"].expand(on_open, inputs=c["run"], outputs=refresh, api_visibility="private", queue=False,
                    show_progress="hidden")
    c["publish"].click(errors_in_status(on_publish(ctx), 1, 0), inputs=[c[name] for name in FIELDS],
                       outputs=c["status"], api_visibility="private", concurrency_id=JOB_NAME)
    c["api_button"].click(api_publish(ctx), inputs=c["api_inputs"], outputs=[c["api_text"], c["api_details"]],
                          api_name="publish", concurrency_id=JOB_NAME,
                          api_description="Publish a run's checkpoint to a Hugging Face model repository in one "
                                          "commit (repo_id OWNER/NAME, private, license, token: your write token), "
                                          "or dry_run=true to only write the folder; civitai=true also writes a "
                                          "CivitAI folder. Returns a status line and the files.")
