"""`python -m studio audit DATASET`: the dataset's concepts (images, share of an epoch, balanced
repeats, core tags) and what to fix before training (studio.dataset.audit)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(commands) -> None:
    audit = commands.add_parser("audit", help="the dataset's concepts and what to fix before training")
    audit.add_argument("dataset", type=Path, help="dataset folder (flat, or kohya repeat folders like 10_name/)")
    audit.add_argument("--trigger", action="append", default=[],
                       help="a trigger word that names a concept in the captions (repeatable)")
    audit.add_argument("--no-duplicates", action="store_true",
                       help="skip the near-duplicate check (it reads every image)")
    audit.add_argument("--save-concepts", action="store_true",
                       help="keep the concepts found as the dataset's concept list (.studio/concepts.json), "
                            "to edit by hand and for balance_concepts")
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.add_argument("--workspace", type=Path, default=Path("workspace"))


def run(args: argparse.Namespace) -> int:
    """0: no findings; 1: findings (or the dataset failed to open); 2: bad arguments."""
    from tqdm import tqdm

    from studio.dataset.audit import audit_dataset
    from studio.dataset.concepts import known_character_tags, save_specs
    from studio.dataset.dataset import Dataset
    from studio.paths import Resolver

    folder = Resolver.command_line(args.workspace).folder(str(args.dataset), [], "dataset")
    dataset = Dataset.open(folder)
    characters = known_character_tags(args.workspace / "models")
    with tqdm(total=len(dataset.items), desc="hashing images", disable=args.no_duplicates or args.json,
              dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        audit = audit_dataset(dataset, character_tags=characters, triggers=args.trigger,
                              duplicates=not args.no_duplicates, on_progress=progress)
    if args.save_concepts:
        path = save_specs(folder, [c.spec for c in audit.concepts.concepts])
        if not args.json:
            print(f"concept list saved: {path}")
    if args.json:
        print(json.dumps(audit.to_json(), indent=1))
        return 1 if audit.findings else 0
    report = audit.concepts
    print(f"{folder}: {len(dataset.items)} images, {report.samples_per_epoch} samples per epoch ({report.layout})")
    for name, triggers, images, share, repeats, core in report.table():
        print(f"  {name}: {images} images, {share} of an epoch, balanced repeats {repeats}; "
              f"triggers: {triggers or '-'}; core tags: {core or '-'}")
    print(audit.summary())
    for kind, concept, rel, message in audit.table():
        print(f"  [{kind}] {rel or concept}: {message}")
    for problem in audit.problems:
        print(f"  not hashed: {problem}")
    return 1 if audit.findings else 0
