"""The whole Gradio app: header, the model status panel and one tab per step."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from studio.context import AppContext
from studio.ui import caption_tab, generate_tab, status, train_form, train_tab
from studio.ui.forms import name_input_errors

CSS_FILE = "assets/studio.css"
APP_DIR = Path(__file__).resolve().parents[2]
QUEUE_MAX_SIZE = 64  # requests waiting beyond this are refused at once ("queue is full")
EPHEMERAL_BANNER = (
    "⚠ **This Space keeps its work on its own disk, which is wiped at every restart**: datasets, runs and "
    "LoRAs made here will be lost. Attach a storage volume in the Space's settings and point "
    "`STUDIO_WORKSPACE` (and `HF_HOME`) at it; the README's Spaces section says how."
)


def header(ctx: AppContext) -> None:
    settings = ctx.settings
    with gr.Row(equal_height=True):
        gr.Markdown("# Anime LoRA Studio" + (" · demo mode (tiny random-weight models)" if settings.demo else ""))
        if settings.oauth:
            gr.LoginButton(scale=0, elem_id="login-button")
    if settings.multi_user:
        gr.Markdown("Sign in with Hugging Face to caption and train in a workspace of your own; signed out, "
                    "you can generate with the catalog models.", elem_id="sign-in-note")
    if settings.workspace_is_ephemeral(APP_DIR):
        gr.Markdown(EPHEMERAL_BANNER, elem_id="ephemeral-banner", elem_classes=["studio-banner"])


def current_lists(ctx: AppContext) -> list:
    """The dataset and LoRA lists as they are now, for whoever opened the page (on a multi-user
    Space the page is built once for everyone, signed out)."""
    from studio.ui.caption_form import dataset_choices

    datasets = dataset_choices(ctx.settings)
    loras = [("", ""), *generate_tab.lora_choices(ctx)]
    return [gr.Dropdown(choices=datasets), gr.Dropdown(choices=datasets),
            *(gr.Dropdown(choices=loras) for _ in range(generate_tab.LORA_SLOTS)),
            gr.Dropdown(choices=generate_tab.model_choices(ctx))]


def visitor_tabs(ctx: AppContext) -> list:
    """A signed-out visitor of a multi-user Space sees the Generate tab only."""
    if not ctx.is_visitor:
        return [gr.skip(), gr.skip(), gr.skip()]
    return [gr.Tab(visible="hidden"), gr.Tab(visible="hidden"), gr.Tabs(selected="generate")]


def build_app(ctx: AppContext) -> gr.Blocks:
    """On a multi-user Space the tabs get a RequestContext (each request works in its sender's
    workspace) and everything but generating is refused to signed-out visitors."""
    tabs_ctx = ctx
    if ctx.settings.multi_user:
        from studio.ui.users import RequestContext

        tabs_ctx = RequestContext(ctx)
    with gr.Blocks(title="Anime LoRA Studio", analytics_enabled=False) as app:
        header(ctx)
        status.build_and_wire(tabs_ctx)
        with gr.Tabs() as tabs:
            with gr.Tab("Caption", id="caption") as caption_page:
                caption = caption_tab.build(tabs_ctx)
            with gr.Tab("Train", id="train") as train_page:
                train = train_tab.build(tabs_ctx)
            with gr.Tab("Generate", id="generate") as generate_page:
                tab = generate_tab.build(tabs_ctx)
        status_events = [fn for fn in app.fns.values() if fn.api_name != "unload_models"]  # not Unload
        caption_tab.wire(tabs_ctx, caption)
        train_tab.wire(tabs_ctx, train, generate=tab, tabs=tabs)
        before = set(app.fns)  # what follows is for signed-out visitors too
        generate_tab.wire(tabs_ctx, tab)
        lists = [caption["dataset"], train.fields["datasets"], *generate_tab.lora_dropdowns(tab), tab.fields["model"]]
        app.load(partial(current_lists, tabs_ctx), outputs=lists, api_visibility="private", queue=False)
        # a reload while work runs shows that work: the run's real settings, the generation's progress
        app.load(partial(train_tab.running_form, tabs_ctx), outputs=[train.fields[n] for n in train_form.TRAIN_FIELDS],
                 api_visibility="private", queue=False)
        app.load(partial(generate_tab.on_reconnect, tabs_ctx), outputs=tab.reconnect_outputs,
                 api_visibility="private", concurrency_limit=None, show_progress="hidden")
        for page in (caption_page, train_page, generate_page):  # and whenever a tab is shown
            page.select(partial(current_lists, tabs_ctx), outputs=lists, api_visibility="private", queue=False,
                        show_progress="hidden")
        if ctx.settings.multi_user:  # signed out: the Generate tab only
            app.load(partial(visitor_tabs, tabs_ctx), outputs=[caption_page, train_page, tabs],
                     api_visibility="private", queue=False)
        for_visitors = [*status_events, *train_tab.read_only_events(app, train),
                        *(fn for key, fn in app.fns.items() if key not in before)]
    if ctx.settings.multi_user:
        from studio.ui.users import guard_visitors

        guard_visitors(app, tabs_ctx, for_visitors)
    name_input_errors(app)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return app


def launch(app: gr.Blocks, ctx: AppContext, *, block: bool = True):
    settings = ctx.settings
    css = APP_DIR / CSS_FILE
    from starlette.middleware import Middleware

    from studio.ui.users import WorkspaceFileGuard

    guard = Middleware(WorkspaceFileGuard, workspace=settings.workspace, per_user=settings.multi_user)
    app_kwargs = {"middleware": [guard]}
    auth = None
    if settings.auth:
        from studio.ui.login import ThrottledLogin

        auth = ThrottledLogin(*settings.auth).check
    return app.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=auth,
        allowed_paths=[str(settings.workspace)],
        prevent_thread_lock=not block,
        css_paths=[css] if css.is_file() else None,
        footer_links=["api", "gradio"],
        show_error=True,
        app_kwargs=app_kwargs,
    )
