"""App settings: where the workspace is, how the server listens, how VRAM is used.

Built once from the command line (and the environment) by app.py; every other module receives
the Settings object rather than reading globals or environment variables itself.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.errors import ConfigError

AUTH_ENV = "STUDIO_AUTH"  # "user:password"; a Space sets it as a secret
NL_SERVERS_ENV = "STUDIO_NL_SERVERS"
# Every command-line flag has an environment variable (a Space's settings); a flag wins.
# --host and --port use Gradio's own variables, which Hugging Face Spaces sets.
FLAG_ENV = {
    "host": "GRADIO_SERVER_NAME",
    "port": "GRADIO_SERVER_PORT",
    "share": "STUDIO_SHARE",
    "auth": AUTH_ENV,
    "demo": "STUDIO_DEMO",
    "workspace": "STUDIO_WORKSPACE",
    "vram": "STUDIO_VRAM",
    "model_dir": "STUDIO_MODEL_DIRS",  # several, separated by os.pathsep (":")
}
DEFAULTS = {"host": "127.0.0.1", "port": "7860", "share": "", "auth": "", "demo": "", "workspace": "workspace",
            "vram": "auto"}
SPACE_DEFAULTS = {"host": "0.0.0.0"}  # Spaces routes its traffic to port 7860 on every interface
VramChoice = Literal["auto", "high", "normal", "low", "cpu"]
WORKSPACE_DIRS = ("datasets", "outputs", "loras", "runs", "models")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`USER:PASS` -> (user, password); None or "" -> None."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must look like USER:PASSWORD (both parts non-empty)")
    return user, password


def env_flag(value: str | bool | None) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    normal = value.strip().lower()
    if normal in ("1", "true", "yes", "on"):
        return True
    if normal in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{value!r} is not a yes/no value: use 1/0, true/false, yes/no or on/off")


def filesystem_of(path: Path) -> int:
    """The device id of the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.stat().st_dev


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workspace: Path = Path("workspace")
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    share: bool = False
    auth: tuple[str, str] | None = None
    demo: bool = False
    vram: VramChoice = "auto"
    # Hugging Face Spaces (read from the variables Spaces sets; None/False elsewhere)
    space_id: str | None = None  # "owner/name"
    zero_gpu: bool = False  # SPACES_ZERO_GPU: GPU work runs in `spaces.GPU` calls
    oauth: bool = False  # the Space has `hf_oauth: true` (Sign in with Hugging Face)
    # OpenAI-compatible caption servers (base URLs) that requests may use when strangers can reach
    # the app (a Space, --share, a public --host): STUDIO_NL_SERVERS, comma separated
    nl_servers: tuple[str, ...] = ()
    # Folders outside the workspace that models, VAEs and LoRAs may be read from (--model-dir)
    model_dirs: tuple[Path, ...] = ()
    # A user's own workspace keeps the app's models cache (downloads are shared, never per user)
    models_root: Path | None = None

    @field_validator("workspace")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def from_args(cls, args, environ: dict[str, str] | None = None) -> Settings:
        """Each value from its flag, else its environment variable (FLAG_ENV), else the default
        (in a Space: listen on every interface, as Spaces expects)."""
        environ = os.environ if environ is None else environ
        space_id = environ.get("SPACE_ID") or None
        defaults = {**DEFAULTS, **(SPACE_DEFAULTS if space_id else {})}

        def value(name: str):
            flag = getattr(args, name, None)
            if flag is not None and flag is not False:
                return flag
            return environ.get(FLAG_ENV[name]) or defaults[name]

        port = value("port")
        try:
            port = int(port)
        except ValueError:
            raise ConfigError(f"port {port!r} ({FLAG_ENV['port']}) is not a number") from None
        vram = value("vram")
        if vram not in VramChoice.__args__:
            raise ConfigError(f"{FLAG_ENV['vram']}={vram!r}: use one of {', '.join(VramChoice.__args__)}")
        return cls(
            workspace=Path(value("workspace")), host=value("host"), port=port,
            share=env_flag(value("share")), auth=parse_auth(value("auth")), demo=env_flag(value("demo")),
            vram=vram, space_id=space_id, zero_gpu=env_flag(environ.get("SPACES_ZERO_GPU")),
            oauth=bool(space_id and environ.get("SYSTEM") == "spaces" and environ.get("OAUTH_CLIENT_ID")),
            model_dirs=tuple(Path(d).expanduser().resolve() for d in (getattr(args, "model_dir", None) or [])
                             or [d for d in environ.get(FLAG_ENV["model_dir"], "").split(os.pathsep) if d]),
            nl_servers=tuple(u.strip().rstrip("/") for u in environ.get(NL_SERVERS_ENV, "").split(",") if u.strip()),
        )

    @property
    def reachable_by_strangers(self) -> bool:
        """A Space, a share link or a non-local address: requests may come from anyone."""
        return bool(self.space_id) or self.share or not is_loopback(self.host)

    def check_nl_server(self, url: str) -> None:
        """Where strangers can reach the app, an NL caption server must be one the owner listed:
        otherwise any visitor could make this server send requests to any address."""
        if not self.reachable_by_strangers:
            return
        if url.rstrip("/") not in self.nl_servers:
            listed = ", ".join(self.nl_servers) or "none are listed"
            raise ConfigError(f"NL caption server {url!r} is not one this app's owner allows ({listed}); the owner "
                              f"lists them in {NL_SERVERS_ENV}")

    @property
    def multi_user(self) -> bool:
        """A public Space with "Sign in with Hugging Face": each signed-in user gets a workspace of
        their own. Behind a password (--auth) everyone who logs in shares one, as locally."""
        return self.oauth and self.auth is None

    @property
    def default_model(self) -> str:
        return "demo-sdxl" if self.demo else "animagine-xl-3.1"

    @property
    def datasets_dir(self) -> Path:
        return self.workspace / "datasets"

    @property
    def outputs_dir(self) -> Path:
        return self.workspace / "outputs"

    @property
    def loras_dir(self) -> Path:
        return self.workspace / "loras"

    @property
    def runs_dir(self) -> Path:
        return self.workspace / "runs"

    @property
    def models_dir(self) -> Path:
        """The models cache: the demo models and models placed by hand live here (hub downloads
        go to the standard Hugging Face cache, HF_HOME)."""
        return self.models_root or self.workspace / "models"

    def for_user(self, folder: Path) -> Settings:
        """These settings with `folder` as the workspace (datasets, outputs, LoRAs, runs, presets)
        and this app's models cache."""
        return self.model_copy(update={"workspace": folder, "models_root": self.models_dir})

    def ensure_workspace(self) -> None:
        for name in WORKSPACE_DIRS:
            if name != "models" or self.models_root is None:
                (self.workspace / name).mkdir(parents=True, exist_ok=True)

    def workspace_is_ephemeral(self, app_dir: Path) -> bool:
        """In a Space, whether the workspace is on the Space's own disk (lost at every restart):
        the same filesystem as the app's folder, i.e. no storage volume is mounted there."""
        if not self.space_id:
            return False
        return filesystem_of(self.workspace) == filesystem_of(app_dir)

    def security_warnings(self) -> list[str]:
        """What an operator must hear before the app is reachable by others."""
        if self.auth or self.multi_user:
            return []
        if self.space_id:
            return [f"this Space ({self.space_id}) has no login: anyone who opens it shares one workspace and "
                    f"can use its GPU. Set the secret {AUTH_ENV}=USER:PASS, or add `hf_oauth: true` to the "
                    "README front matter so each visitor signs in with Hugging Face and gets a workspace of their own."]
        warnings = []
        if self.share:
            warnings.append(
                "--share publishes this app on a public gradio.live link WITHOUT a password: "
                "anyone with the link can use your GPU and read your workspace. Add --auth USER:PASS "
                f"(or set {AUTH_ENV})."
            )
        if not is_loopback(self.host):
            warnings.append(
                f"--host {self.host} makes the app reachable from other machines WITHOUT a password. "
                f"Add --auth USER:PASS (or set {AUTH_ENV})."
            )
        return warnings
