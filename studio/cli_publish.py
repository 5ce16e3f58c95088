"""`python -m studio publish RUN ...`: a run's checkpoint to a Hugging Face model repository in one
commit, or the folder that would be uploaded (--dry-run), and a CivitAI-ready folder (--civitai).
The command line is the machine's owner speaking: it publishes with HF_TOKEN or the local
`hf auth login`, and its folders may lie anywhere. Exit codes: 0 done, 1 the upload failed (nothing
was published; run it again to retry), 2 bad arguments."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands) -> None:
    pub = commands.add_parser("publish", help="publish a run's checkpoint to the Hugging Face Hub (one commit), "
                                              "or write that folder (--dry-run) and a CivitAI folder")
    pub.add_argument("run", type=Path, help="the run folder (or its name in WORKSPACE/runs)")
    pub.add_argument("--checkpoint", default="", metavar="FILE",
                     help="a LoRA file of RUN/loras (default: the one the evaluation recommends, else the final one)")
    pub.add_argument("--repo", default="", metavar="OWNER/NAME", help="the model repository (created if needed)")
    pub.add_argument("--private", action="store_true", help="create the repository private")
    pub.add_argument("--license", default="", help="a license id (default: the base model's license)")
    pub.add_argument("--dry-run", nargs="?", const="", default=None, metavar="FOLDER",
                     help="upload nothing: write the folder that would be uploaded (default: RUN/publish/...)")
    pub.add_argument("--civitai", nargs="?", const="", default=None, metavar="FOLDER",
                     help="also write a CivitAI-ready folder: the file, previews with infotext, description.md")
    pub.add_argument("--workspace", type=Path, default=Path("workspace"))


def publish_form(args: argparse.Namespace) -> dict:
    run = args.run
    if not run.exists() and not run.is_absolute() and (args.workspace / "runs" / run).is_dir():
        run = args.workspace / "runs" / run  # a bare run name
    return {"run": str(run), "checkpoint": args.checkpoint, "repo_id": args.repo, "private": args.private,
            "license": args.license, "dry_run": args.dry_run is not None, "folder": args.dry_run or "",
            "civitai": args.civitai is not None, "civitai_folder": args.civitai or ""}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.paths import Resolver
    from studio.publish import PublishConfig, publish
    from studio.schemas import validate

    # errors: studio.__main__ prints them in one line (exit 2 for bad input, 1 for the rest)
    config = validate(PublishConfig, publish_form(args))
    with tqdm(total=100, bar_format="{percentage:3.0f}%|{bar}| {desc}", dynamic_ncols=True) as bar:

        def report(fraction, message):
            if fraction is not None:
                bar.n = round(fraction * 100, 1)
            bar.set_description_str(message[:120])
            bar.refresh()

        result = publish(config, Resolver.command_line(args.workspace), owner_login_allowed=True, report=report)
    print(result.message)
    for note in result.notes:
        print(f"note: {note}")
    for path in result.files:
        print(f"  {path}")
    return 0
