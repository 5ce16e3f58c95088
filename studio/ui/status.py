"""The model manager's status panel: device, VRAM policy, loaded models, an Unload button."""

from __future__ import annotations

from functools import partial

import gradio as gr

from studio.context import AppContext
from studio.ui.format import manager_status_markdown

REFRESH_SECONDS = 3.0


def status_text(ctx: AppContext) -> str:
    return manager_status_markdown(ctx.manager.status(), ctx.settings.demo)


def on_unload(ctx: AppContext) -> str:
    try:
        names = ctx.manager.unload()
    except Exception as exc:  # BusyError and friends: show, don't crash
        raise gr.Error(str(exc)) from None
    gr.Info(f"Unloaded: {', '.join(names)}" if names else "Nothing to unload")
    return status_text(ctx)


def build_and_wire(ctx: AppContext) -> None:
    with gr.Accordion("Models and memory", open=False):
        with gr.Row():
            # The device is probed on first display, not at start-up, so the page serves at once.
            panel = gr.Markdown("", elem_id="model-status")
            unload = gr.Button("Unload models", scale=0)
    timer = gr.Timer(REFRESH_SECONDS)
    timer.tick(partial(status_text, ctx), outputs=panel, api_visibility="private", queue=False, show_progress="hidden")
    unload.click(partial(on_unload, ctx), outputs=panel, api_name="unload_models")
