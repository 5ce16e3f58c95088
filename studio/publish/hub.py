"""The upload with huggingface_hub: the token, whoami, create_repo, each file pre-uploaded with
progress, then ONE commit naming them all, so a failed upload leaves nothing half-published."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from studio.errors import ConfigError, StudioError
from studio.publish.bundle import BundleFile

Report = Callable[[float | None, str], None]
NOTHING_PUBLISHED = ("Nothing was published: the repository shows none of these files. Publish again to retry "
                     "(files already uploaded are not sent twice).")


def hub_token(given: str | None, *, owner_login_allowed: bool) -> str:
    """The token to publish with: the caller's own, else (only where allowed) HF_TOKEN or the
    local `hf auth login`. Always a string, so huggingface_hub never falls back by itself."""
    given = (given or "").strip()
    if given:
        return given
    if not owner_login_allowed:
        raise ConfigError("publishing needs your own Hugging Face token: sign in with Hugging Face, or pass a write "
                          "token of yours. This server can be reached by others, so it never publishes with its "
                          "owner's token")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login`")
    return token


@contextmanager
def hub_phase(what: str):
    """A Hub call's failure as one StudioError naming the phase (the token never appears)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except StudioError:
        raise
    except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = exc.__cause__
        if cause is not None and str(cause).strip():
            reason += f" ({str(cause).strip().splitlines()[0]})"
        raise StudioError(f"{what} failed: {reason}. {NOTHING_PUBLISHED}") from None


@dataclass
class Upload:
    url: str
    commit: str
    commit_url: str


def upload(files: list[BundleFile], repo_id: str, *, private: bool, token: str, message: str,
           report: Report, endpoint: str | None = None) -> Upload:
    """One commit of `files` to `repo_id` (created if needed), each file pre-uploaded first."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise ConfigError("HF_HUB_OFFLINE is set: publishing needs the Hub. Unset it, or make a dry run")
    api = HfApi(endpoint=endpoint, token=token)
    report(0.1, "checking your token")
    with hub_phase("checking your Hugging Face token"):
        who = api.whoami()
    owner, names = repo_id.split("/")[0], [who.get("name"), *(o.get("name") for o in who.get("orgs") or [])]
    if owner not in names:
        raise ConfigError(f"your token is {who.get('name')}'s, who cannot publish to {owner}/ (your namespaces: "
                          f"{', '.join(n for n in names if n)})")
    report(0.15, f"creating {repo_id}")
    with hub_phase(f"creating {repo_id}"):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        existing = api.model_info(repo_id)
    if private and existing.private is False:
        raise ConfigError(f"{repo_id} exists and is public, and you asked for a private upload: make it private "
                          "on the Hub first, publish it public, or choose another name")
    operations = [CommitOperationAdd(f.path, f.source if f.source is not None else f.data) for f in files]
    total, done = sum(f.size for f in files) or 1, 0
    for item, operation in zip(files, operations):
        report(0.2 + 0.7 * done / total, f"uploading {item.path} ({item.size / 1e6:.1f} MB)")
        with hub_phase(f"uploading {item.path}"):
            api.preupload_lfs_files(repo_id, additions=[operation], free_memory=False)
        done += item.size
    report(0.92, f"committing {len(files)} files to {repo_id}")
    with hub_phase(f"the commit to {repo_id}"):
        commit = api.create_commit(repo_id, operations=operations, commit_message=message,
                                   commit_description="Published with Anime LoRA Studio")
    return Upload(url, commit.oid, commit.commit_url)
