"""Users of a multi-user Space without a server: each user's context and folder, visitors, the
session reading, and the file guard's decisions (tests/test_spaces_users.py runs the real app)."""

import time

import pytest

from studio.context import AppContext
from studio.errors import StudioError
from studio.settings import Settings
from studio.ui.users import WorkspaceFileGuard, hub_token, signed_in_user


def multi_user(tmp_path) -> AppContext:
    return AppContext.create(Settings(workspace=tmp_path, oauth=True, space_id="me/studio"))


def scope_of(user, expires_in=3600.0, path="/"):
    info = {"userinfo": {"preferred_username": user}, "access_token": f"tok-{user}", "expires_at": time.time() + expires_in}
    return {"type": "http", "path": path, "session": {"oauth_info": info} if user else {}}


def test_each_user_has_a_folder_of_their_own_and_shares_the_models(tmp_path):
    root = multi_user(tmp_path)
    alice, bob, visitor = root.for_user("alice"), root.for_user("bob"), root.for_user(None)
    assert alice is root.for_user("alice") and alice.manager is bob.manager is root.manager
    assert alice.settings.workspace == tmp_path.resolve() / "users" / "alice"
    assert alice.settings.datasets_dir.is_dir() and not (alice.settings.workspace / "models").exists()
    assert alice.settings.models_dir == bob.settings.models_dir == root.settings.models_dir
    assert alice.jobs is not bob.jobs
    assert visitor.is_visitor and not alice.is_visitor
    for name in ("../alice", "a/b", "", ".hidden"):
        with pytest.raises(StudioError, match="unusable user name"):
            root.for_user(name)


def test_off_multi_user_spaces_everyone_shares_the_context(tmp_path):
    root = AppContext.create(Settings(workspace=tmp_path))
    assert root.for_user("alice") is root and not root.is_visitor
    behind_password = AppContext.create(Settings(workspace=tmp_path, oauth=True, auth=("team", "pw")))
    assert behind_password.for_user("alice") is behind_password


def test_the_session_names_the_user_until_it_expires():
    assert signed_in_user(scope_of("alice")) == "alice" and hub_token(scope_of("alice")) == "tok-alice"
    assert signed_in_user(scope_of("alice", expires_in=-1)) is None
    assert signed_in_user(scope_of(None)) is None and signed_in_user(None) is None


def test_the_file_guard_serves_workspace_files_to_their_owner_only(tmp_path):
    (tmp_path / "users" / "alice").mkdir(parents=True)
    guard = WorkspaceFileGuard(None, tmp_path, per_user=True)
    mine = f"/gradio_api/file={tmp_path}/users/alice/outputs/1.png"
    assert guard._allowed(scope_of("alice", path=mine))
    assert not guard._allowed(scope_of("bob", path=mine)) and not guard._allowed(scope_of(None, path=mine))
    sneaky = f"/gradio_api/file={tmp_path}/users/bob/../alice/outputs/1.png"
    assert not guard._allowed(scope_of("bob", path=sneaky))
    assert not guard._allowed(scope_of("alice", path=f"/gradio_api/file={tmp_path}/models/x.safetensors"))
    assert guard._allowed(scope_of(None, path="/gradio_api/file=/tmp/gradio/abc/image.png")), "Gradio's own checks"
    assert guard._allowed(scope_of(None, path="/config"))


@pytest.mark.parametrize(("relative", "served"), [
    ("outputs/2026-12-04/00001-5.png", True), ("datasets/chars/a.png", True), ("runs/r/samples/s.png", True),
    ("loras/x.safetensors", True), ("presets/train/mine.toml", False), ("cache/latents/a.safetensors", False),
    ("models/demo-sdxl/unet/x.safetensors", False), ("datasets/chars/.undo/000001.json", False),
    (".secret", False), ("outputs", False),
])
def test_one_users_file_route_serves_only_what_the_page_shows(tmp_path, relative, served):
    guard = WorkspaceFileGuard(None, tmp_path)
    assert guard._allowed(scope_of(None, path=f"/gradio_api/file={tmp_path}/{relative}")) is served


def test_after_a_restart_each_users_waiting_queue_goes_on(tmp_path, monkeypatch):
    """app.py starts the queue thread of every workspace with runs waiting: on a multi-user Space,
    each signed-in user's (they need not come back for their queued runs to train)."""
    from studio.training.queue import CANCELLED, RunQueue
    from tests.train_fixtures import fast_config, make_dataset

    started = []
    monkeypatch.setattr(AppContext, "start_queue", lambda self: started.append(self.user))
    config = fast_config(make_dataset(tmp_path / "data", count=1), output_name="queued")
    RunQueue(tmp_path / "users" / "alice").add(config)  # waiting
    bob = RunQueue(tmp_path / "users" / "bob")
    bob.cancel(bob.add(config).id)  # nothing left to run
    RunQueue(tmp_path / "users" / "carol").add(config)
    RunQueue(tmp_path / "users" / "carol").started(RunQueue(tmp_path / "users" / "carol").read().entries[0].id, "")
    (tmp_path / "users" / "not a name").mkdir()
    (tmp_path / "users" / "link").symlink_to(tmp_path / "users" / "alice", target_is_directory=True)
    assert bob.read().entries[0].state == CANCELLED
    root = multi_user(tmp_path)
    assert [c.user for c in root.resume_queues()] == started == ["alice", "carol"]  # carol's was cut off mid-run

    single = tmp_path / "single"
    assert AppContext.create(Settings(workspace=single)).resume_queues() == []
    RunQueue(single).add(config)
    started.clear()
    assert len(AppContext.create(Settings(workspace=single)).resume_queues()) == 1 and started == [None]
