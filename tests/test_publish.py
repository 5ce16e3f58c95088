"""Publishing a run's checkpoint: a Hugging Face model repository made in one commit by
huggingface_hub's own client against a stand-in of the Hub's HTTP API (tests/hub_standin.py), its
model card read back with huggingface_hub's ModelCard; dry runs, the CivitAI folder, the card's
concepts / evaluation / triggers, the token rules, the path rules, the CLI and the /publish API."""

import json
import shutil
from pathlib import Path

import pytest

from studio.errors import ConfigError, StudioError
from studio.paths import Resolver
from studio.publish import PublishConfig, publish, read_evaluation
from studio.schemas import validate
from tests.hub_standin import HubStandIn
from tests.train_fixtures import make_dataset

ALICE, BOB = "hf_alice_write_token", "hf_bob_write_token"
PROMPTS = ["mychar, 1girl, smile", "mychar, 1girl, outdoors"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_models_dir):
    """A real run on demo-sdxl: checkpoints at step 2 and the final one (step 4), samples at both."""
    from studio.training.runs import write_run_config
    from studio.training.trainer import train
    from tests.train_fixtures import fast_config

    root = tmp_path_factory.mktemp("publish-run")
    dataset = make_dataset(root / "datasets" / "mychar" / "10_mychar")
    for caption in dataset.glob("*.txt"):
        caption.write_text("mychar, " + caption.read_text())
    config = fast_config(root / "datasets" / "mychar", max_train_steps=4, save_every_n_steps=2,
                         sample_every_n_steps=2, sample_prompts=PROMPTS, sample_size=(64, 64), sample_steps=2,
                         output_name="mychar")
    run_dir = root / "runs" / "mychar-run"
    write_run_config(run_dir, config)
    result = train(config, run_dir=run_dir, models_dir=demo_models_dir, cache_dir=root / "cache")
    assert result.status == "done"
    return root


@pytest.fixture
def ws(trained, tmp_path):
    """A workspace of its own holding a copy of the trained run (without concepts or evaluation)."""
    workspace = tmp_path / "ws"
    shutil.copytree(trained / "datasets", workspace / "datasets")
    run_dir = workspace / "runs" / "mychar-run"
    shutil.copytree(trained / "runs" / "mychar-run", run_dir)
    (run_dir / "concepts.json").unlink(missing_ok=True)
    config = (run_dir / "config.toml").read_text().replace(str(trained), str(workspace))
    (run_dir / "config.toml").write_text(config.replace('"demo-sdxl"', '"animagine-xl-3.1"'))
    return workspace


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, with huggingface_hub pointed at it: online, LFS uploads (no Xet), no
    token from the environment or a login file unless a test sets one."""
    from huggingface_hub import constants

    with HubStandIn({ALICE: ("alice", ["studio-org"]), BOB: ("bob", [])}) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)  # as HF_ENDPOINT set before the import would
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", standin.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        yield standin


def config(**values) -> PublishConfig:
    return validate(PublishConfig, {"run": "mychar-run", **values})


def request(ws: Path) -> Resolver:
    return Resolver(ws)


def sample_names(run_dir: Path, step: int) -> set[str]:
    return {p.name for p in (run_dir / "samples").glob(f"step{step:06d}-*.png")}


# -- the upload ------------------------------------------------------------------------------------------
def test_publish_makes_one_commit_and_the_card_parses_with_modelcard(ws, hub):
    from huggingface_hub import ModelCard

    from studio.generation.infotext import read_infotext

    reports = []
    result = publish(config(repo_id="alice/mychar-lora"), request(ws), token=ALICE, owner_login_allowed=False,
                     report=lambda fraction, message: reports.append((fraction, message)))
    run_dir = ws / "runs" / "mychar-run"
    samples = sample_names(run_dir, 4)
    assert len(samples) == 2
    repo = hub.repos["alice/mychar-lora"]
    assert repo.private is True
    assert hub.paths("alice/mychar-lora") == {".gitattributes", "README.md", "mychar.safetensors",
                                              *(f"samples/{name}" for name in samples)}
    assert len(repo.commits) == 2 and len(repo.commits[1]["files"]) == 4  # created, then ONE commit with all
    assert repo.files["mychar.safetensors"].data == (run_dir / "loras" / "mychar.safetensors").read_bytes()
    assert repo.files["mychar.safetensors"].lfs and not repo.files["README.md"].lfs
    assert result.commit == repo.sha and result.url.endswith("/alice/mychar-lora")
    assert not hub.unexpected
    assert hub.count("POST", "/commit/main$") == 1 and hub.count("PUT", "^/_lfs/") == 3  # LoRA + 2 samples
    assert [m.split(" (")[0] for _, m in reports if m.startswith("uploading")] == [
        "uploading mychar.safetensors", "uploading README.md", *(f"uploading samples/{n}" for n in sorted(samples))]
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    # read back through huggingface_hub: the card, and a sample that still carries its infotext
    card = ModelCard.load("alice/mychar-lora", token=ALICE)
    data = card.data
    assert data.base_model == "cagliostrolab/animagine-xl-3.1"
    assert (data.license, data.license_name) == ("other", "faipl-1.0-sd")
    assert {"lora", "text-to-image", "stable-diffusion-xl", "anime"} <= set(data.tags)
    assert data.instance_prompt == "mychar"
    assert [w["text"] for w in data.widget] == PROMPTS
    assert [w["output"]["url"] for w in data.widget] == [f"samples/{n}" for n in sorted(samples)]
    assert "This checkpoint was not evaluated" in card.text and "| Network | lora on attention_ff, dim 4" in card.text
    assert 'pipe.load_lora_weights("alice/mychar-lora", weight_name="mychar.safetensors")' in card.text
    sample = Path(hub_download("alice/mychar-lora", f"samples/{min(samples)}"))
    assert read_infotext(sample).startswith(PROMPTS[0])


def hub_download(repo_id: str, name: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, name, token=ALICE)


def test_a_failed_commit_publishes_nothing_and_publishing_again_completes(ws, hub):
    hub.fail_next["commit"] = 1
    with pytest.raises(StudioError, match="the commit to alice/retry failed.*Nothing was published"):
        publish(config(repo_id="alice/retry"), request(ws), token=ALICE, owner_login_allowed=False)
    assert hub.paths("alice/retry") == {".gitattributes"}  # the repo shows nothing of it
    uploads = hub.count("PUT", "^/_lfs/")
    assert uploads == 3 and len(hub.lfs) == 3  # the blobs sit in LFS storage, named by no commit

    result = publish(config(repo_id="alice/retry"), request(ws), token=ALICE, owner_login_allowed=False)
    assert hub.paths("alice/retry") == {".gitattributes", *result.files}
    assert hub.count("PUT", "^/_lfs/") == uploads  # nothing sent twice
    assert len(hub.repos["alice/retry"].commits) == 2
    again = publish(config(repo_id="alice/retry"), request(ws), token=ALICE, owner_login_allowed=False)
    assert again.commit == result.commit and len(hub.repos["alice/retry"].commits) == 2  # unchanged: no empty commit


def test_a_public_repository_is_not_used_for_a_private_upload(ws, hub):
    publish(config(repo_id="alice/open", private=False), request(ws), token=ALICE, owner_login_allowed=False)
    assert hub.repos["alice/open"].private is False
    commits = len(hub.repos["alice/open"].commits)
    with pytest.raises(ConfigError, match="exists and is public"):
        publish(config(repo_id="alice/open", private=True), request(ws), token=ALICE, owner_login_allowed=False)
    assert len(hub.repos["alice/open"].commits) == commits


def test_an_organization_of_yours_is_fine_another_namespace_is_refused(ws, hub):
    publish(config(repo_id="studio-org/shared"), request(ws), token=ALICE, owner_login_allowed=False)
    assert "README.md" in hub.paths("studio-org/shared")
    with pytest.raises(ConfigError, match="bob's, who cannot publish to alice/"):
        publish(config(repo_id="alice/not-bobs"), request(ws), token=BOB, owner_login_allowed=False)
    assert "alice/not-bobs" not in hub.repos and hub.count("POST", "/api/repos/create") == 1


# -- whose token ---------------------------------------------------------------------------------------
def test_a_server_strangers_reach_never_uses_the_owners_token(ws, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)  # the owner's
    with pytest.raises(ConfigError, match="needs your own Hugging Face token"):
        publish(config(repo_id="alice/x"), request(ws), token=None, owner_login_allowed=False)
    with pytest.raises(ConfigError, match="needs your own Hugging Face token"):
        publish(config(repo_id="alice/x"), request(ws), token="  ", owner_login_allowed=False)
    assert hub.calls == []  # nothing was sent anywhere
    # locally the owner's HF_TOKEN is theirs to use
    publish(config(repo_id="alice/x"), request(ws), token=None, owner_login_allowed=True)
    assert "README.md" in hub.paths("alice/x")


def test_no_token_anywhere_and_a_wrong_token_say_so(ws, hub):
    with pytest.raises(ConfigError, match="no Hugging Face token: set HF_TOKEN"):
        publish(config(repo_id="alice/x"), request(ws), owner_login_allowed=True)
    with pytest.raises(StudioError, match="checking your Hugging Face token failed: Invalid user token"):
        publish(config(repo_id="alice/x"), request(ws), token="hf_wrong", owner_login_allowed=False)
    assert hub.repos == {}


def test_offline_mode_is_named(ws, hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        publish(config(repo_id="alice/x"), request(ws), token=ALICE, owner_login_allowed=False)


# -- what a request may name --------------------------------------------------------------------------
@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "../x", "alice/x--y", "alice/x.git", "alice/ bad", "a" * 97])
def test_bad_repo_ids_are_refused(repo_id):
    with pytest.raises(ConfigError, match="repo_id"):
        config(repo_id=repo_id)


def test_a_request_stays_inside_the_workspace(ws, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(ws / "runs" / "mychar-run", outside / "run")
    cases = [({"run": str(outside / "run"), "dry_run": True}, "run"),
             ({"run": "../../outside/run", "dry_run": True}, "run"),
             ({"checkpoint": str(outside / "run" / "loras" / "mychar.safetensors"), "dry_run": True}, "checkpoint"),
             ({"dry_run": True, "folder": str(outside / "folder")}, "dry-run folder"),
             ({"civitai": True, "civitai_folder": "../outside/civitai"}, "CivitAI folder")]
    for values, what in cases:
        with pytest.raises(ConfigError, match=f"^{what} .* is not usable: .*nothing outside the workspace is read"):
            publish(config(**values), request(ws), owner_login_allowed=False)
    assert not (outside / "folder").exists() and not (outside / "civitai").exists()
    # another run's checkpoint, inside the workspace, is not this run's
    shutil.copytree(ws / "runs" / "mychar-run", ws / "runs" / "other")
    with pytest.raises(ConfigError, match="not a file of this run"):
        publish(config(checkpoint=str(ws / "runs" / "other" / "loras" / "mychar.safetensors"), dry_run=True),
                request(ws), owner_login_allowed=False)
    with pytest.raises(ConfigError, match="no checkpoint 'nope.safetensors'.*mychar-step00000002.safetensors"):
        publish(config(checkpoint="nope.safetensors", dry_run=True), request(ws), owner_login_allowed=False)
    # the command line's owner may write anywhere
    result = publish(config(run=str(ws / "runs" / "mychar-run"), dry_run=True, folder=str(outside / "folder")),
                     Resolver.command_line(ws),
                     owner_login_allowed=True)
    assert (outside / "folder" / "README.md").is_file() and result.folder == outside / "folder"


# -- dry runs and the CivitAI folder ------------------------------------------------------------------
def test_a_dry_run_writes_the_folder_that_would_be_uploaded(ws, hub):
    from huggingface_hub import ModelCard

    result = publish(config(repo_id="alice/mychar", dry_run=True), request(ws), owner_login_allowed=False)
    folder = ws / "runs" / "mychar-run" / "publish" / "mychar-huggingface"
    assert result.folder == folder and hub.calls == []  # no token needed, nothing sent
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert written == {*result.files, ".studio-publish.json"}
    assert (folder / "mychar.safetensors").read_bytes() == (ws / "runs/mychar-run/loras/mychar.safetensors").read_bytes()
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "cagliostrolab/animagine-xl-3.1" and card.data.instance_prompt == "mychar"
    # a second dry run replaces the folder; a folder it did not write is refused
    publish(config(repo_id="alice/mychar", dry_run=True, checkpoint="mychar.safetensors"), request(ws),
            owner_login_allowed=False)
    foreign = ws / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="was not written by a publish"):
        publish(config(dry_run=True, folder="mine"), request(ws), owner_login_allowed=False)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert not list((ws / "runs" / "mychar-run" / "publish").glob(".*.tmp"))


def test_the_civitai_folder_keeps_infotext_and_names_the_triggers(ws):
    from studio.generation.infotext import read_infotext

    result = publish(config(civitai=True, checkpoint="mychar-step00000002.safetensors"), request(ws),
                     owner_login_allowed=False)
    folder = result.civitai_folder
    run_dir = ws / "runs" / "mychar-run"
    assert folder == run_dir / "publish" / "mychar-step00000002-civitai"
    assert (folder / "mychar-step00000002.safetensors").read_bytes() == \
        (run_dir / "loras" / "mychar-step00000002.safetensors").read_bytes()
    originals = sorted((run_dir / "samples").glob("step000002-*.png"))  # the samples of that checkpoint's step
    previews = sorted((folder / "previews").glob("*.png"))
    assert len(previews) == len(originals) == 2
    for preview, original in zip(previews, originals):
        assert read_infotext(preview) == read_infotext(original) == preview.with_suffix(".txt").read_text()
    assert (folder / "mychar-step00000002.preview.png").read_bytes() == originals[0].read_bytes()
    user_metadata = json.loads((folder / "mychar-step00000002.json").read_text())
    assert user_metadata["activation text"] == "mychar" and user_metadata["sd version"] == "SDXL"
    description = (folder / "description.md").read_text()
    assert "**Trigger words:** mychar" in description and "Animagine XL 3.1" in description


# -- the card: concepts, evaluation, triggers ----------------------------------------------------------
def write_concepts_and_evaluation(run_dir: Path) -> None:
    (run_dir / "concepts.json").write_text(json.dumps([
        {"name": "Amiya", "triggers": ["amiya_ak", "amiya (arknights)"], "core_tags": ["animal ears", "blue eyes"],
         "images": 12},
        {"name": "Ember | red", "triggers": "ember_ef, red hair", "core_tags": [], "images": "7"},
        {"triggers": ["no name"]},
    ]))
    (run_dir / "evaluation").mkdir()
    (run_dir / "evaluation" / "evaluation.json").write_text(json.dumps({
        "checkpoints": {
            "mychar-step00000002.safetensors": {"Amiya": {"fidelity": 0.91, "bleed": {"Ember | red": 0.05},
                                                          "flexibility": 0.8},
                                                "Ember | red": {"fidelity": 0.2, "bleed": 0.1, "flexibility": 0.7}},
            "mychar.safetensors": {"Amiya": {"fidelity": 0.95, "bleed": 0.3, "flexibility": 0.5}},
        },
        "recommended": "mychar-step00000002.safetensors",
        "not_learned": {"mychar-step00000002.safetensors": ["Ember | red"]},
    }))


def test_the_card_shows_concepts_and_the_evaluation_and_publishes_the_recommended_checkpoint(ws):
    from huggingface_hub import ModelCard

    run_dir = ws / "runs" / "mychar-run"
    write_concepts_and_evaluation(run_dir)
    result = publish(config(repo_id="alice/two", dry_run=True), request(ws), owner_login_allowed=False)
    assert result.checkpoint.name == "mychar-step00000002.safetensors"  # the recommended one, not the final
    card = ModelCard.load(result.folder / "README.md")
    assert card.data.instance_prompt == "amiya_ak, amiya (arknights), ember_ef, red hair"
    assert [w["output"]["url"] for w in card.data.widget] == [
        f"samples/{n}" for n in sorted(sample_names(run_dir, 2))]
    text = card.text
    assert "| Amiya | amiya_ak, amiya (arknights) | 12 | animal ears, blue eyes |" in text
    assert "| Ember \\| red | ember_ef, red hair | 7 | – |" in text
    assert "Recommended checkpoint: **mychar-step00000002** (this one)." in text
    assert "⚠ Not learned by this checkpoint: Ember \\| red." in text
    assert "| **mychar-step00000002** | Amiya | 0.91 | 0.05 | 0.80 |" in text
    assert "| mychar | Amiya | 0.95 | 0.30 | 0.50 |" in text
    assert text.index("**mychar-step00000002** | Amiya") < text.index("| mychar | Amiya")  # this one first
    assert any("without a name" in note for note in result.notes)


@pytest.mark.parametrize("content", [
    {"config": {"seeds": [1]}, "bounds": {"max_bleed": 0.2}, "base": {"scores": {"X": {"fidelity": 0.1}}, "images": []},
     "checkpoints": [{"file": "a.safetensors", "step": 2, "version": 1, "images": [{"prompt": "x", "tags": []}],
                      "scores": {"X": {"fidelity": 0.5, "fidelity_with_tags": 0.6, "bleed_raw": 0.3, "bleed": 0.1,
                                       "flexibility": 1, "images": 4}}}],
     "recommended": "a.safetensors", "recommended_step": 2, "not_learned": [], "notes": []},
    {"checkpoints": [{"checkpoint": "a.safetensors", "concepts": [{"concept": "X", "fidelity": 0.5, "bleed": 0.1,
                                                                   "flexibility": 1}]}], "recommended": "a"},
    {"rows": [{"checkpoint": "runs/r/loras/a.safetensors", "concept": "X", "fidelity": 0.5, "bleed": [0.1, 0.05],
               "flexibility": 1}], "recommended": {"checkpoint": "a.safetensors"}},
    {"a.safetensors": {"X": {"fidelity": 0.5, "bleed": 0.1, "flexibility": 1, "notes": "extra keys are fine"}},
     "recommended": "a.safetensors", "not_learned": ["X"]},
])
def test_the_evaluation_reader_takes_the_shapes_an_evaluation_may_have(tmp_path, content):
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "evaluation.json").write_text(json.dumps(content))
    evaluation = read_evaluation(tmp_path, notes := [])
    assert [(r.checkpoint, r.concept, r.fidelity, r.bleed, r.flexibility) for r in evaluation.rows] == [
        ("a", "X", 0.5, 0.1, 1.0)]
    assert evaluation.recommended == "a" and notes == []


@pytest.mark.parametrize("content", ['[1, 2]', '"text"', '{"checkpoints": 3}', "{not json"])
def test_a_malformed_evaluation_is_left_out_with_a_note(tmp_path, content):
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "evaluation.json").write_text(content)
    evaluation = read_evaluation(tmp_path, notes := [])
    assert evaluation is None or evaluation.rows == []
    assert notes or evaluation is not None


def test_without_concepts_the_triggers_come_from_the_run(ws):
    from huggingface_hub import ModelCard

    from studio.publish import leading_tags

    result = publish(config(dry_run=True), request(ws), owner_login_allowed=False)
    card = ModelCard.load(result.folder / "README.md")
    assert card.data.instance_prompt == "mychar"  # the kohya folder 10_mychar, whose name is a tag
    assert "Write `mychar` in the prompt." in card.text
    assert leading_tags(ws / "datasets" / "mychar") == ["mychar"]  # and it leads every caption
    flat = make_dataset(ws / "datasets" / "flat")
    assert leading_tags(flat) == []  # "1girl" leads most captions but is no trigger


def test_an_anima_run_and_a_license_choice(ws):
    from huggingface_hub import ModelCard

    run_dir = ws / "runs" / "mychar-run"
    text = (run_dir / "config.toml").read_text().replace('"animagine-xl-3.1"', '"anima"')
    (run_dir / "config.toml").write_text(text)
    result = publish(config(dry_run=True, license="apache-2.0"), request(ws), owner_login_allowed=False)
    data = ModelCard.load(result.folder / "README.md").data
    assert data.base_model == "circlestone-labs/Anima-Base-v1.0-Diffusers" and data.license == "apache-2.0"
    assert "anima" in data.tags and "stable-diffusion-xl" not in data.tags
    assert "A1111" not in (result.folder / "README.md").read_text()  # ComfyUI only: A1111 has no Anima
    result = publish(config(dry_run=True), request(ws), owner_login_allowed=False)
    data = ModelCard.load(result.folder / "README.md").data
    assert (data.license, data.license_name) == ("other", "circlestone-labs-non-commercial-license")
    result = publish(config(dry_run=True, license="my-own-terms"), request(ws), owner_login_allowed=False)
    data = ModelCard.load(result.folder / "README.md").data
    assert (data.license, data.license_name) == ("other", "my-own-terms")


# -- the command line ---------------------------------------------------------------------------------
def test_the_command_line_publishes_with_the_owners_login(ws, hub, monkeypatch, capsys):
    from studio.__main__ import main

    monkeypatch.setenv("HF_TOKEN", ALICE)
    run_dir = str(ws / "runs" / "mychar-run")
    assert main(["publish", run_dir, "--checkpoint", "mychar.safetensors", "--repo", "alice/cli", "--private",
                 "--workspace", str(ws)]) == 0
    assert "Published mychar.safetensors to" in capsys.readouterr().out
    assert hub.repos["alice/cli"].private and "mychar.safetensors" in hub.paths("alice/cli")
    assert main(["publish", "mychar-run", "--repo", "alice/cli", "--dry-run", str(ws.parent / "anywhere"),
                 "--civitai", "--workspace", str(ws)]) == 0  # a bare run name; any folder
    assert (ws.parent / "anywhere" / "README.md").is_file()
    assert (ws / "runs" / "mychar-run" / "publish" / "mychar-civitai" / "description.md").is_file()
    assert main(["publish", run_dir, "--repo", "not a repo", "--workspace", str(ws)]) == 2
    assert main(["publish", str(ws / "nope"), "--repo", "alice/cli", "--workspace", str(ws)]) == 2
    assert main(["publish", run_dir, "--workspace", str(ws)]) == 2  # nothing asked
    hub.fail_next["commit"] = 1
    assert main(["publish", run_dir, "--repo", "alice/cli2", "--workspace", str(ws)]) == 1
    assert "Nothing was published" in capsys.readouterr().err


# -- the /publish API and the panel ---------------------------------------------------------------------
@pytest.fixture
def panel_server(ws, tmp_path, monkeypatch):
    """The Publish panel in a small Blocks of its own, served on 127.0.0.1."""
    import gradio as gr

    from studio.context import AppContext
    from studio.jobs import JobRunner
    from studio.settings import Settings
    from studio.ui.publish_view import build_publish_panel, wire_publish_panel
    from tests.app_server import free_port

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    ctx = AppContext(Settings(workspace=ws), manager=None, jobs=JobRunner())
    with gr.Blocks(analytics_enabled=False) as app:
        panel = build_publish_panel(ctx)
        wire_publish_panel(ctx, panel)
    app.queue()
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield ctx, panel, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_the_publish_api_and_its_refusals(panel_server, hub, monkeypatch):
    from gradio_client import Client

    from studio.settings import Settings

    ctx, _, url = panel_server
    client = Client(url, verbose=False, analytics_enabled=False)
    text, details = client.predict("mychar-run", repo_id="alice/api", token=ALICE, api_name="/publish")
    assert text.startswith("✓ Published mychar.safetensors") and details["commit"] == hub.repos["alice/api"].sha
    assert set(details["files"]) | {".gitattributes"} == hub.paths("alice/api")
    assert hub.repos["alice/api"].private is True  # the API's default

    text, details = client.predict("mychar-run", dry_run=True, civitai=True, api_name="/publish")
    assert Path(details["folder"]).is_dir() and Path(details["civitai_folder"]).is_dir()
    for values, message in [({"run": "/etc"}, "is not usable"), ({"run": "mychar-run", "repo_id": "x"}, "OWNER/NAME"),
                            ({"run": "mychar-run", "repo_id": "alice/y", "private": "yes"}, "private: expected true")]:
        with pytest.raises(Exception, match=message):
            client.predict(**values, token=ALICE, api_name="/publish")

    # strangers can reach it now: the owner's HF_TOKEN is never used, the caller's own token is
    monkeypatch.setenv("HF_TOKEN", ALICE)
    ctx.settings = Settings(workspace=ctx.settings.workspace, host="0.0.0.0")
    calls = len(hub.calls)
    with pytest.raises(Exception, match="needs your own Hugging Face token"):
        client.predict("mychar-run", repo_id="alice/owner", api_name="/publish")
    assert len(hub.calls) == calls and "alice/owner" not in hub.repos
    client.predict("mychar-run", repo_id="bob/own", token=BOB, api_name="/publish")
    assert "README.md" in hub.paths("bob/own")


def test_the_button_uses_the_signed_in_users_token_where_strangers_reach(panel_server, hub, monkeypatch):
    import gradio as gr

    from studio.settings import Settings
    from studio.ui.publish_view import on_publish

    ctx, _, _ = panel_server
    monkeypatch.setenv("HF_TOKEN", ALICE)
    ctx.settings = Settings(workspace=ctx.settings.workspace, share=True)
    handler = on_publish(ctx)
    form = ("mychar-run", "", "bob/signed-in", True, "", "", False, False)
    with pytest.raises(gr.Error, match="needs your own Hugging Face token"):
        list(handler(*form, None))
    lines = list(handler(*form, gr.OAuthToken(token=BOB, scope="write-repos", expires_at=0)))
    assert lines[0].startswith("**Publishing**") and lines[-1].startswith("✓ Published")
    assert "README.md" in hub.paths("bob/signed-in")
    from studio.ui.publish_view import checkpoint_choices

    choices = checkpoint_choices(ctx, "mychar-run").choices
    assert [value for _, value in choices] == ["(default)", "mychar-step00000002.safetensors", "mychar.safetensors"]
    form = ("mychar-run", "(default)", "bob/signed-in", True, "", "", False, False)  # the default entry: no file named
    assert list(handler(*form, gr.OAuthToken(token=BOB, scope="write-repos", expires_at=0)))[-1].startswith("✓")
