"""Anime LoRA Studio: `python app.py [--demo] [--share] ...`. Parse the command line, build the
settings and the app, launch. Heavy libraries load on first use, so the page serves in seconds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from studio.errors import ConfigError
from studio.settings import FLAG_ENV, Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags left out are None: Settings.from_args then reads their environment variables."""
    parser = argparse.ArgumentParser(
        description="Anime LoRA Studio: caption, train and generate anime LoRAs",
        epilog="Each flag can also be set by the environment variable in brackets; a flag wins.",
    )
    env = FLAG_ENV
    parser.add_argument("--host", help=f"address to listen on (default: this machine only; 0.0.0.0 in a "
                                       f"Hugging Face Space) [{env['host']}]")
    parser.add_argument("--port", type=int, help=f"port (default 7860) [{env['port']}]")
    parser.add_argument("--share", action="store_true", default=None,
                        help=f"also serve on a public Gradio share link [{env['share']}=1]")
    parser.add_argument("--auth", help=f"USER:PASS login for the page [{env['auth']}]")
    parser.add_argument("--demo", action="store_true", default=None,
                        help=f"default to tiny random-weight demo models (offline) [{env['demo']}=1]")
    parser.add_argument("--workspace", type=Path,
                        help=f"folder for datasets, outputs, LoRAs and runs (default ./workspace) [{env['workspace']}]")
    parser.add_argument("--model-dir", action="append", type=Path,
                        help=f"a folder of models, VAEs and LoRAs outside the workspace that requests may read "
                             f"(e.g. ComfyUI's models folder); repeat for several [{env['model_dir']}]")
    parser.add_argument("--vram", choices=["auto", "high", "normal", "low", "cpu"],
                        help=f"how models use GPU memory (default auto: picks by free VRAM) [{env['vram']}]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in settings.security_warnings():
        print(f"WARNING: {warning}", file=sys.stderr)
    settings.ensure_workspace()
    from studio.fileio import remove_stale_temporaries

    if removed := remove_stale_temporaries(settings.workspace):
        print(f"Removed {len(removed)} leftover(s) of interrupted saves from {settings.workspace}", flush=True)
    if settings.space_id:  # the tagger on the Space's GPU (before anything imports onnxruntime)
        from studio.onnx_gpu import ensure_gpu_onnxruntime, has_nvidia_gpu

        if has_nvidia_gpu():
            print(ensure_gpu_onnxruntime(), flush=True)
    if settings.zero_gpu:  # `spaces` patches CUDA: import it before anything touches torch
        import studio.spaces_gpu  # noqa: F401  (its GPU functions must exist at launch)

    from studio.context import AppContext
    from studio.ui.app import build_app, launch

    ctx = AppContext.create(settings)
    if settings.zero_gpu:  # ZeroGPU forks its GPU worker from this process: load the model here first
        ctx.preload_default_model()
    else:
        ctx.resume_queues()  # runs queued before a restart go on (one cut off mid-run resumes)
    launch(build_app(ctx), ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
