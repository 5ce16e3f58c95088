"""The Caption tab: open or upload a dataset, caption it with a tagger (and optionally a VLM) as a
background job, then review and edit the captions: a gallery with a per-image editor, undoable
bulk edits on the filtered images, tag frequencies and a bucket preview.

Components are built first, events wired in a second pass. Handlers are thin: they resolve the
dataset through `ctx.dataset` (one Dataset object per folder: one lock, one undo history), call
one Dataset method or `caption_dataset`, and return a dict of output values by component name,
which the wiring turns into Gradio's positional outputs."""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field

import gradio as gr

from studio.captioning.nl_caption import DEFAULT_NL_TEMPLATE, PLACEHOLDERS
from studio.captioning.run import caption_dataset, raise_if_stopped
from studio.captioning.tag_rules import ANIMAGINE_QUALITY, EXISTING_POLICIES, RATING_TAGS
from studio.context import AppContext
from studio.dataset.captions import split_tags
from studio.dataset.config import BucketConfig
from studio.dataset.dataset import Dataset
from studio.errors import ConfigError, StudioError
from studio.jobs import Job
from studio.schemas import validate
from studio.ui import caption_form as form
from studio.ui import concepts_view
from studio.ui import dataset_view as view
from studio.ui.forms import as_dict, check_text, named_parameters
from studio.ui.forms import errors_in_status as form_errors_in_status

POLL_SECONDS = 0.3
GALLERY_REFRESH_SECONDS = 1.0  # while captioning, re-read the gallery at most this often
JOB_NAME = "caption"

VIEW = ("gallery", "shown", "gallery_info", "frequency", "history")
SCAN = ("scan", "problems")
EDITOR = ("selected", "selected_name", "edit_tags", "edit_nl")
NO_SELECTION = "Click an image to edit its caption."


@dataclass
class CaptionTab:
    """Handles to the tab's components, for wiring and for tests: `fields` are the caption
    settings (CAPTION_FIELDS), `components` everything else."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    components: dict[str, gr.components.Component] = field(default_factory=dict)

    def __getitem__(self, name: str) -> gr.components.Component:
        return self.fields[name] if name in self.fields else self.components[name]


# -- building ------------------------------------------------------------------------------------
def build(ctx: AppContext) -> CaptionTab:
    tab = CaptionTab()
    c = tab.components
    _build_dataset_row(ctx, c)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=380):
            _build_settings(ctx, tab)
        with gr.Column(scale=3, min_width=480):
            _build_editor(c)
    with gr.Tabs():
        with gr.Tab("Bulk edit"):
            _build_bulk(c)
        with gr.Tab("Tag frequency"):
            c["frequency"] = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], interactive=False,
                                          label="Tags of the filtered images (sort from a column's ⋮ menu; "
                                                "click a tag to filter by it)", max_height=420, elem_id="cap-frequency")
        with gr.Tab("Bucket preview"):
            _build_buckets(c)
        with gr.Tab("Concepts & audit", elem_id="cap-concepts-tab"):
            concepts_view.build(c)
    c["shown"] = gr.State([])  # rel paths of the gallery's images, in order
    c["selected"] = gr.State("")  # rel path of the image in the editor
    c["api_dataset"] = gr.Textbox(visible=False)
    c["api_button"] = gr.Button(visible=False)
    c["api_summary"] = gr.Textbox(label="summary", visible=False)
    c["api_details"] = gr.JSON(label="details", visible=False)
    c["api_trigger"] = gr.Textbox(visible=False)
    c["api_duplicates"] = gr.Checkbox(True, visible=False)
    c["api_audit_button"] = gr.Button(visible=False)
    c["api_audit"] = gr.JSON(label="audit", visible=False)
    return tab


def _build_dataset_row(ctx: AppContext, c: dict) -> None:
    with gr.Row(equal_height=False):
        c["dataset"] = gr.Dropdown(form.dataset_choices(ctx.settings), value=None, label="Dataset folder",
                                   info="a folder in workspace/datasets; to make one, type a new name and press Create",
                                   allow_custom_value=True, scale=4, elem_id="cap-dataset")
        c["create"] = gr.Button("Create", scale=1, min_width=90, elem_id="cap-create")
        c["refresh"] = gr.Button("Refresh", scale=1, min_width=90, elem_id="cap-refresh")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c["scan"] = gr.Markdown("Choose a dataset folder, or create one and upload images.", elem_id="cap-scan")
            c["problems"] = gr.Dataframe(headers=["file", "reason", "severity"], interactive=False, visible=False, wrap=True,
                                         column_widths=["30%", "55%", "15%"], label="Files with problems",
                                         max_height=220, elem_id="cap-problems")
        with gr.Column(scale=2):
            c["upload"] = gr.File(label="Add images, captions (.txt) or a .zip to this dataset", file_count="multiple",
                                  file_types=["image", ".zip", ".txt"], height=150, elem_id="cap-upload")
            c["upload_msg"] = gr.Markdown("", elem_id="cap-upload-msg")


def _build_settings(ctx: AppContext, tab: CaptionTab) -> None:
    f, c = tab.fields, tab.components
    d = form.settings_to_form(form.default_settings(ctx.settings.demo))
    with gr.Accordion("Presets", open=False):
        with gr.Row(equal_height=False):
            c["preset"] = gr.Dropdown(form.preset_store(ctx.settings).names(), value=None, label="Preset", scale=3)
            c["preset_load"] = gr.Button("Load", scale=1, min_width=70)
        with gr.Row(equal_height=False):
            c["preset_name"] = gr.Textbox(label="Save the settings as", placeholder="my character", scale=3)
            c["preset_save"] = gr.Button("Save as", scale=1, min_width=70)
        c["preset_msg"] = gr.Markdown("")
    with gr.Row():
        f["tagger"] = gr.Dropdown(form.TAGGER_CHOICES, value=d["tagger"], label="Tagger", allow_custom_value=True,
                                  info="a WD v3 tagger, a folder with model.onnx + selected_tags.csv, or a hub id",
                                  scale=3, elem_id="cap-tagger")
        f["template"] = gr.Dropdown(["animagine", "anima", "none"], value=d["template"], label="Tag order",
                                    info="the model the LoRA is for", scale=2)
    with gr.Row():
        f["trigger"] = gr.Textbox(d["trigger"], label="Trigger word", placeholder="e.g. mychar", info="written first",
                                  elem_id="cap-trigger")
        f["existing"] = gr.Dropdown(list(EXISTING_POLICIES), value=d["existing"], label="Images with tags",
                                    info="skip leaves them alone")
    f["quality"] = gr.Dropdown(list(ANIMAGINE_QUALITY), value=d["quality"], multiselect=True, label="Quality tags",
                               info="added to every caption")
    with gr.Accordion("Tagger and tag rules", open=False):
        with gr.Row():
            f["general_threshold"] = gr.Slider(0.05, 0.95, value=d["general_threshold"], step=0.01,
                                               label="General threshold")
            f["character_threshold"] = gr.Slider(0.05, 0.99, value=d["character_threshold"], step=0.01,
                                                 label="Character threshold")
        with gr.Row():
            f["mcut"] = gr.Checkbox(d["mcut"], label="MCut (adaptive thresholds)")
            f["tags"] = gr.Checkbox(d["tags"], label="Run the tagger", info="off: NL captions only")
            f["batch_size"] = gr.Slider(1, 64, value=d["batch_size"], step=1, label="Batch size")
        with gr.Row():
            f["rating_from_tagger"] = gr.Checkbox(d["rating_from_tagger"], label="Rating tag from the tagger")
            f["rating"] = gr.Dropdown(["", *RATING_TAGS], value=d["rating"], label="Fixed rating")
            f["escape"] = gr.Checkbox(d["escape"], label="Escape ( ) as \\( \\)")
        with gr.Row():
            # blank = not set (a gr.Number cannot be blank: it shows 0)
            f["year"] = gr.Textbox(d["year"], label="Year the art was made", placeholder="e.g. 2024; blank: none")
            f["score"] = gr.Dropdown([("not set", ""), *((f"score_{n}", str(n)) for n in range(1, 10))], value=d["score"],
                                     label="Fixed score tag (Anima)")
        f["exclude"] = gr.Textbox(d["exclude"], label="Exclude tags", placeholder="simple background, * background",
                                  info="comma separated; * is a wildcard")
        with gr.Row():
            f["series"] = gr.Textbox(d["series"], label="Series tags for every image", placeholder="vocaloid")
            f["artists"] = gr.Textbox(d["artists"], label="Artists for every image", placeholder="ke-ta")
        f["character_series"] = gr.Textbox(d["character_series"], lines=2, label="Character -> series",
                                           placeholder="saber (fate) -> fate (series)", info="one pair per line")
    with gr.Accordion("Natural-language captions ({stem}_nl.txt)", open=False):
        f["nl_backend"] = gr.Textbox(d["nl_backend"], label="NL backend",
                                     info="none; a transformers VLM (hub id or folder); or openai:URL#MODEL")
        with gr.Row():
            f["nl_existing"] = gr.Radio(["skip", "overwrite"], value=d["nl_existing"], label="Images with NL captions")
            f["nl_concurrency"] = gr.Slider(1, 32, value=d["nl_concurrency"], step=1, label="Requests in flight",
                                            info="for servers")
        f["nl_api_key"] = gr.Textbox("", type="password", label="Server API key (not saved in presets)")
        f["nl_template"] = gr.Textbox(d["nl_template"], lines=8, max_lines=20, label="NL prompt template",
                                      info="placeholders: " + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
        c["nl_reset"] = gr.Button("Restore the default template", size="sm")
    with gr.Row():
        c["start"] = gr.Button("Start captioning", variant="primary", scale=3, elem_id="cap-start")
        c["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="cap-stop")
    c["status"] = gr.Markdown("", elem_id="cap-status")
    c["skipped"] = gr.Dataframe(headers=["file", "reason", "severity"], interactive=False, visible=False, wrap=True,
                                column_widths=["28%", "52%", "20%"], label="Skipped files and warnings", max_height=220,
                                elem_id="cap-skipped")


def _build_editor(c: dict) -> None:
    with gr.Row(equal_height=False):
        c["all_of"] = gr.Textbox(label="Show images with all of", placeholder="1girl, smile", scale=3)
        c["any_of"] = gr.Textbox(label="... and any of", placeholder="red hair, blue hair", scale=3)
        c["filter"] = gr.Button("Filter", scale=1, min_width=70, elem_id="cap-filter")
    c["gallery_info"] = gr.Markdown("", elem_id="cap-gallery-info")
    c["gallery"] = gr.Gallery(label="Dataset", columns=4, height=460, object_fit="contain", allow_preview=False,
                              elem_id="cap-gallery")
    c["selected_name"] = gr.Markdown(NO_SELECTION, elem_id="cap-selected")
    c["edit_tags"] = gr.Textbox(label="Tags", lines=3, elem_id="cap-edit-tags")
    c["edit_nl"] = gr.Textbox(label="Natural-language caption", lines=3, elem_id="cap-edit-nl")
    with gr.Row(equal_height=False):
        c["save"] = gr.Button("Save caption", variant="primary", scale=1, elem_id="cap-save")
        c["edit_msg"] = gr.Markdown("", elem_id="cap-edit-msg")


def _build_bulk(c: dict) -> None:
    gr.Markdown("Each edit acts on the images the filter shows (all images when the filter is empty), except "
                "Rename, which acts on the whole dataset. Every edit can be undone.")
    with gr.Row(equal_height=False):
        c["add_text"] = gr.Textbox(label="Add tags", placeholder="mychar, solo", scale=4)
        c["add_position"] = gr.Radio(["front", "back"], value="front", label="Where", scale=2)
        c["add"] = gr.Button("Add", scale=1, min_width=80, elem_id="cap-add")
    with gr.Row(equal_height=False):
        c["remove_text"] = gr.Textbox(label="Remove tags", placeholder="simple background", scale=6)
        c["remove"] = gr.Button("Remove", scale=1, min_width=80)
    with gr.Row(equal_height=False):
        c["replace_old"] = gr.Textbox(label="Replace the tag", scale=3)
        c["replace_new"] = gr.Textbox(label="by (empty removes it)", scale=3)
        c["replace"] = gr.Button("Replace", scale=1, min_width=80)
        c["rename"] = gr.Button("Rename everywhere", scale=1, min_width=80)
    with gr.Row(equal_height=False):
        c["regex_pattern"] = gr.Textbox(label="Regex", placeholder=r"^(.*) hair$", scale=3)
        c["regex_replacement"] = gr.Textbox(label="Replacement", placeholder=r"\1 hair", scale=3)
        c["regex_target"] = gr.Radio(["tags", "nl"], value="tags", label="On", scale=1)
        c["regex"] = gr.Button("Apply", scale=1, min_width=80)
    with gr.Row(equal_height=False):
        c["bulk_msg"] = gr.Markdown("", elem_id="cap-bulk-msg")
        c["undo"] = gr.Button("Undo last edit", scale=0, min_width=170, elem_id="cap-undo")
    c["history"] = gr.Dataframe(headers=["#", "time", "edit"], interactive=False, label="Edit history (newest first)",
                                max_height=260, elem_id="cap-history")


def _build_buckets(c: dict) -> None:
    defaults = BucketConfig()
    with gr.Row(equal_height=False):
        c["bucket_resolution"] = gr.Number(defaults.resolution, label="Resolution", precision=0)
        c["bucket_min"] = gr.Number(defaults.min_bucket_reso, label="Min side", precision=0)
        c["bucket_max"] = gr.Number(defaults.max_bucket_reso, label="Max side", precision=0)
        c["bucket_step"] = gr.Number(defaults.bucket_reso_steps, label="Step", precision=0)
        c["bucket_no_upscale"] = gr.Checkbox(defaults.no_upscale, label="No upscale")
        c["bucket_button"] = gr.Button("Preview buckets", min_width=120, elem_id="cap-buckets")
    c["bucket_msg"] = gr.Markdown("")
    with gr.Row(equal_height=False):
        c["buckets"] = gr.Dataframe(headers=["bucket", "images", "samples per epoch"], interactive=False,
                                    label="Buckets", max_height=360, elem_id="cap-bucket-table")
        c["bucket_images"] = gr.Dataframe(headers=["image", "size", "bucket"], interactive=False,
                                          label="Each image's bucket", max_height=360)


# -- handlers: the dataset -----------------------------------------------------------------------
def _error(exc: StudioError) -> gr.Error:
    return gr.Error(str(exc))


def _open_dataset(ctx: AppContext, folder: str) -> Dataset:
    try:
        return ctx.dataset(form.dataset_path(ctx.settings, folder))
    except StudioError as exc:
        raise _error(exc) from None


def _filtered(dataset: Dataset, all_of: str, any_of: str):
    all_tags, any_tags = split_tags(all_of or ""), split_tags(any_of or "")
    if not all_tags and not any_tags:
        return dataset.items, False
    return dataset.filter(all_tags, any_tags), True


def dataset_view(dataset: Dataset, all_of: str = "", any_of: str = "") -> dict:
    """The gallery (filtered), its info line, the tag frequency of the filtered images and the
    undo history."""
    items, filtered = _filtered(dataset, all_of, any_of)
    shown = items[: view.MAX_GALLERY]
    return {
        "gallery": view.gallery_entries(dataset, shown),
        "shown": [item.rel for item in shown],
        "gallery_info": view.gallery_info(dataset, len(shown), len(items), filtered),
        "frequency": view.frequency_table(dataset.tag_frequency(items)),
        "history": view.history_table(dataset.history()),
    }


def editor_view(dataset: Dataset | None, rel: str) -> dict:
    if dataset is None or not rel or rel not in {item.rel for item in dataset.items}:
        return {"selected": "", "selected_name": NO_SELECTION, "edit_tags": "", "edit_nl": ""}
    return {"selected": rel, "selected_name": f"Editing **{rel}**", "edit_tags": ", ".join(dataset.read_tags(rel)),
            "edit_nl": dataset.read_nl(rel)}


def _scan_view(dataset: Dataset, folder: str) -> dict:
    report = dataset.report
    return {"scan": view.scan_markdown(report, folder.strip()),
            "problems": gr.Dataframe(view.problems_table(report), visible=bool(report.problems))}


def _empty_view(message: str) -> dict:
    return {"scan": message, "problems": gr.Dataframe(visible=False), "gallery": [], "shown": [],
            "gallery_info": "", "frequency": view.frequency_table([]), "history": view.history_table([]),
            **editor_view(None, "")}


def on_open(ctx: AppContext, folder: str, all_of: str = "", any_of: str = "") -> dict:
    """A dataset was chosen (or typed): rescan it and show it. A name that does not exist yet is
    no error: the user may be about to create it."""
    folder = (folder or "").strip()
    if not folder:
        return _empty_view("Choose a dataset folder, or create one and upload images.")
    if form.is_new_dataset_name(ctx.settings, folder):
        return _empty_view(f"**{folder}** does not exist yet: press Create, or upload images into it.")
    try:
        dataset = ctx.dataset(form.dataset_path(ctx.settings, folder))
        dataset.scan()
    except StudioError as exc:
        return _empty_view(str(exc))
    return {**_scan_view(dataset, folder), **dataset_view(dataset, all_of, any_of), **editor_view(dataset, "")}


def on_refresh(ctx: AppContext, folder: str, all_of: str = "", any_of: str = "") -> dict:
    choices = form.dataset_choices(ctx.settings)
    return {"dataset": gr.Dropdown(choices=choices), "preset": gr.Dropdown(
        choices=form.preset_store(ctx.settings).names()), **on_open(ctx, folder, all_of, any_of)}


def on_create(ctx: AppContext, name: str) -> dict:
    try:
        path, created = form.create_dataset(ctx.settings, name)
    except StudioError as exc:
        raise _error(exc) from None
    where = path.relative_to(ctx.settings.workspace).as_posix()
    message = f"Created `{where}`: upload images into it." if created else f"`{where}` already exists."
    return {"dataset": gr.Dropdown(choices=form.dataset_choices(ctx.settings), value=path.name),
            "upload_msg": message, **on_open(ctx, path.name)}


def on_upload(ctx: AppContext, folder: str, files: list[str] | None, all_of: str = "", any_of: str = "") -> dict:
    """Import uploaded images, captions and zips into the dataset (created if it is a new name)."""
    if not files:
        return {}
    if not (folder or "").strip():
        raise gr.Error("choose or type a dataset folder first, then upload")
    try:
        try:
            path = form.dataset_path(ctx.settings, folder)
        except ConfigError:  # a new name: make the folder
            path, _ = form.create_dataset(ctx.settings, folder)
        dataset = ctx.dataset(path)
        report = dataset.import_uploads(files)
        dataset.scan()
    except StudioError as exc:
        raise _error(exc) from None
    lines = [report.summary().replace(str(report.destination), f"`{path.name}`")]
    lines += [f"- skipped {p.path.name}: {p.reason}" for p in report.skipped if p.kind != "refused"][:20]
    unusable = {problem.path.resolve(): problem.reason for problem in dataset.report.problems
                if problem.severity == "skip"}
    lines += [f"- {f.path.name} was imported, but the dataset cannot use it: {unusable[f.path.resolve()]}"
              for f in report.imported if f.path.resolve() in unusable][:20]
    return {"upload_msg": "\n".join(lines), "upload": None,
            "dataset": gr.Dropdown(choices=form.dataset_choices(ctx.settings), value=folder),
            **_scan_view(dataset, folder), **dataset_view(dataset, all_of, any_of), **editor_view(dataset, "")}


def on_filter(ctx: AppContext, folder: str, all_of: str, any_of: str) -> dict:
    return dataset_view(_open_dataset(ctx, folder), all_of, any_of)


def on_frequency_tag(ctx: AppContext, folder: str, all_of: str, any_of: str, tag: str) -> dict:
    """A tag clicked in the frequency table joins the all-of filter."""
    tags = split_tags(all_of or "")
    if tag and tag not in tags:
        tags.append(str(tag))
    all_of = ", ".join(tags)
    return {"all_of": all_of, **dataset_view(_open_dataset(ctx, folder), all_of, any_of)}


def on_select_image(ctx: AppContext, folder: str, shown: list[str], index) -> dict:
    index = index[0] if isinstance(index, (list, tuple)) else index
    if index is None or not 0 <= index < len(shown or []):
        return editor_view(None, "")
    return {**editor_view(_open_dataset(ctx, folder), shown[index]), "edit_msg": ""}


def on_audit(ctx: AppContext, folder: str, trigger: str, duplicates: bool) -> dict:
    """The dataset's concepts and the audit's findings (Concepts & audit)."""
    try:
        return concepts_view.audit_view(ctx, _open_dataset(ctx, folder), trigger, bool(duplicates))
    except StudioError as exc:
        raise _error(exc) from None


def on_concepts_save(ctx: AppContext, folder: str, trigger: str, rows) -> dict:
    return concepts_view.on_save(ctx, _open_dataset(ctx, folder), rows, trigger)


def on_concepts_forget(ctx: AppContext, folder: str, trigger: str) -> dict:
    return concepts_view.on_forget(ctx, _open_dataset(ctx, folder), trigger)


def on_select_finding(ctx: AppContext, folder: str, rel: str) -> dict:
    """A finding clicked: its image opens in the editor (a finding about a whole concept opens none)."""
    if not rel:
        return {"edit_msg": ""}
    return {**editor_view(_open_dataset(ctx, folder), rel), "edit_msg": ""}


# -- handlers: edits -----------------------------------------------------------------------------
def _refuse_while_captioning(ctx: AppContext) -> None:
    """No edits while the caption job runs: it decided at its start which captions to write, and a
    hand edit made meanwhile could be overwritten by its result."""
    job = ctx.jobs.latest(JOB_NAME)
    if job is not None and job.running:
        raise gr.Error("captioning is running: edits wait until it finishes (or press Stop)")


def on_save(ctx: AppContext, folder: str, all_of: str, any_of: str, rel: str, tags_text: str, nl_text: str) -> dict:
    """Save the editor's tags and NL caption of one image (each change undoable)."""
    _refuse_while_captioning(ctx)
    if not rel:
        raise gr.Error("click an image in the gallery first")
    dataset = _open_dataset(ctx, folder)
    tags, nl = split_tags(tags_text or ""), (nl_text or "").strip()
    try:
        changed = []
        if tags != dataset.read_tags(rel):
            dataset.write_tags(rel, tags)
            changed.append("tags")
        if nl != dataset.read_nl(rel):
            dataset.write_nl(rel, nl)
            changed.append("NL caption")
    except StudioError as exc:
        raise _error(exc) from None
    message = f"Saved the {' and '.join(changed)} of {rel}." if changed else f"{rel}: nothing changed."
    return {"edit_msg": message, **dataset_view(dataset, all_of, any_of), **editor_view(dataset, rel)}


def _bulk(ctx: AppContext, folder: str, all_of: str, any_of: str, selected: str, edit, whole: bool = False) -> dict:
    _refuse_while_captioning(ctx)
    dataset = _open_dataset(ctx, folder)
    items, filtered = _filtered(dataset, all_of, any_of)
    scope = "whole dataset" if whole or not filtered else f"in the {len(items)} filtered images"
    try:
        result = edit(dataset, dataset.items if whole else items)
    except StudioError as exc:
        raise _error(exc) from None
    return {"bulk_msg": view.edit_message(result, scope), **dataset_view(dataset, all_of, any_of),
            **editor_view(dataset, selected)}


def on_add_tags(ctx, folder, all_of, any_of, selected, tags: str, position: str) -> dict:
    return _bulk(ctx, folder, all_of, any_of, selected, lambda ds, items: ds.add_tags(items, tags or "", position))


def on_remove_tags(ctx, folder, all_of, any_of, selected, tags: str) -> dict:
    return _bulk(ctx, folder, all_of, any_of, selected, lambda ds, items: ds.remove_tags(items, tags or ""))


def on_replace_tag(ctx, folder, all_of, any_of, selected, old: str, new: str) -> dict:
    return _bulk(ctx, folder, all_of, any_of, selected, lambda ds, items: ds.replace_tag(items, old or "", new or ""))


def on_rename_tag(ctx, folder, all_of, any_of, selected, old: str, new: str) -> dict:
    return _bulk(ctx, folder, all_of, any_of, selected, lambda ds, _: ds.rename_tag(old or "", new or ""), whole=True)


def on_regex(ctx, folder, all_of, any_of, selected, pattern: str, replacement: str, target: str) -> dict:
    if not pattern:
        raise gr.Error("type a regular expression to look for")
    return _bulk(ctx, folder, all_of, any_of, selected,
                 lambda ds, items: ds.regex_replace(items, pattern, replacement or "", target))


def on_undo(ctx: AppContext, folder: str, all_of: str, any_of: str, selected: str) -> dict:
    _refuse_while_captioning(ctx)
    dataset = _open_dataset(ctx, folder)
    try:
        result = dataset.undo_last()
    except StudioError as exc:
        raise _error(exc) from None
    return {"bulk_msg": view.undo_message(result), **dataset_view(dataset, all_of, any_of),
            **editor_view(dataset, selected)}


def on_buckets(ctx: AppContext, folder: str, resolution, min_reso, max_reso, step, no_upscale: bool) -> dict:
    dataset = _open_dataset(ctx, folder)
    try:
        config = validate(BucketConfig, {"resolution": int(resolution or 0), "min_bucket_reso": int(min_reso or 0),
                                         "max_bucket_reso": int(max_reso or 0), "bucket_reso_steps": int(step or 0),
                                         "no_upscale": bool(no_upscale)})
    except StudioError as exc:
        raise _error(exc) from None
    preview = dataset.bucket_preview(config)
    buckets, per_image = view.bucket_tables(preview, dataset.items)
    message = f"{len(preview.assignments)} images in {len(preview.images)} buckets at {config.resolution}px"
    if preview.unbucketable:
        message += "; no bucket for: " + "; ".join(f"{rel} ({why})" for rel, why in preview.unbucketable)
    return {"buckets": buckets, "bucket_images": per_image, "bucket_msg": message}


# -- handlers: presets ---------------------------------------------------------------------------
def on_preset_load(ctx: AppContext, name: str) -> dict:
    if not name:
        raise gr.Error("choose a preset to load")
    try:
        values, unshown = form.load_caption_preset(form.preset_store(ctx.settings), name,
                                                   form.default_settings(ctx.settings.demo))
    except StudioError as exc:
        raise _error(exc) from None
    message = f"Loaded the preset **{name}**."
    if unshown:
        gr.Warning(f"the preset {name} also sets {', '.join(unshown)}, which this form does not show: not used")
        message += f" Not used (no field here): {', '.join(unshown)}."
    return {**values, "preset_msg": message}


def on_preset_save(ctx: AppContext, name: str, *values) -> dict:
    store = form.preset_store(ctx.settings)
    try:
        path = form.save_caption_preset(store, name, as_dict(form.CAPTION_FIELDS, values),
                                        form.default_settings(ctx.settings.demo))
    except StudioError as exc:
        raise _error(exc) from None
    where = path.relative_to(ctx.settings.workspace).as_posix()
    return {"preset": gr.Dropdown(choices=store.names(), value=path.stem),
            "preset_msg": f"Saved the preset **{path.stem}** (`{where}`)."}


# -- handlers: the caption job -------------------------------------------------------------------
@dataclass
class CaptionRun:
    job: Job
    dataset: Dataset
    report: dict = field(default_factory=dict)  # "run": the CaptionRunReport, also when stopped


def caption_models_inside(ctx: AppContext, config):
    """The tagger and a local VLM: known names, repo ids or paths inside the workspace; an NL
    caption server: one the owner allows, when strangers can reach the app."""
    from studio.captioning.run import OPENAI_PREFIX
    from studio.paths import Resolver

    if config.nl.backend.startswith(OPENAI_PREFIX):
        ctx.settings.check_nl_server(config.nl.backend.removeprefix(OPENAI_PREFIX).rpartition("#")[0])
    return Resolver.for_settings(ctx.settings).caption_config(config)


def start_caption(ctx: AppContext, folder: str, values: tuple) -> CaptionRun:
    try:
        check_text({"dataset": folder}, ("dataset",))
        path = form.dataset_path(ctx.settings, folder)
        config = caption_models_inside(ctx, form.caption_config(form.form_to_settings(
            as_dict(form.CAPTION_FIELDS, values)), path))
    except StudioError as exc:
        raise _error(exc) from None
    latest = ctx.jobs.latest(JOB_NAME)
    if latest is not None and latest.running:
        raise gr.Error("captioning is already running: wait for it to finish, or press Stop")
    gpu_calls = ctx.caption_gpu_calls()
    report: dict = {}

    dataset = ctx.dataset(path)
    dataset.scan()  # see files added since it was opened, so that their captions stream in too

    def work(job: Job):
        report["run"] = caption_dataset(ctx.manager, config, report=job.report, stop=job.stop_event, dataset=dataset,
                                        gpu_calls=gpu_calls)
        return raise_if_stopped(report["run"])

    return CaptionRun(ctx.jobs.start(JOB_NAME, work), dataset, report)


def caption_status_line(job: Job) -> str:
    """'40% · tagging 4/10 · 2.1 images/s · ETA 3s · 2s elapsed' (the job's message carries n/N,
    images/s and ETA)."""
    parts = [f"{job.fraction * 100:.0f}%"] if job.fraction is not None else []
    if job.message:
        parts.append(job.message)
    parts.append(f"{job.elapsed:.0f}s elapsed")
    return " · ".join(parts)


def finish_caption(run: CaptionRun) -> tuple[dict, str | None]:
    """The outcome of a finished run (status line, the files skipped or with warnings) and the
    error message if it failed."""
    run.dataset.scan()  # the job wrote through its own Dataset object: refresh the caption flags
    job, report = run.job, run.report.get("run")
    skipped = view.skipped_table(report)
    outcome = {"skipped": gr.Dataframe(skipped, visible=len(skipped) > 0)}
    if job.state == "failed":
        error = job.error or "captioning failed"
        return {**outcome, "status": f"**Failed**: {error}"}, error
    head = "**Stopped** (what was written is kept)" if job.state == "stopped" else "**Done**"
    return {**outcome, "status": f"{head}: {report.summary() if report else job.message}"}, None


def on_caption(ctx: AppContext, folder: str, all_of: str, any_of: str, selected: str, *values):
    """UI handler: start the job, stream its progress and the gallery (captions appear as they are
    written), then show the summary and the files that were skipped."""
    run = start_caption(ctx, folder, values)
    items, last_seen, last_refresh = run.dataset.items, None, time.monotonic()
    yield {"status": "Starting…", "skipped": gr.Dataframe(visible=False)}
    while run.job.running:
        out = {"status": caption_status_line(run.job)}
        if time.monotonic() - last_refresh >= GALLERY_REFRESH_SECONDS:
            last_refresh = time.monotonic()
            seen = view.captions_signature(items)
            if seen != last_seen:
                last_seen = seen
                out.update(dataset_view(run.dataset, all_of, any_of))
        yield out
        time.sleep(POLL_SECONDS)
    outcome, error = finish_caption(run)
    yield {**outcome, **dataset_view(run.dataset, all_of, any_of), **editor_view(run.dataset, selected)}
    if error:
        raise gr.Error(error)


def api_caption(ctx: AppContext, dataset: str, *values) -> tuple[str, dict]:
    """The /caption API endpoint: caption a dataset; returns the summary (with each skipped file
    and why) and the details (tagged, kept, skipped, warnings...)."""
    run = start_caption(ctx, dataset, values)
    run.job.wait()
    _, error = finish_caption(run)
    if error:
        raise gr.Error(error)
    report = run.report.get("run")
    if report is None:
        raise gr.Error(run.job.message or "captioning stopped before it began")
    return view.run_summary(report), view.run_details(report)


def api_audit(ctx: AppContext, dataset: str, trigger: str | None, duplicates) -> dict:
    """The /audit API endpoint: a dataset's concepts and the audit's findings, as JSON."""
    try:
        return concepts_view.api_audit(ctx, _open_dataset(ctx, dataset), trigger, duplicates)
    except StudioError as exc:
        raise _error(exc) from None


def on_stop(ctx: AppContext) -> dict:
    job = ctx.jobs.latest(JOB_NAME)
    if job is None or not job.running:
        return {"status": "Nothing is being captioned."}
    job.stop()
    return {"status": "Stopping after the current batch…"}


# -- wiring --------------------------------------------------------------------------------------
def _named_outputs(tab: CaptionTab, fn, names: tuple[str, ...]):
    """`fn` returning (or yielding) dicts by component name -> a Gradio handler returning a tuple
    in the order of `names`; names a result leaves out are skipped (left as they are)."""

    def pick(result: dict) -> tuple:
        unknown = set(result) - set(names)
        if unknown:
            raise KeyError(f"handler returned values for components it does not output: {sorted(unknown)}")
        return tuple(result[name] if name in result else gr.skip() for name in names)

    # functools.wraps keeps fn's signature and hints: Gradio passes gr.SelectData by annotation
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def handler(*args):
            for result in fn(*args):
                yield pick(result)
    else:

        @functools.wraps(fn)
        def handler(*args):
            return pick(fn(*args))

    return handler, [tab[name] for name in names]


def wire(ctx: AppContext, tab: CaptionTab) -> None:
    c, f = tab.components, tab.fields
    fields = [f[name] for name in form.CAPTION_FIELDS]
    where = [c["dataset"], c["all_of"], c["any_of"]]
    edit_inputs = [*where, c["selected"]]
    private = {"api_visibility": "private"}

    def on(event, fn, inputs, names, **kwargs):
        handler, outputs = _named_outputs(tab, fn, names)
        if "status" in names:  # an error stays in the status line, not only in a fading toast
            handler = form_errors_in_status(handler, len(names), names.index("status"))
        return event(handler, inputs=inputs, outputs=outputs, **{**private, **kwargs})

    opened = (*SCAN, *VIEW, *EDITOR)
    on(c["dataset"].change, functools.partial(on_open, ctx), where, opened)
    on(c["refresh"].click, functools.partial(on_refresh, ctx), where, ("dataset", "preset", *opened))
    on(c["create"].click, functools.partial(on_create, ctx), [c["dataset"]], ("dataset", "upload_msg", *opened))
    on(c["upload"].upload, functools.partial(on_upload, ctx), [c["dataset"], c["upload"], c["all_of"], c["any_of"]],
       ("upload_msg", "upload", "dataset", *opened))
    for trigger in (c["filter"].click, c["all_of"].submit, c["any_of"].submit):
        on(trigger, functools.partial(on_filter, ctx), where, VIEW)

    def select_image(folder, shown, evt: gr.SelectData):
        return on_select_image(ctx, folder, shown, evt.index)

    def select_tag(folder, all_of, any_of, evt: gr.SelectData):
        tag = evt.row_value[0] if evt.row_value else evt.value
        return on_frequency_tag(ctx, folder, all_of, any_of, str(tag))

    on(c["gallery"].select, select_image, [c["dataset"], c["shown"]], (*EDITOR, "edit_msg"))
    audited = ("audit_summary", "concepts", "findings", "concept_list")
    on(c["audit_button"].click, functools.partial(on_audit, ctx), [c["dataset"], f["trigger"], c["audit_duplicates"]],
       audited, concurrency_id="audit", concurrency_limit=1)
    on(c["concepts_save"].click, functools.partial(on_concepts_save, ctx),
       [c["dataset"], f["trigger"], c["concept_list"]], (*audited, "concepts_msg"), concurrency_id="audit")
    on(c["concepts_forget"].click, functools.partial(on_concepts_forget, ctx), [c["dataset"], f["trigger"]],
       (*audited, "concepts_msg"), concurrency_id="audit")

    def select_finding(folder, evt: gr.SelectData):
        row = evt.row_value or []
        return on_select_finding(ctx, folder, str(row[2]) if len(row) > 2 and row[2] else "")

    on(c["findings"].select, select_finding, [c["dataset"]], (*EDITOR, "edit_msg"))
    on(c["frequency"].select, select_tag, where, ("all_of", *VIEW))
    edited = ("bulk_msg", *VIEW, *EDITOR)
    on(c["save"].click, functools.partial(on_save, ctx), [*where, c["selected"], c["edit_tags"], c["edit_nl"]],
       ("edit_msg", *VIEW, *EDITOR))
    on(c["add"].click, functools.partial(on_add_tags, ctx), [*edit_inputs, c["add_text"], c["add_position"]], edited)
    on(c["remove"].click, functools.partial(on_remove_tags, ctx), [*edit_inputs, c["remove_text"]], edited)
    on(c["replace"].click, functools.partial(on_replace_tag, ctx), [*edit_inputs, c["replace_old"], c["replace_new"]], edited)
    on(c["rename"].click, functools.partial(on_rename_tag, ctx), [*edit_inputs, c["replace_old"], c["replace_new"]], edited)
    on(c["regex"].click, functools.partial(on_regex, ctx),
       [*edit_inputs, c["regex_pattern"], c["regex_replacement"], c["regex_target"]], edited)
    on(c["undo"].click, functools.partial(on_undo, ctx), edit_inputs, edited)
    on(c["bucket_button"].click, functools.partial(on_buckets, ctx),
       [c["dataset"], *(c[n] for n in ("bucket_resolution", "bucket_min", "bucket_max", "bucket_step",
                                        "bucket_no_upscale"))], ("buckets", "bucket_images", "bucket_msg"))
    on(c["preset_load"].click, functools.partial(on_preset_load, ctx), [c["preset"]], (*form.CAPTION_FIELDS, "preset_msg"))
    on(c["preset_save"].click, functools.partial(on_preset_save, ctx), [c["preset_name"], *fields], ("preset", "preset_msg"))
    c["nl_reset"].click(lambda: DEFAULT_NL_TEMPLATE, outputs=f["nl_template"], queue=False, **private)
    on(c["start"].click, functools.partial(on_caption, ctx), [*edit_inputs, *fields],
       ("status", "skipped", *VIEW, *EDITOR), concurrency_id="gpu")
    c["stop"].click(lambda: on_stop(ctx)["status"], outputs=c["status"], api_name="stop_caption", queue=False)
    c["api_button"].click(named_parameters(functools.partial(api_caption, ctx), ("dataset", *form.CAPTION_FIELDS),
                                           required=("dataset",)),
                          inputs=[c["api_dataset"], *fields], outputs=[c["api_summary"], c["api_details"]],
                          api_name="caption", concurrency_id="gpu",
                          api_description="Caption a dataset (a folder in workspace/datasets, or a path in the "
                                          "workspace); returns the summary and the details of the run.")
    c["api_audit_button"].click(named_parameters(functools.partial(api_audit, ctx), ("dataset", "trigger", "duplicates"),
                                                 required=("dataset",)),
                                inputs=[c["api_dataset"], c["api_trigger"], c["api_duplicates"]], outputs=c["api_audit"],
                                api_name="audit", concurrency_id="audit", concurrency_limit=1,
                                api_description="Audit a dataset: its concepts (images, share of an epoch, balanced "
                                                "repeats, core tags) and findings (mislabels, foreign character tags, "
                                                "missing triggers, few images, near-duplicates). trigger: "
                                                "comma-separated trigger words; duplicates: also hash every image.")
