"""Publishing a trained LoRA: a Hugging Face model repository (the checkpoint, a model card in the
Hub's format, the run's sample images) made in ONE commit, and a CivitAI-ready folder. No gradio.

`publish(config, resolver, ...)` reads top to bottom, a module for each step:
1. the run (`run.py`): its config.toml, the chosen checkpoint and its ss_* metadata, the samples made at that
   checkpoint's step, and where they exist the run's concepts.json and evaluation/evaluation.json
   (written by the concepts and evaluation steps; read defensively: a malformed row is left out
   and named in the notes). Without concepts the triggers come from the LoRA's metadata, the
   config (protected tags) and the tag leading the captions of each dataset folder;
2. what goes out (`card.py`, `bundle.py`), as a bundle of files by their path in the repository: the checkpoint and
   samples as they are on disk (the PNGs keep their A1111 infotext), the card as text;
3. a dry run (`bundle.py`) writes that bundle to a folder (the folder that would be uploaded), and the CivitAI
   bundle (the file, previews with infotext, description.md, A1111's `<name>.json`) to another;
4. an upload (`hub.py`), with huggingface_hub: whoami, create_repo, each file pre-uploaded (LFS or Xet, as
   the Hub says) with progress per file, then one commit naming them all. The repository shows
   none of it until that commit lands, so a failed upload leaves nothing half-published, and
   publishing again retries it (objects already uploaded are not sent twice).

Tokens: `publish` takes the caller's token. The token of whoever runs the machine (HF_TOKEN, the
local `hf auth login`) is used only when `owner_login_allowed`: on the command line, and in an app
that strangers cannot reach. On a Space, a --share link or a public --host a request publishes
with its own token (the Space's OAuth sign-in, or one the API caller passes) or not at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.errors import ConfigError
from studio.paths import Resolver
from studio.publish.bundle import civitai_bundle, hub_bundle, output_folder, write_folder
from studio.publish.card import base_model_info, card_text
from studio.publish.hub import Report, hub_token, upload
from studio.publish.run import leading_tags, read_evaluation, read_run

__all__ = ["PublishConfig", "PublishResult", "check", "leading_tags", "publish", "read_evaluation", "repo_id_problem"]

PUBLISH_DIR = "publish"  # RUN/publish/<checkpoint>-huggingface, RUN/publish/<checkpoint>-civitai


class PublishConfig(BaseModel):
    """One publish: from a run's checkpoint to a Hub repository, a dry-run folder, a CivitAI folder."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1, max_length=1000)  # a run folder (a name in workspace/runs, or a path)
    checkpoint: str = Field("", max_length=1000)  # a file of RUN/loras; "" = the recommended, else the final
    repo_id: str = Field("", max_length=96)  # OWNER/NAME; "" = no upload
    private: bool = True
    license: str = Field("", max_length=64)  # "" = the base model's license, else "other"
    dry_run: bool = False  # write the folder that would be uploaded, upload nothing
    folder: str = Field("", max_length=1000)  # the dry run's folder ("" = RUN/publish/<checkpoint>-huggingface)
    civitai: bool = False  # also write a CivitAI-ready folder
    civitai_folder: str = Field("", max_length=1000)  # "" = RUN/publish/<checkpoint>-civitai

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        value = value.strip()
        problem = repo_id_problem(value) if value else None
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value

    @field_validator("license")
    @classmethod
    def _license(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9.+_-]*", value):
            raise ValueError(f"{value!r}: a license id such as apache-2.0, openrail++ or faipl-1.0-sd")
        return value


def repo_id_problem(value: str) -> str | None:
    """What is wrong with OWNER/NAME for the Hub (huggingface_hub's own validator), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        return str(exc)
    if value.count("/") != 1:
        return "write it as OWNER/NAME (your user name or an organization of yours)"
    return None


# -- the one entry point ---------------------------------------------------------------------------
@dataclass
class PublishResult:
    checkpoint: Path
    repo_id: str
    files: list[str]  # paths in the repository
    url: str | None = None
    commit: str | None = None
    folder: Path | None = None
    civitai_folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        parts = []
        if self.url:
            parts.append(f"Published {self.checkpoint.name} to {self.url} ({len(self.files)} files in one commit)")
        if self.folder:
            parts.append(f"Dry run: the {len(self.files)} files that would be uploaded are in {self.folder}")
        if self.civitai_folder:
            parts.append(f"CivitAI folder: {self.civitai_folder}")
        return ". ".join(parts) + "."

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint.name, "repo_id": self.repo_id, "url": self.url, "commit": self.commit,
                "files": self.files, "folder": str(self.folder) if self.folder else None,
                "civitai_folder": str(self.civitai_folder) if self.civitai_folder else None, "notes": self.notes}


def check(config: PublishConfig, resolver: Resolver, token: str | None, *,
          owner_login_allowed: bool) -> tuple[Path, str | None]:
    """The cheap checks, before any work: the run folder, that there is something to do, and the
    token to upload with (None without an upload)."""
    runs = resolver.workspace / "runs"  # a request names a run of runs/; the command line any run folder
    run_dir = resolver.folder(config.run, [runs], "run") if resolver.owner else resolver.run(config.run, runs)
    uploading = bool(config.repo_id) and not config.dry_run
    if not (uploading or config.dry_run or config.civitai):
        raise ConfigError("give a repo id (OWNER/NAME) to publish, or ask for a dry run or a CivitAI folder")
    return run_dir, hub_token(token, owner_login_allowed=owner_login_allowed) if uploading else None


def publish(config: PublishConfig, resolver: Resolver, *, token: str | None = None, owner_login_allowed: bool,
            report: Report | None = None, endpoint: str | None = None) -> PublishResult:
    report = report or (lambda fraction, message: None)
    # 1. Check inputs: the run, what to do, the token before any work
    run_dir, hub = check(config, resolver, token, owner_login_allowed=owner_login_allowed)
    report(0.0, "reading the run")
    summary = read_run(run_dir, config.checkpoint, resolver)
    folder = output_folder(resolver, config.folder, run_dir / PUBLISH_DIR / f"{summary.checkpoint.stem}-huggingface",
                           "dry-run folder")
    civitai = output_folder(resolver, config.civitai_folder,
                            run_dir / PUBLISH_DIR / f"{summary.checkpoint.stem}-civitai", "CivitAI folder")
    # 2. What goes out
    base = base_model_info(str(summary.settings.get("pretrained_model", "")), summary.family, config.license)
    summary.family = base.family or summary.family
    files = hub_bundle(summary, card_text(summary, base, config.repo_id))
    result = PublishResult(summary.checkpoint, config.repo_id, [f.path for f in files], notes=summary.notes)
    marker = {"run": run_dir.name, "checkpoint": summary.checkpoint.name, "repo_id": config.repo_id}
    # 3. Folders
    if config.dry_run:
        report(0.05, f"writing {folder}")
        result.folder = write_folder(files, folder, {**marker, "kind": "huggingface"})
    if config.civitai:
        report(0.08, f"writing {civitai}")
        result.civitai_folder = write_folder(civitai_bundle(summary, base), civitai, {**marker, "kind": "civitai"})
    # 4. The upload: one commit
    if hub is not None:
        step = f" (step {summary.step})" if summary.step else ""
        done = upload(files, config.repo_id, private=config.private, token=hub, endpoint=endpoint, report=report,
                      message=f"Upload {summary.checkpoint.name}{step} from Anime LoRA Studio")
        result.url, result.commit = done.url, done.commit
    report(1.0, result.message)
    return result
