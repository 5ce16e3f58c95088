"""An evaluation (evaluation.json's dict) as people read it: the per concept x checkpoint table, the
rows of the fidelity/bleed plot and the verdict line. Shared by the CLI and the Train tab; no gradio."""

from __future__ import annotations

from pathlib import Path

SCORES = ("fidelity", "bleed", "flexibility")
MAX_PLOTTED_CONCEPTS = 8  # past this the plot shows the mean fidelity and the worst bleed only


def checkpoint_label(entry: dict) -> str:
    """`step 100`, or `final (step 600)` for the run's last file."""
    stem = Path(entry["file"]).stem
    return f"step {entry['step']}" if "-step" in stem else f"final (step {entry['step']})"


def _cell(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(data: dict | None) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per concept and score, a column for the base model and one per
    checkpoint (by step). The base model's bleed is the reference, so it shows as –."""
    if not data:
        return ["concept", "score", "base"], []
    checkpoints = data.get("checkpoints") or []
    headers = ["concept", "score", "base", *(checkpoint_label(c) + (" (pruned)" if c.get("missing") else "")
                                              for c in checkpoints)]
    base = (data.get("base") or {}).get("scores") or {}
    rows = []
    for concept in data["config"]["concepts"]:
        name = concept["name"]
        for score in SCORES:
            reference = None if score == "bleed" else base.get(name, {}).get(score)
            rows.append([name, score, _cell(reference),
                         *(_cell(c["scores"].get(name, {}).get(score)) for c in checkpoints)])
    return headers, rows


def plot_rows(data: dict | None) -> list[tuple[int, float, str]]:
    """(step, value, series) of fidelity and bleed per concept and checkpoint (the mean fidelity
    and the worst bleed when there are many concepts). Unmeasured scores are left out."""
    if not data:
        return []
    names = [c["name"] for c in data["config"]["concepts"]]
    rows = []
    for entry in data.get("checkpoints") or []:
        scores = entry["scores"]
        if len(names) > MAX_PLOTTED_CONCEPTS:
            fidelity = [v["fidelity"] for v in scores.values() if v.get("fidelity") is not None]
            bleed = [v["bleed"] for v in scores.values() if v.get("bleed") is not None]
            if fidelity:
                rows.append((entry["step"], sum(fidelity) / len(fidelity), "fidelity (mean)"))
            if bleed:
                rows.append((entry["step"], max(bleed), "bleed (worst)"))
            continue
        for name in names:
            for score in ("fidelity", "bleed"):
                value = scores.get(name, {}).get(score)
                if value is not None:
                    rows.append((entry["step"], value, f"{score} · {name}"))
    return rows


def verdict_lines(data: dict | None) -> list[str]:
    """The recommendation, the concepts that did not learn, and why checkpoints were passed over."""
    if not data or not data.get("checkpoints"):
        return ["No checkpoint evaluated yet."]
    recommended = data.get("recommended")
    step = data.get("recommended_step")
    lines = [f"Recommended checkpoint: {recommended} (step {step})" if recommended
             else "Recommended checkpoint: none within the bounds"]
    not_learned = data.get("not_learned") or []
    lines.append("Did not learn: " + (", ".join(not_learned) if not_learned else "none (every measured concept "
                                      "reached the fidelity bound)"))
    bounds = data.get("bounds") or {}
    if bounds:
        lines.append(f"Bounds: bleed at most {bounds['max_bleed']:.2f}, flexibility at least "
                     f"{bounds['min_flexibility']:.2f}, learned from fidelity {bounds['min_fidelity']:.2f}")
    lines += [f"note: {note}" for note in data.get("notes") or []]
    return lines


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """The table in fixed-width columns, for the terminal."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
