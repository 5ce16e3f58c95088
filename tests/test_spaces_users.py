"""A public Space with "Sign in with Hugging Face": `python app.py` with no arguments and the
variables a Space with `hf_oauth: true` gets, Gradio's real OAuth routes and session middleware.
The Hub is unreachable here, so a signed-in user is supplied the way the OAuth callback leaves
one: Gradio's session cookie holding `oauth_info`, signed with the key Gradio derives from
OAUTH_CLIENT_SECRET. Two users and a signed-out visitor, through the API and the file route; the
browser tests cover the page."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from itsdangerous import TimestampSigner
from PIL import Image

from tests.app_server import AppServer

CLIENT_SECRET = "test-oauth-secret"
pytestmark = pytest.mark.filterwarnings("ignore")


def oauth_env(workspace: Path) -> dict:
    return {
        "SPACE_ID": "someone/anime-lora-studio", "SYSTEM": "spaces", "GRADIO_SERVER_NAME": "0.0.0.0",
        "STUDIO_WORKSPACE": str(workspace), "STUDIO_DEMO": "1",
        "OAUTH_CLIENT_ID": "test-client", "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
        "OAUTH_SCOPES": "openid profile write-repos manage-repos",
        "OPENID_PROVIDER_URL": "http://127.0.0.1:9",  # never contacted: nobody signs in through it here
    }


def session_cookie(username: str) -> str:
    """Gradio's session cookie after "Sign in with Hugging Face" as `username`."""
    session = {"oauth_info": {
        "access_token": f"hf_oauth_token_of_{username}", "scope": "openid profile write-repos manage-repos",
        "expires_at": time.time() + 3600,
        "userinfo": {"preferred_username": username, "name": username.title(), "picture": "",
                     "profile": f"https://huggingface.co/{username}"},
    }}
    key = hashlib.sha256((CLIENT_SECRET + "-v4").encode()).hexdigest()
    signed = TimestampSigner(key).sign(base64.b64encode(json.dumps(session).encode()))
    return "session=" + signed.decode()


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("oauth-space")
    server = AppServer(root, argv=[], env=oauth_env(root / "ws"))
    try:
        server.wait_until_serving(timeout=90)
        yield server
    finally:
        server.stop()


def client(server, user: str | None):
    from gradio_client import Client

    headers = {"Cookie": session_cookie(user)} if user else None
    return Client(server.url, verbose=False, analytics_enabled=False, headers=headers)


def fetch(server, path: str, user: str | None) -> int:
    url = server.url + "gradio_api/file=" + urllib.parse.quote(str(path))
    request = urllib.request.Request(url, headers={"Cookie": session_cookie(user)} if user else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def make_dataset(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(folder / f"{i}.png")


def test_each_signed_in_user_works_in_their_own_workspace(space):
    from gradio_client.exceptions import AppError

    ws = space.workspace / "ws"
    make_dataset(ws / "users" / "alice" / "datasets" / "chars")  # what alice uploaded
    summary, _ = client(space, "alice").predict("chars", tagger="demo-tagger", trigger="alicechar",
                                                api_name="/caption")
    assert (ws / "users" / "alice" / "datasets" / "chars" / "0.txt").read_text().startswith("alicechar, ")
    bob = client(space, "bob")
    with pytest.raises(AppError, match="no dataset folder 'chars'"):
        bob.predict("chars", tagger="demo-tagger", api_name="/caption")
    for path in ("../alice/datasets/chars", str(ws / "users" / "alice" / "datasets" / "chars")):
        with pytest.raises(AppError, match="outside the workspace"):
            bob.predict(path, tagger="demo-tagger", api_name="/caption")
    assert not (ws / "users" / "alice" / "datasets" / "chars" / "0.txt").read_text().startswith("bob")


def test_the_file_route_serves_a_users_files_to_that_user_only(space):
    images = client(space, "alice").predict("1girl, solo", steps=1, width=256, height=256, seed=7,
                                            api_name="/generate")
    assert Path(images[0]["image"]).is_file()
    outputs = list((space.workspace / "ws" / "users" / "alice" / "outputs").rglob("*.png"))
    assert outputs, "alice's images go to her own outputs folder"
    assert not list((space.workspace / "ws").glob("outputs/**/*.png"))
    assert fetch(space, outputs[0], "alice") == 200
    assert fetch(space, outputs[0], "bob") == 404
    assert fetch(space, outputs[0], None) == 404
    missing = outputs[0].with_name("99999-1.png")
    assert fetch(space, missing, "bob") == 404, "the same answer whether or not the file exists"


def test_signed_out_visitors_generate_with_catalog_models_only(space):
    from gradio_client.exceptions import AppError

    visitor = client(space, None)
    images = visitor.predict("1girl, solo", steps=1, width=256, height=256, api_name="/generate")
    assert len(images) == 1
    with pytest.raises(AppError, match="Sign in with Hugging Face"):
        visitor.predict("chars", tagger="demo-tagger", api_name="/caption")
    with pytest.raises(AppError, match="Sign in with Hugging Face"):
        visitor.predict("chars", preset="demo-sdxl", max_train_steps=1, api_name="/train")
    with pytest.raises(AppError, match="catalog models"):
        visitor.predict("1girl", lora_1="x.safetensors", steps=1, width=256, height=256, api_name="/generate")
    with pytest.raises(AppError, match="catalog models"):
        visitor.predict("1girl", model="someone/private-model", steps=1, width=256, height=256, api_name="/generate")
    with pytest.raises(AppError, match="Sign in with Hugging Face"):
        visitor.predict(api_name="/unload_models")
    assert not (space.workspace / "ws" / "visitors" / "datasets").exists()


# -- the page, in a real browser -------------------------------------------------------------------
def open_page(browser, server, user: str | None):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    if user:
        name, value = session_cookie(user).split("=", 1)
        context.add_cookies([{"name": name, "value": value, "url": server.url}])
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_selector("#gen-button" if user is None else "#cap-dataset", state="attached", timeout=30_000)
    return page


def dataset_options(page) -> list[str]:
    page.wait_for_timeout(1500)  # the page-load event fills the lists for whoever opened the page
    page.locator("#cap-dataset input").click()
    options = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    return options


@pytest.mark.browser
def test_login_button_and_each_users_own_datasets_in_the_page(space, browser, tmp_path):
    make_dataset(space.workspace / "ws" / "users" / "carol" / "datasets" / "carol-set")
    visitor = open_page(browser, space, None)
    assert visitor.get_by_role("button", name="Sign in with Hugging Face").is_visible()
    visitor.get_by_role("tab", name="Caption").wait_for(state="detached", timeout=15_000)  # the Generate tab only
    assert visitor.get_by_role("tab", name="Train").count() == 0
    assert visitor.locator("#gen-button").is_visible()
    visitor.wait_for_timeout(1000)
    assert visitor.locator(".toast-body").count() == 0, "nothing a visitor did was refused"
    visitor.screenshot(path=str(tmp_path / "visitor.png"), full_page=True)

    carol = open_page(browser, space, "carol")
    carol.get_by_role("button", name="Logout (carol)").wait_for(timeout=15_000)
    assert "carol-set" in dataset_options(carol)
    carol.screenshot(path=str(tmp_path / "carol.png"), full_page=True)
    dave = open_page(browser, space, "dave")
    assert "carol-set" not in dataset_options(dave)


@pytest.mark.browser
def test_the_page_warns_when_the_workspace_is_wiped_at_restart(space, browser):
    from studio.settings import filesystem_of
    from tests.app_server import ROOT

    if filesystem_of(space.workspace) != filesystem_of(ROOT):
        pytest.skip("the test workspace is on another filesystem than the app here, as a storage volume would be")
    page = open_page(browser, space, None)
    banner = page.locator("#ephemeral-banner")
    assert banner.is_visible() and "wiped at every restart" in banner.inner_text()
