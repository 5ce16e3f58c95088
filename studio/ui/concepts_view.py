"""The Caption tab's "Concepts & audit" panel: the dataset's concepts (images, share of an epoch,
balanced repeats, core tags), the person's editable concept list, and the audit's findings, each of
which opens its image in the caption editor when clicked.

Handlers take the dataset folder as the rest of the tab does (through `ctx.dataset`, which keeps it
inside the workspace) and return dicts by component name. `api_audit` is the `/audit` endpoint: the
same audit as JSON, as `python -m studio audit --json` prints it."""

from __future__ import annotations

import math

import pandas as pd

from studio.context import AppContext
from studio.dataset.audit import audit_dataset
from studio.dataset.concepts import (
    CONCEPTS_FILE,
    MAX_TRIGGERS,
    known_character_tags,
    save_specs,
    spec_from_json,
)
from studio.errors import ConfigError, StudioError

CONCEPT_COLUMNS = ["concept", "triggers", "images", "share of an epoch", "balanced repeats", "core tags"]
LIST_COLUMNS = ["name", "triggers", "folder", "target share"]
FINDING_COLUMNS = ["kind", "concept", "image", "why"]
MAX_LIST_ROWS = 200


def build(c: dict) -> None:
    import gradio as gr

    gr.Markdown("Concepts are the characters, outfits or styles this dataset teaches, each named by trigger tags: "
                "found from repeat folders, the trigger word, or character tags. Balance gives each the share of "
                "an epoch you choose (equal unless set below; the Train tab's *Balance concepts* applies it).")
    with gr.Row():
        c["audit_duplicates"] = gr.Checkbox(True, label="Check near-duplicates", info="reads every image",
                                            elem_id="cap-audit-duplicates")
        c["audit_button"] = gr.Button("Find concepts and audit", variant="secondary", elem_id="cap-audit")
    c["audit_summary"] = gr.Markdown("", elem_id="cap-audit-summary")
    c["concepts"] = gr.Dataframe(headers=CONCEPT_COLUMNS, interactive=False, label="Concepts", max_height=300,
                                 wrap=True, elem_id="cap-concepts")
    c["findings"] = gr.Dataframe(headers=FINDING_COLUMNS, interactive=False, max_height=320, wrap=True,
                                 label="Findings (click one to open its image in the editor)", elem_id="cap-findings")
    with gr.Accordion("Edit the concept list", open=False):
        c["concept_list"] = gr.Dataframe(headers=LIST_COLUMNS, datatype=["str", "str", "str", "number"],
                                         interactive=True, row_count=(1, "dynamic"), col_count=(4, "fixed"),
                                         label="One row per concept: triggers comma-separated; folder: its repeat "
                                               "folder, if any; target share 0-1, empty for an equal share",
                                         elem_id="cap-concept-list")
        with gr.Row():
            c["concepts_save"] = gr.Button("Save concept list", elem_id="cap-concepts-save")
            c["concepts_forget"] = gr.Button("Forget it (find them again)", elem_id="cap-concepts-forget")
        c["concepts_msg"] = gr.Markdown("", elem_id="cap-concepts-msg")


def _frame(rows: list, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def trigger_list(trigger: str | None) -> list[str]:
    """The trigger words a form or a request gives, comma-separated."""
    if trigger is not None and not isinstance(trigger, str):
        raise ConfigError(f"trigger: expected text, got {type(trigger).__name__}")
    triggers = [t.strip() for t in (trigger or "").split(",") if t.strip()]
    if len(triggers) > MAX_TRIGGERS or any(len(t) > 200 for t in triggers):
        raise ConfigError(f"trigger: at most {MAX_TRIGGERS} trigger words of up to 200 characters, comma-separated")
    return triggers


def run_audit(ctx: AppContext, dataset, trigger: str | None = "", duplicates: bool = True):
    return audit_dataset(dataset, character_tags=known_character_tags(ctx.settings.models_dir),
                         triggers=trigger_list(trigger), duplicates=duplicates)


def api_audit(ctx: AppContext, dataset, trigger: str | None, duplicates) -> dict:
    """/audit: the concepts (images, shares, balanced repeats, core tags) and the findings."""
    if duplicates is not None and not isinstance(duplicates, bool):
        raise ConfigError(f"duplicates: expected true or false, got {str(duplicates)[:40]!r}")
    return run_audit(ctx, dataset, trigger, duplicates is not False).to_json()


def audit_view(ctx: AppContext, dataset, trigger: str = "", duplicates: bool = True) -> dict:
    audit = run_audit(ctx, dataset, trigger, duplicates)
    report = audit.concepts
    saved = (dataset.root / ".studio" / CONCEPTS_FILE).is_file()
    summary = (f"**{audit.summary()}** · {report.samples_per_epoch} samples per epoch · concepts "
               f"{'from your saved list' if saved else 'found in the dataset'}")
    if report.unassigned and len(report.concepts) > 1:
        summary += f" · {len(report.unassigned)} image(s) in no concept"
    summary += "".join(f"  \n⚠ not hashed: {p}" for p in audit.problems[:5])
    listing = [[c.name, ", ".join(c.triggers), c.spec.folder, c.spec.target_share] for c in report.concepts]
    return {"audit_summary": summary, "concepts": _frame(report.table(), CONCEPT_COLUMNS),
            "findings": _frame(audit.table(), FINDING_COLUMNS), "concept_list": _frame(listing, LIST_COLUMNS)}


def specs_from_rows(rows) -> list:
    """The edited list (a DataFrame or rows) as ConceptSpecs; blank rows are skipped."""
    records = rows.values.tolist() if isinstance(rows, pd.DataFrame) else list(rows or [])
    if len(records) > MAX_LIST_ROWS:
        raise ValueError(f"at most {MAX_LIST_ROWS} concepts")
    specs = []
    for record in records:
        name, triggers, folder, share = (list(record) + [None] * 4)[:4]
        if name is None or not str(name).strip():
            continue
        share = None if share in (None, "") or (isinstance(share, float) and math.isnan(share)) else share
        if isinstance(share, str):
            try:
                share = float(share)
            except ValueError:
                raise ValueError(f"concept {name!r}: target share {share!r} is not a number") from None
        specs.append(spec_from_json({"name": str(name), "triggers": str(triggers or ""),
                                     "folder": str(folder or ""), "target_share": share}))
    return specs


def on_save(ctx: AppContext, dataset, rows, trigger: str = "") -> dict:
    try:
        specs = specs_from_rows(rows)
        if not specs:
            raise ValueError("the list is empty: add a row per concept, or press Forget to find them again")
        save_specs(dataset.root, specs)
    except (ValueError, StudioError) as exc:
        return {"concepts_msg": f"⚠ {exc}"}
    return {**audit_view(ctx, dataset, trigger, duplicates=False),
            "concepts_msg": f"Saved {len(specs)} concept(s) in the dataset's .studio/{CONCEPTS_FILE}."}


def on_forget(ctx: AppContext, dataset, trigger: str = "") -> dict:
    path = dataset.root / ".studio" / CONCEPTS_FILE
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return {**audit_view(ctx, dataset, trigger, duplicates=False),
            "concepts_msg": "Forgot the saved list: the concepts are found again." if existed else "No saved list."}
