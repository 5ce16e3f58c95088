"""`python -m studio evaluate RUN`: the checkpoint evaluation from the command line (the same engine as
the Train tab's Evaluate and /evaluate), with a progress bar; the per concept x checkpoint table,
the recommended checkpoint and the concepts that did not learn are printed at the end.

Exit codes: 0 done (or nothing left to do), 1 the evaluation failed, 2 bad arguments, 130 stopped
with Ctrl-C (the checkpoints finished before it are kept in RUN/evaluation/evaluation.json; a
second Ctrl-C ends at once)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

INTERRUPTED = 130


def add_parser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("evaluate", help="score a run's checkpoints per concept (fidelity, bleed, flexibility)",
                               description="Score each checkpoint of a training run per concept: fidelity, bleed "
                                           "over the base model, flexibility; name the recommended checkpoint and "
                                           "the concepts that did not learn. Exit codes: 0 done, 1 failed, 2 bad "
                                           "arguments, 130 stopped with Ctrl-C (finished checkpoints are kept).")
    ev.add_argument("run", type=Path, help="the run folder (or its name in WORKSPACE/runs)")
    ev.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                    help="a LoRA file of RUN/loras to evaluate (repeatable; default: all of them)")
    ev.add_argument("--seeds", type=int, default=2, help="images per prompt (1-8, default 2)")
    ev.add_argument("--seed", type=int, default=1000, help="the first seed; the others follow it")
    ev.add_argument("--width", type=int, help="default: the base model's (832 for Animagine, 64 for demo models)")
    ev.add_argument("--height", type=int)
    ev.add_argument("--steps", type=int)
    ev.add_argument("--cfg", type=float, dest="cfg_scale")
    ev.add_argument("--lora-weight", type=float, default=1.0)
    ev.add_argument("--tagger", default="", help="default: wd-eva02-large-tagger-v3 (demo-tagger for demo models)")
    ev.add_argument("--max-bleed", type=float, default=0.25, help="a recommended checkpoint bleeds no more than this")
    ev.add_argument("--min-flexibility", type=float, default=0.5,
                    help="... and follows its pose/background prompts at least this well")
    ev.add_argument("--min-fidelity", type=float, default=0.5, help="a concept below this everywhere did not learn")
    ev.add_argument("--workspace", type=Path, default=Path("workspace"))
    ev.add_argument("--vram", default="auto", choices=["auto", "high", "normal", "low", "cpu"])
    return ev


def config_from_args(args: argparse.Namespace):
    from studio.evaluation.run import EvaluationConfig
    from studio.schemas import validate

    values = {"checkpoints": [Path(c).name if Path(c).parent.name == "loras" else c for c in args.checkpoint],
              "seeds": args.seeds, "seed": args.seed, "width": args.width, "height": args.height,
              "steps": args.steps, "cfg_scale": args.cfg_scale, "lora_weight": args.lora_weight,
              "tagger": args.tagger, "max_bleed": args.max_bleed, "min_flexibility": args.min_flexibility,
              "min_fidelity": args.min_fidelity}
    return validate(EvaluationConfig, values)


def run_folder(value: Path, workspace: Path) -> Path:
    """RUN as typed (from the current folder), else a run of that name in WORKSPACE/runs."""
    from studio.errors import ConfigError

    for candidate in (Path(value).expanduser(), Path(workspace) / "runs" / value):
        if (candidate / "config.toml").is_file():
            return candidate.absolute()
    raise ConfigError(f"{value} is not a training run folder (no config.toml there, nor in {Path(workspace) / 'runs'})")


@contextmanager
def ctrl_c(handler):
    """SIGINT calls `handler` for the block (in the main thread; elsewhere Ctrl-C is left alone)."""
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.evaluation.run import evaluate
    from studio.models.manager import ModelManager
    from studio.paths import Resolver

    config = config_from_args(args)
    run_dir = run_folder(args.run, args.workspace)
    manager = ModelManager(args.workspace / "models", requested_policy=args.vram)
    stop, outcome = threading.Event(), {}
    with tqdm(total=100, bar_format="{percentage:3.0f}%|{bar}| {elapsed}<{remaining} {desc}", dynamic_ncols=True) as bar:

        def report(fraction, message):
            if fraction is not None:
                bar.n = round(fraction * 100, 1)
            bar.set_description_str(message)

        finished = threading.Event()

        def work():
            try:
                outcome["result"] = evaluate(manager, run_dir, config, resolver=Resolver.command_line(args.workspace),
                                             report=report, stop=stop)
            except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
                outcome["error"] = exc
            finally:
                finished.set()

        def on_ctrl_c(signum, frame):  # the first Ctrl-C stops at the next step; a second one ends at once
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            bar.write("stopping at the next step (the finished checkpoints are kept)...")

        threading.Thread(target=work, name="evaluate", daemon=True).start()
        with ctrl_c(on_ctrl_c):
            while not finished.wait(0.2):
                pass
    if "error" in outcome:
        raise outcome["error"]
    return print_result(outcome["result"])


def print_result(result) -> int:
    from studio.evaluation.report import table, text_table, verdict_lines

    print(text_table(*table(result.data)))
    print()
    for line in verdict_lines(result.data):
        print(line)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    done = f"{len(result.evaluated)} checkpoint(s) evaluated"
    if result.skipped:
        done += f", {len(result.skipped)} already done with these settings"
    print(f"{done}; written: {result.path}" if result.path.is_file() else done)
    if result.stopped:
        print("stopped: run the same command again to continue", file=sys.stderr)
        return INTERRUPTED
    return 0
