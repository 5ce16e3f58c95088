"""The model card in the Hub's format: YAML metadata (base_model, license, tags, instance prompt,
widget with sample images), the concepts and their triggers, the evaluation table, the settings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from studio.publish.run import RunSummary, Sample, _unique, not_learned_at

RECOMMENDED_WEIGHT = 1.0
# Licenses of the base models the catalog names (license, license_name, license_link), as their
# model cards declare them; a LoRA trained on one inherits its terms.
BASE_LICENSES = {
    "cagliostrolab/animagine-xl-3.1": ("other", "faipl-1.0-sd", "https://freedevproject.org/faipl-1.0-sd/"),
    "circlestone-labs/Anima-Base-v1.0-Diffusers": (
        "other", "circlestone-labs-non-commercial-license",
        "https://huggingface.co/circlestone-labs/Anima/blob/main/LICENSE.md"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", None, None),
}
# License ids the Hub knows (any other name becomes license: other + license_name)
HUB_LICENSES = frozenset((
    "apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
    "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "gpl-3.0",
    "agpl-3.0", "lgpl-3.0", "bsd-3-clause", "unlicense", "wtfpl", "artistic-2.0", "other",
))


@dataclass
class BaseModelInfo:
    hub_id: str | None  # what base_model says (None: a local file the Hub does not know)
    label: str
    license: tuple[str, str | None, str | None]
    family: str | None = None  # the catalog's word for it, where the catalog knows the model


def base_model_info(pretrained: str, family: str, license: str = "", catalog=None) -> BaseModelInfo:
    """The run's base model as the Hub names it: a catalog name's hub id, a hub id as given; a
    local folder or file has none (only its name is shown, never its path)."""
    from studio.models.catalog import HUB_ID, load_catalog

    catalog = load_catalog() if catalog is None else catalog
    entry = catalog.get(pretrained)
    if entry is not None:
        hub_id = entry.source if HUB_ID.match(entry.source) else None
        label = entry.label.split(" (")[0]
    elif HUB_ID.match(pretrained) and not Path(pretrained).is_absolute() and not Path(pretrained).exists():
        hub_id, label = pretrained, pretrained
    else:
        hub_id, label = None, Path(pretrained).name or family
    family = entry.family if entry else next((e.family for e in catalog.values() if e.source == hub_id), None)
    known = getattr(entry, "license", None) or BASE_LICENSES.get(hub_id or "")
    if license:
        chosen = (license, None, None) if license in HUB_LICENSES else ("other", license, None)
    else:
        chosen = tuple(known) if known else ("other", "same-as-base-model", None)
    return BaseModelInfo(hub_id, label, chosen, family)


def card_data(summary: RunSummary, base: BaseModelInfo):
    from huggingface_hub import ModelCardData

    family_tags = ["stable-diffusion-xl", "sdxl"] if summary.family == "sdxl" else ["anima", "cosmos"]
    base_tag = re.sub(r"[^a-z0-9.-]+", "-", base.label.lower()).strip("-")
    widget = [{"text": s.prompt, **({"parameters": {"negative_prompt": s.negative}} if s.negative else {}),
               "output": {"url": f"samples/{s.path.name}"}} for s in summary.samples if s.prompt]
    license, license_name, license_link = base.license
    return ModelCardData(
        base_model=base.hub_id, license=license, license_name=license_name, license_link=license_link,
        tags=_unique(["lora", "text-to-image", "template:sd-lora", "anime", *family_tags, base_tag]),
        pipeline_tag="text-to-image", library_name="diffusers" if summary.family == "sdxl" else None,
        instance_prompt=", ".join(summary.triggers) or None, widget=widget or None,
    )


def _md(text) -> str:
    """Text for a markdown table cell: pipes, angle brackets and newlines made harmless."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _code(text: str) -> str:
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def concepts_section(summary: RunSummary) -> list[str]:
    if not summary.concepts:
        words = ", ".join(_code(t) for t in summary.triggers)
        return ["## Trigger words", "", f"Write {words} in the prompt." if words else
                "No trigger word was found: the LoRA works without one.", ""]
    lines = ["## Concepts and their trigger words", "", "| concept | trigger words | images | core tags |",
             "|---|---|---|---|"]
    for c in summary.concepts:
        lines.append(f"| {_md(c.name)} | {_md(', '.join(c.triggers)) or '–'} | "
                     f"{'–' if c.images is None else c.images} | {_md(', '.join(c.core_tags[:12])) or '–'} |")
    return [*lines, ""]


def evaluation_section(summary: RunSummary) -> list[str]:
    evaluation, stem = summary.evaluation, summary.checkpoint.stem
    if evaluation is None or not evaluation.rows:
        return ["## Evaluation", "", "This checkpoint was not evaluated (no `evaluation/evaluation.json` in its run).",
                ""]
    about = ("Scores from images generated with each checkpoint and tagged with a WD tagger: *fidelity* (share of "
             "a concept's core tags drawn), *bleed* (its core tags appearing where it was not prompted; lower is "
             "better), *flexibility* (prompted poses and scenes that appeared).")
    lines = ["## Evaluation", "", about, ""]
    if evaluation.recommended:
        mark = " (this one)" if evaluation.recommended == stem else ""
        lines += [f"Recommended checkpoint: **{_md(evaluation.recommended)}**{mark}.", ""]
    missed = not_learned_at(evaluation, stem)
    if missed:  # a list: concepts no evaluated checkpoint learned; per checkpoint: this one's
        where = "by this checkpoint" if isinstance(evaluation.not_learned, dict) else "by any evaluated checkpoint"
        lines += [f"⚠ Not learned {where}: {_md(', '.join(missed))}.", ""]
    lines += ["| checkpoint | concept | fidelity | bleed | flexibility |", "|---|---|---|---|---|"]
    for row in sorted(evaluation.rows, key=lambda r: (r.checkpoint != stem, r.checkpoint, r.concept)):
        name = f"**{_md(row.checkpoint)}**" if row.checkpoint == stem else _md(row.checkpoint)
        lines.append(f"| {name} | {_md(row.concept)} | {_score(row.fidelity)} | {_score(row.bleed)} | "
                     f"{_score(row.flexibility)} |")
    return [*lines, ""]


def training_rows(summary: RunSummary, base: BaseModelInfo) -> list[tuple[str, str]]:
    s, meta = summary.settings, summary.metadata
    resolutions = s.get("resolution") if isinstance(s.get("resolution"), list) else [s.get("resolution")]
    network = f"{s.get('network_type')} on {s.get('network_target')}, dim {s.get('network_dim')}, " \
              f"alpha {s.get('network_alpha')}"
    extras = [name for key, name in (("train_text_encoder", "text encoder"), ("train_llm_adapter", "LLM adapter"))
              if s.get(key)]
    if s.get("caption_scheme") == "mixed":
        m = {"weight_tags": 50, "weight_nl": 10, "weight_tags_nl": 20, "weight_nl_tags": 20, "tag_dropout": 0.3,
             "keep_first": 1, **(s.get("mixed_captions") or {})}
        captions = (f"mixed: tags {m['weight_tags']} / NL {m['weight_nl']} / tags+NL {m['weight_tags_nl']} / "
                    f"NL+tags {m['weight_nl_tags']}, tag dropout {m['tag_dropout']}, first {m['keep_first']} kept")
    else:
        captions = (f"tags{', shuffled' if s.get('shuffle_caption') else ''}, keep tokens {s.get('keep_tokens')}, "
                    f"tag dropout {s.get('caption_tag_dropout_rate')}, caption dropout {s.get('caption_dropout_rate')}")
    rates = (("", "learning_rate"), ("UNet/DiT ", "unet_lr"), ("text encoder ", "text_encoder_lr"),
             ("LLM adapter ", "llm_adapter_lr"))
    buckets = (f"{s.get('min_bucket_reso')}-{s.get('max_bucket_reso')} px in steps of {s.get('bucket_reso_steps')}"
               f"{', no upscale' if s.get('bucket_no_upscale') else ''}{', flipped' if s.get('flip_aug') else ''}")
    precision = {"no": "fp32"}.get(s.get("mixed_precision"), s.get("mixed_precision"))
    rows = [
        ("Base model", f"{base.label}" + (f" ({base.hub_id})" if base.hub_id and base.hub_id != base.label else "")),
        ("Network", network + (f", plus {' and '.join(extras)}" if extras else "")),
        ("Steps", f"{summary.step or '?'} of {meta.get('ss_max_train_steps') or s.get('max_train_steps') or '?'}"),
        ("Epochs", f"{summary.epoch or '?'} of {meta.get('ss_num_epochs') or '?'}"),
        ("Batch size", f"{s.get('train_batch_size')} × {s.get('gradient_accumulation_steps')} accumulation"),
        ("Learning rate", ", ".join(f"{label}{s[key]:g}" for label, key in rates if isinstance(s.get(key), int | float))),
        ("Scheduler", f"{s.get('lr_scheduler')}, warmup {s.get('lr_warmup_steps')} steps"),
        ("Optimizer", f"{s.get('optimizer_type')}, weight decay {s.get('weight_decay')}"),
        ("Resolution", ", ".join(str(r) for r in resolutions)),
        ("Buckets", buckets),
        ("Captions", captions),
        ("Precision", f"{precision}{', fp8 base' if s.get('fp8_base') else ''}"),
    ]
    rows += [(label, str(s[key])) for label, key in (("Noise offset", "noise_offset"), ("Min-SNR gamma",
             "min_snr_gamma"), ("v-prediction", "v_parameterization")) if s.get(key)]
    return [*rows, ("Seed", str(s.get("seed")))]


def usage_section(summary: RunSummary, base: BaseModelInfo, repo_id: str) -> list[str]:
    name, stem = summary.checkpoint.name, summary.checkpoint.stem
    words = ", ".join(summary.triggers)
    trigger_note = f" with the trigger words {_code(words)}" if words else ""
    lines = ["## How to use", "", f"Weight {RECOMMENDED_WEIGHT:.1f} (lower it to 0.6-0.8 if it overpowers the prompt).",
             ""]
    if summary.family == "sdxl":
        lines.append(f"- **A1111 / Forge**: put `{name}` in `models/Lora` and add `<lora:{stem}:{RECOMMENDED_WEIGHT:.1f}>` "
                     f"to the prompt{trigger_note}.")
    lines.append(f"- **ComfyUI**: put `{name}` in `models/loras` and add a *Load LoRA* node after the model loader "
                 f"(strength {RECOMMENDED_WEIGHT:.1f}); write the prompt{trigger_note}.")
    if summary.family == "sdxl" and base.hub_id:
        prompt = (summary.samples[0].prompt if summary.samples else words) or "1girl, solo"
        lines += ["- **diffusers**:", "", "```python", "import torch",
                  "from diffusers import StableDiffusionXLPipeline", "",
                  f'pipe = StableDiffusionXLPipeline.from_pretrained("{base.hub_id}", torch_dtype=torch.float16)',
                  'pipe = pipe.to("cuda")',
                  f'pipe.load_lora_weights("{repo_id or "OWNER/NAME"}", weight_name="{name}")',
                  f"image = pipe({json.dumps(prompt, ensure_ascii=False)}).images[0]", "```"]
    return [*lines, ""]


def card_text(summary: RunSummary, base: BaseModelInfo, repo_id: str) -> str:
    """The README.md: YAML metadata the Hub reads, then the concepts, evaluation, settings, usage."""
    from huggingface_hub import ModelCard

    from studio.generation.infotext import file_sha256

    title = repo_id.split("/")[-1] if repo_id else summary.checkpoint.stem
    step = f" at step {summary.step}" if summary.step else ""
    intro = (f"A LoRA for **{_md(base.label)}**, trained with Anime LoRA Studio. This is checkpoint "
             f"`{summary.checkpoint.name}`{step} of run `{_md(summary.run_dir.name)}` "
             f"(SHA-256 `{file_sha256(summary.checkpoint)}`).")
    lines = [f"# {_md(title)}", "", intro, ""]
    lines += concepts_section(summary) + evaluation_section(summary)
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_md(value)} |" for label, value in training_rows(summary, base)] + [""]
    lines += usage_section(summary, base, repo_id)
    if summary.samples:
        lines += [f"## Samples (step {_step_of_sample(summary.samples[0])})", ""]
        for sample in summary.samples:
            lines += [f"![sample](samples/{sample.path.name})", "", f"{_code(sample.prompt)}", ""]
    text = f"---\n{card_data(summary, base).to_yaml()}\n---\n\n" + "\n".join(lines)
    ModelCard(text)  # the Hub's own parser must read it back (a failure here is a bug of this module)
    return text


def _step_of_sample(sample: Sample) -> int:
    return int(sample.path.name[4:].split("-")[0])
