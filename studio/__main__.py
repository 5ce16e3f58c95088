"""Headless CLI: `python -m studio caption|train|generate ...`. Same engine as the app, a progress bar instead
of the UI. Exit codes: 0 done, 1 the work failed (the message says why), 2 bad arguments."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from studio.errors import ConfigError, StudioError


def parse_lora_arg(value: str) -> dict:
    """FILE[:WEIGHT]; the weight is split off only when it parses as a number (C:\\ paths stay)."""
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": value, "weight": 1.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images with A1111 infotext in each PNG")
    gen.add_argument("--model", default="animagine-xl-3.1",
                     help="catalog name (animagine-xl-3.1, demo-sdxl), hub repo id, diffusers folder or .safetensors")
    gen.add_argument("--vae", help="separate VAE (folder, .safetensors or repo id), e.g. an fp16-fix VAE")
    gen.add_argument("--plan", action="store_true",
                     help="print the memory this generation needs (weights by VRAM policy, the denoiser's and the "
                          "VAE decode's peak) and exit: nothing is loaded")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="", help="negative prompt (the model's default one is merged in)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg", type=float, dest="cfg_scale")
    gen.add_argument("--sampler")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--seed", type=int, default=-1, help="-1 = random; the seed used is printed and recorded")
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--batch-count", type=int, default=1)
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", type=parse_lora_arg)
    gen.add_argument("--no-quality-tags", action="store_true", help="do not add Animagine's quality tags")
    gen.add_argument("--no-default-negative", action="store_true", help="do not merge the model's negative prompt")
    gen.add_argument("--aesthetic", default="", choices=["", "very aesthetic", "aesthetic", "displeasing", "very displeasing"])
    gen.add_argument("--year", default="", choices=["", "newest", "recent", "mid", "early", "oldest"])
    gen.add_argument("--rating", default="", choices=["", "safe", "sensitive", "nsfw", "explicit"])
    gen.add_argument("--score", default="", choices=["", *(f"score_{n}" for n in range(9, 0, -1))],
                     help="Anima: this score tag in place of score_7")
    gen.add_argument("--artist", default="", help="Anima: an artist, written @name after your tags")
    gen.add_argument("--hires-scale", type=float, help="enable the hires pass with this upscale factor")
    gen.add_argument("--hires-denoise", type=float, default=0.55)
    gen.add_argument("--hires-steps", type=int, default=15)
    gen.add_argument("--out", type=Path, help="output folder (default: WORKSPACE/outputs)")
    gen.add_argument("--workspace", type=Path, default=Path("workspace"))
    gen.add_argument("--vram", default="auto", choices=["auto", "high", "normal", "low", "cpu"])
    cap = commands.add_parser("caption", help="tag (and optionally describe) every image of a dataset folder")
    cap.add_argument("dataset", type=Path, help="dataset folder (flat, or kohya repeat folders like 10_name/)")
    cap.add_argument("--tagger", default="wd-eva02-large-tagger-v3",
                     help="wd-eva02-large-tagger-v3, wd-vit-tagger-v3, wd-swinv2-tagger-v3, demo-tagger, or a folder")
    cap.add_argument("--nl", default="none", metavar="none|REF|openai:URL#MODEL",
                     help="natural-language captions: a transformers VLM, or an OpenAI-compatible server")
    cap.add_argument("--template", default="animagine", choices=["animagine", "anima", "none"])
    cap.add_argument("--trigger", default="", help="trigger word, written first in every caption")
    cap.add_argument("--general-threshold", type=float, default=0.35)
    cap.add_argument("--character-threshold", type=float, default=0.85)
    cap.add_argument("--mcut", action="store_true", help="MCut thresholds instead of fixed ones")
    cap.add_argument("--existing", default="skip", choices=["skip", "append", "prepend", "overwrite"],
                     help="what to do with images that already have tags (default: leave them alone)")
    cap.add_argument("--batch-size", type=int, default=8)
    cap.add_argument("--workspace", type=Path, default=Path("workspace"))
    cap.add_argument("--vram", default="auto", choices=["auto", "high", "normal", "low", "cpu"])
    tr = commands.add_parser("train", help="train a LoRA (same engine as the Train tab)")
    tr.add_argument("config", nargs="?", type=Path, help="a TOML config (kohya key names), merged over the preset")
    tr.add_argument("--preset", help="a training preset, e.g. animagine-xl-3.1-character or demo-sdxl")
    tr.add_argument("--import-kohya", type=Path, metavar="FILE",
                    help="a kohya_ss GUI config (.json) or sd-scripts config (.toml), laid under CONFIG and the "
                         "flags; the settings it cannot use are listed")
    tr.add_argument("--dataset", action="append", default=[], type=Path, help="dataset folder (repeatable)")
    tr.add_argument("--output-dir", type=Path, help="the run folder (default: WORKSPACE/runs/<name>-<time>)")
    tr.add_argument("--output-name", help="LoRA file name")
    tr.add_argument("--max-steps", type=int, help="max_train_steps")
    tr.add_argument("--stop-after", type=int, help="stop after this step, saving a resumable state (as Stop does)")
    tr.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue that run to its configured end")
    tr.add_argument("--plan", action="store_true",
                    help="print the memory this run needs on this machine's GPU (or RAM) and what would lower it, "
                         "then exit: nothing is loaded or trained")
    tr.add_argument("--workspace", type=Path, default=Path("workspace"))
    q = commands.add_parser("queue", help="the run queue the app trains from (workspace/queue.json)")
    q_commands = q.add_subparsers(dest="queue_command", required=True)
    add = q_commands.add_parser("add", help="queue a run: the same arguments as train")
    for action in tr._actions:
        if action.dest not in ("help", "resume", "stop_after", "output_dir", "plan"):
            add._add_action(action)
    for name, helptext in (("list", "the queued runs, in order"),
                           ("run", "train the waiting runs here, one after another (without the app)")):
        sub = q_commands.add_parser(name, help=helptext)
        sub.add_argument("--workspace", type=Path, default=Path("workspace"))
    cancel = q_commands.add_parser("cancel", help="take a waiting run out of the queue")
    move = q_commands.add_parser("move", help="move a waiting run up (-1) or down (+1)")
    for sub in (cancel, move):
        sub.add_argument("id", help="the run's id, as `queue list` shows it")
        sub.add_argument("--workspace", type=Path, default=Path("workspace"))
    move.add_argument("offset", type=int)
    from studio import cli_audit

    cli_audit.add_parser(commands)
    from studio import cli_publish

    cli_publish.add_parser(commands)
    from studio import cli_evaluate

    cli_evaluate.add_parser(commands)
    return parser


def train_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    if args.dataset:
        overrides["datasets"] = [{"path": str(path)} for path in args.dataset]
    if args.output_name:
        overrides["output_name"] = args.output_name
    if args.max_steps is not None:
        overrides.update(max_train_steps=args.max_steps, max_train_epochs=None)
    return overrides


def resolve_train_config(args: argparse.Namespace, presets_root: Path | None = None):
    """Defaults <- preset <- --import-kohya <- CONFIG.toml <- flags."""
    from studio.training.runs import resolve_config

    overrides, config_file = train_overrides(args), args.config
    if args.import_kohya:
        overrides, config_file = kohya_layers(args, overrides), None
    return resolve_config(preset=args.preset, config_file=config_file, overrides=overrides, presets_root=presets_root)


def kohya_layers(args: argparse.Namespace, overrides: dict) -> dict:
    """The imported kohya settings with CONFIG.toml and the flags laid over them; prints what was left out."""
    from studio.presets import merge
    from studio.training.kohya_import import import_kohya_file
    from studio.training.runs import read_toml

    imported = import_kohya_file(args.import_kohya)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"kohya config {args.import_kohya}: {len(imported.ignored)} setting(s) not used by the studio"
              + (":" if imported.ignored else ""))
        for key, value in imported.ignored:
            print(f"  ignored {key} = {value!r}")
        for note in imported.notes:
            print(f"  note: {note}")
    layered = imported.values
    if args.config:
        layered = merge(layered, read_toml(args.config), where=str(args.config))
    return merge(layered, overrides, where="the command line")


@contextmanager
def training_bar(main_process: bool = True):
    """A progress bar for a training run; yields the on_event callback that drives it."""
    from tqdm import tqdm

    with tqdm(total=None, unit="step", dynamic_ncols=True, disable=not main_process) as bar:

        def on_event(event):
            if event.kind == "step":
                bar.total = bar.total or event.data.get("total")
                bar.n = event.step
                bar.set_postfix(loss=f"{event.data['loss']:.4f}", lr=f"{event.data['lr']:.2e}")
            elif event.kind == "message" and "plan" in event.data:
                bar.total = event.data["plan"]["total_steps"]
            elif event.kind in ("message", "checkpoint", "validation") and main_process:
                text = event.data.get("text") or event.data.get("path") or f"validation loss {event.data.get('loss'):.4f}"
                bar.write(f"[step {event.step}] {text}")

        yield on_event


def run_train(args: argparse.Namespace) -> int:
    from studio.models.catalog import load_catalog
    from studio.training.runs import new_run_dir, read_run_config, write_run_config
    from studio.training.trainer import train

    paths = command_line_paths(args)
    if args.resume:
        run_dir = paths.folder(str(args.resume), [], "run")
        config = read_run_config(run_dir)
        if args.config or args.preset or args.import_kohya or train_overrides(args):
            changed = paths.train_config(resolve_train_config(args), load_catalog())
            from studio.training.checkpoint import check_resumable, list_states

            states = list_states(run_dir)
            if states:
                check_resumable(states[-1], changed.resume_fingerprint())
            config = changed
    else:
        if not (args.config or args.preset or args.import_kohya):
            print("error: give a CONFIG.toml, --preset NAME or --import-kohya FILE", file=sys.stderr)
            return 2
        config = resolve_train_config(args, presets_root=args.workspace / "presets")
        run_dir = (args.output_dir or new_run_dir(args.workspace / "runs", config.output_name)).absolute()
    config = paths.train_config(config, load_catalog())  # absolute paths: a resume from elsewhere finds them
    if args.plan:
        from studio.training.memory_plan import plan_for_this_machine

        plan = plan_for_this_machine(config, args.workspace / "models")
        print(f"{config.output_name}: {plan.summary()}")
        print(f"  {plan.details()}")
        for note in plan.notes:
            print(f"  note: {note}")
        return 0
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate/torchrun, one bar
    if main_process:
        write_run_config(run_dir, config)
    with training_bar(main_process) as on_event:
        result = train(config, run_dir=run_dir, models_dir=args.workspace / "models",
                       cache_dir=args.workspace / "cache", resume=bool(args.resume), stop_after=args.stop_after,
                       on_event=on_event)
    print(result.message)
    for lora in result.loras:
        print(lora)
    return 0 if result.status in ("done", "stopped") else 1


def caption_form(args: argparse.Namespace) -> dict:
    return {
        "dataset": str(args.dataset),
        "tagger": args.tagger,
        "general_threshold": args.general_threshold,
        "character_threshold": args.character_threshold,
        "mcut": args.mcut,
        "batch_size": args.batch_size,
        "existing": args.existing,
        "rules": {"template": args.template, "trigger": args.trigger},
        "nl": {"backend": args.nl},
    }


def run_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.captioning.run import CaptionConfig, caption_dataset
    from studio.models.manager import ModelManager
    from studio.schemas import validate

    paths = command_line_paths(args)
    args.dataset = paths.folder(str(args.dataset), [], "dataset")
    config = paths.caption_config(validate(CaptionConfig, caption_form(args)))
    manager = ModelManager(args.workspace / "models", requested_policy=args.vram)
    with tqdm(total=100, bar_format="{percentage:3.0f}%|{bar}| {desc}", dynamic_ncols=True) as bar:

        def report(fraction, message):
            if fraction is not None:
                bar.n = round(fraction * 100, 1)
            bar.set_description_str(message)

        run = caption_dataset(manager, config, report=report)
    print(run.summary())
    for name, reason in run.skipped:
        print(f"skipped {name}: {reason}")
    for name, reason in run.warnings:
        print(f"warning {name}: {reason}")
    done = run.tagged or run.kept or run.nl_written
    return 0 if done else 1


def generate_form(args: argparse.Namespace) -> dict:
    """The command line as GenerateConfig fields; unset values are left to the model's defaults."""
    form = {
        "model": args.model,
        "vae": args.vae or "",
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "batch_count": args.batch_count,
        "loras": args.lora,
        "style": {
            "quality_tags": not args.no_quality_tags,
            "default_negative": not args.no_default_negative,
            "aesthetic": args.aesthetic,
            "year": args.year,
            "rating": args.rating,
            "score": args.score,
            "artist": args.artist,
        },
    }
    for name in ("steps", "cfg_scale", "sampler", "width", "height"):
        if getattr(args, name) is not None:
            form[name] = getattr(args, name)
    if args.hires_scale is not None:
        form["hires"] = {"scale": args.hires_scale, "denoise": args.hires_denoise, "steps": args.hires_steps}
    return form


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.generation.generate import config_from_form, generate
    from studio.models.manager import ModelManager

    manager = ModelManager(args.workspace / "models", requested_policy=args.vram)
    paths, form = command_line_paths(args), generate_form(args)
    form["model"] = paths.model(form["model"], manager.catalog)
    form["vae"] = paths.model(form["vae"], (), "VAE")
    form["loras"] = [{**lora, "path": paths.file(lora["path"], [args.workspace / "loras"], "LoRA")}
                     for lora in form["loras"]]
    config = config_from_form(form, manager, default_model=form["model"])
    if args.plan:
        from studio.models.vram import pick_dtype
        from studio.training.memory_plan import model_configs, plan_generation

        device = manager.device
        family, folder = model_configs(config.model, args.workspace / "models")
        policy = args.vram if args.vram in ("high", "normal", "low") else "high"
        plan = plan_generation(family, folder, config.width, config.height, config.batch_size, policy=policy,
                               device="cuda" if device.accelerator else "cpu",
                               free_bytes=device.free_bytes if device.accelerator else None,
                               dtype_bytes=pick_dtype(device).itemsize)
        print(f"{config.width}x{config.height}, batch {config.batch_size}, {policy} policy: {plan.summary()}")
        print(f"  {plan.details()}")
        return 0
    out = args.out or args.workspace / "outputs"
    with tqdm(total=100, bar_format="{percentage:3.0f}%|{bar}| {elapsed}<{remaining} {desc}", dynamic_ncols=True) as bar:

        def report(fraction, message):
            if fraction is not None:
                bar.n = round(fraction * 100, 1)
            bar.set_description_str(message)

        result = generate(manager, config, outputs_dir=out, default_model=config.model, report=report)
    if result.memory_plan:
        print(f"memory: {result.memory_plan}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for image in result.images:
        print(image.path)
    return 0


def command_line_paths(args: argparse.Namespace):
    """The same resolver as the app's requests, for the person who owns the machine: the paths on
    their command line and in the config files it names may lie anywhere (see studio.paths)."""
    from studio.paths import Resolver

    return Resolver.command_line(args.workspace)


def run_queue_command(args: argparse.Namespace) -> int:
    from studio.training.queue import RunQueue

    queue = RunQueue(args.workspace)
    if args.queue_command == "add":
        args.resume, args.stop_after, args.output_dir = None, None, None
        if not (args.config or args.preset or args.import_kohya):
            print("error: give a CONFIG.toml, --preset NAME or --import-kohya FILE", file=sys.stderr)
            return 2
        from studio.models.catalog import load_catalog

        config = resolve_train_config(args, presets_root=args.workspace / "presets")
        entry = queue.add(command_line_paths(args).train_config(config, load_catalog()))
        waiting = [e.id for e in queue.read().entries if e.state == "waiting"]
        print(f"queued {entry.name} as {entry.id} (place {waiting.index(entry.id) + 1})")
    elif args.queue_command == "list":
        state = queue.read()
        if state.paused:
            print("(paused: the app's Pause / continue, or `queue run`, goes on)")
        for number, entry in enumerate(state.entries, 1):
            print(f"{number:3d}  {entry.id}  {entry.state:9s}  {entry.name}  {entry.message}".rstrip())
    elif args.queue_command == "cancel":
        print(f"cancelled {queue.cancel(args.id).name}")
    elif args.queue_command == "move":
        queue.move(args.id, args.offset)
        print("moved")
    else:
        return run_queue_here(args, queue)
    return 0


def run_queue_here(args: argparse.Namespace, queue) -> int:
    """`queue run`: train the waiting runs in this process, one after another, each with its bar."""
    from studio.jobs import Job
    from studio.training.queue import QueueRunner
    from studio.training.runs import write_run_config
    from studio.training.trainer import train

    def start(entry, config, run_dir, resume):
        def work(job):
            print(f"training {entry.name} ({entry.id}) in {run_dir}")
            if not resume:
                write_run_config(run_dir, config)
            with training_bar() as on_event:
                result = train(config, run_dir=run_dir, models_dir=args.workspace / "models",
                               cache_dir=args.workspace / "cache", resume=resume, on_event=on_event)
            print(result.message)
            return result

        return Job("train", work).start()

    queue.set_paused(False)
    runner = QueueRunner(queue, args.workspace / "runs", start, busy=lambda: False)
    queue.recover()
    failed = 0
    while (entry := runner.run_next()) is not None:
        failed += next(e.state for e in queue.read().entries if e.id == entry.id) == "failed"
    print(f"the queue is empty{f'; {failed} run(s) failed' if failed else ''}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "caption":
            return run_caption(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "queue":
            return run_queue_command(args)
        if args.command == "audit":
            from studio import cli_audit

            return cli_audit.run(args)
        if args.command == "publish":
            from studio import cli_publish

            return cli_publish.run(args)
        if args.command == "evaluate":
            from studio import cli_evaluate

            return cli_evaluate.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a folder it may not write: one line, not a traceback
        from studio.errors import write_error

        print(f"error: {write_error(exc.filename or 'a file', exc)}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
