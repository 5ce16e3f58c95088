"""The whole Gradio app: header, the model status panel and one tab per step."""

from __future__ import annotations

import gradio as gr

from studio.context import AppContext
from studio.ui import caption_tab, generate_tab, status, train_tab

CSS_FILE = "assets/studio.css"
QUEUE_MAX_SIZE = 64  # requests waiting beyond this are refused at once ("queue is full")


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Anime LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown("# Anime LoRA Studio" + (" · demo mode (tiny random-weight models)" if ctx.settings.demo else ""))
        status.build_and_wire(ctx)
        with gr.Tabs() as tabs:
            with gr.Tab("Caption", id="caption"):
                caption = caption_tab.build(ctx)
            with gr.Tab("Train", id="train"):
                train = train_tab.build(ctx)
            with gr.Tab("Generate", id="generate"):
                tab = generate_tab.build(ctx)
        caption_tab.wire(ctx, caption)
        train_tab.wire(ctx, train, generate=tab, tabs=tabs)
        generate_tab.wire(ctx, tab)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return app


def launch(app: gr.Blocks, ctx: AppContext, *, block: bool = True):
    settings = ctx.settings
    from pathlib import Path

    css = Path(__file__).resolve().parents[2] / CSS_FILE
    return app.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=settings.auth,
        allowed_paths=[str(settings.workspace)],
        prevent_thread_lock=not block,
        css_paths=[css] if css.is_file() else None,
        footer_links=["api", "gradio"],
        show_error=True,
    )
