"""App settings: command line, auth from the environment, security warnings, workspace layout."""

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
