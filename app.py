"""Anime LoRA Studio: `python app.py [--demo] [--share] ...`. Parse the command line, build the
settings and the app, launch. Heavy libraries load on first use, so the page serves in seconds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from studio.errors import ConfigError
from studio.settings import AUTH_ENV, Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Anime LoRA Studio: caption, train and generate anime LoRAs")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve on a public Gradio share link")
    parser.add_argument("--auth", help=f"USER:PASS login for the page (or set {AUTH_ENV})")
    parser.add_argument("--demo", action="store_true", help="default to tiny random-weight demo models (offline)")
    parser.add_argument("--workspace", type=Path, default=Path("workspace"),
                        help="folder for datasets, outputs, LoRAs, runs and the models cache")
    parser.add_argument("--vram", default="auto", choices=["auto", "high", "normal", "low", "cpu"],
                        help="how models use GPU memory (auto picks by free VRAM)")
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

    from studio.context import AppContext
    from studio.ui.app import build_app, launch

    ctx = AppContext.create(settings)
    launch(build_app(ctx), ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
