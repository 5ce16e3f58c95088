"""App settings: command line, auth from the environment, security warnings, workspace layout."""

from pathlib import Path

import pytest

import app
from studio.errors import ConfigError
from studio.settings import AUTH_ENV, Settings, parse_auth


def settings_for(argv, environ=None):
    return Settings.from_args(app.parse_args(argv), environ or {})


def test_defaults_listen_locally_without_warnings(tmp_path):
    settings = settings_for(["--workspace", str(tmp_path)])
    assert settings.host == "127.0.0.1" and settings.port == 7860 and settings.vram == "auto"
    assert settings.default_model == "animagine-xl-3.1"
    assert settings.security_warnings() == []


def test_demo_defaults_to_demo_models(tmp_path):
    assert settings_for(["--demo", "--workspace", str(tmp_path)]).default_model == "demo-sdxl"


@pytest.mark.parametrize("argv", [["--share"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5", "--share"]])
def test_exposed_without_auth_warns(argv, tmp_path):
    warnings = settings_for([*argv, "--workspace", str(tmp_path)]).security_warnings()
    assert warnings and all("--auth" in w for w in warnings)


def test_auth_from_flag_or_environment_silences_warnings(tmp_path):
    flag = settings_for(["--share", "--auth", "ann:s3cret", "--workspace", str(tmp_path)])
    env = settings_for(["--host", "0.0.0.0", "--workspace", str(tmp_path)], {AUTH_ENV: "bob:pw:with:colons"})
    assert flag.auth == ("ann", "s3cret") and flag.security_warnings() == []
    assert env.auth == ("bob", "pw:with:colons") and env.security_warnings() == []


@pytest.mark.parametrize("value", ["nocolon", ":pw", "user:"])
def test_bad_auth_is_a_config_error(value):
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        parse_auth(value)


def test_bad_auth_exits_2(tmp_path, capsys):
    assert app.main(["--auth", "broken", "--workspace", str(tmp_path)]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_workspace_layout(tmp_path):
    settings = settings_for(["--workspace", str(tmp_path / "ws")])
    settings.ensure_workspace()
    for name in ("datasets", "outputs", "loras", "runs", "models"):
        assert (tmp_path / "ws" / name).is_dir()
    assert settings.models_dir == (tmp_path / "ws" / "models").resolve()


def test_importing_the_app_and_ui_loads_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys, app, studio.ui.app, studio.ui.generate_tab, studio.__main__;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- environment variables and Hugging Face Spaces ---------------------------------------------------
def test_every_flag_has_an_environment_variable(tmp_path):
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "9000", "STUDIO_SHARE": "1", "STUDIO_AUTH": "a:b",
           "STUDIO_DEMO": "true", "STUDIO_WORKSPACE": str(tmp_path / "ws"), "STUDIO_VRAM": "low"}
    settings = settings_for([], env)
    assert (settings.host, settings.port, settings.share, settings.auth, settings.demo, settings.vram) == (
        "0.0.0.0", 9000, True, ("a", "b"), True, "low")
    assert settings.workspace == (tmp_path / "ws").resolve()


def test_flags_win_over_variables(tmp_path):
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "9000", "STUDIO_WORKSPACE": str(tmp_path / "env"),
           "STUDIO_VRAM": "low", "STUDIO_AUTH": "env:pw"}
    settings = settings_for(["--host", "127.0.0.1", "--port", "7000", "--workspace", str(tmp_path / "flag"),
                             "--vram", "cpu", "--auth", "flag:pw"], env)
    assert (settings.host, settings.port, settings.vram, settings.auth) == ("127.0.0.1", 7000, "cpu", ("flag", "pw"))
    assert settings.workspace == (tmp_path / "flag").resolve()


def test_a_space_listens_where_spaces_expects(tmp_path):
    space = settings_for(["--workspace", str(tmp_path)], {"SPACE_ID": "me/studio"})
    assert (space.host, space.port, space.space_id) == ("0.0.0.0", 7860, "me/studio")
    local = settings_for(["--workspace", str(tmp_path)], {})
    assert (local.host, local.space_id, local.zero_gpu, local.oauth) == ("127.0.0.1", None, False, False)


def test_zerogpu_and_oauth_come_from_the_space(tmp_path):
    env = {"SPACE_ID": "me/studio", "SYSTEM": "spaces", "SPACES_ZERO_GPU": "true", "OAUTH_CLIENT_ID": "abc"}
    settings = settings_for(["--workspace", str(tmp_path)], env)
    assert settings.zero_gpu and settings.oauth and settings.multi_user
    with_password = settings_for(["--workspace", str(tmp_path), "--auth", "team:pw"], env)
    assert with_password.oauth and not with_password.multi_user, "behind --auth everyone shares one workspace"
    assert not settings_for(["--workspace", str(tmp_path)], {"OAUTH_CLIENT_ID": "abc"}).oauth, "only in a Space"


@pytest.mark.parametrize(("env", "message"), [
    ({"STUDIO_VRAM": "huge"}, "STUDIO_VRAM='huge'"),
    ({"GRADIO_SERVER_PORT": "http"}, "GRADIO_SERVER_PORT"),
    ({"STUDIO_DEMO": "maybe"}, "not a yes/no value"),
])
def test_bad_variables_are_named(env, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        settings_for(["--workspace", str(tmp_path)], env)


def test_a_public_space_without_login_is_warned_about(tmp_path):
    open_space = settings_for(["--workspace", str(tmp_path)], {"SPACE_ID": "me/studio"})
    assert any("STUDIO_AUTH" in w and "hf_oauth" in w for w in open_space.security_warnings())
    signed_in = settings_for(["--workspace", str(tmp_path)],
                             {"SPACE_ID": "me/studio", "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "x"})
    assert signed_in.security_warnings() == []


def test_a_workspace_on_the_spaces_own_disk_is_ephemeral(tmp_path, monkeypatch):
    import studio.settings as settings_module

    app_dir, volume = tmp_path / "app", tmp_path / "data"
    space = settings_for(["--workspace", str(volume / "ws")], {"SPACE_ID": "me/studio"})
    assert space.workspace_is_ephemeral(app_dir), "same filesystem as the app: wiped at restart"
    monkeypatch.setattr(settings_module, "filesystem_of", lambda path: 2 if volume in Path(path).parents else 1)
    assert not space.workspace_is_ephemeral(app_dir), "a mounted storage volume keeps it"
    monkeypatch.undo()
    assert not settings_for(["--workspace", str(volume)], {}).workspace_is_ephemeral(app_dir), "only in a Space"


def test_nl_caption_servers_are_the_owners_choice_when_strangers_can_reach_the_app(tmp_path):
    local = settings_for(["--workspace", str(tmp_path)], {})
    local.check_nl_server("http://10.0.0.5:8000/v1")  # your own machine: your own servers
    env = {"SPACE_ID": "me/studio", "STUDIO_NL_SERVERS": "http://127.0.0.1:8000/v1/, https://llm.example/v1"}
    space = settings_for(["--workspace", str(tmp_path)], env)
    space.check_nl_server("http://127.0.0.1:8000/v1")
    for url in ("http://169.254.169.254/latest", "http://10.0.0.5:8000/v1"):
        with pytest.raises(ConfigError, match="not one this app's owner allows"):
            space.check_nl_server(url)
    with pytest.raises(ConfigError, match="none are listed"):
        settings_for(["--workspace", str(tmp_path), "--share"], {}).check_nl_server("http://x/v1")


def test_model_dirs_from_the_flag_or_the_variable(tmp_path):
    flag = settings_for(["--workspace", str(tmp_path), "--model-dir", str(tmp_path / "a"), "--model-dir", "/b"], {})
    assert flag.model_dirs == ((tmp_path / "a").resolve(), Path("/b"))
    env = settings_for(["--workspace", str(tmp_path)], {"STUDIO_MODEL_DIRS": f"/c:{tmp_path}/d"})
    assert env.model_dirs == (Path("/c"), (tmp_path / "d").resolve())
