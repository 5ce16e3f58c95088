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

    @field_validator("workspace")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def from_args(cls, args, environ: dict[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        auth = parse_auth(args.auth or environ.get(AUTH_ENV))
        return cls(
            workspace=args.workspace, host=args.host, port=args.port, share=args.share,
            auth=auth, demo=args.demo, vram=args.vram,
        )

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
        """The models cache: hub downloads and the demo models live here."""
        return self.workspace / "models"

    def ensure_workspace(self) -> None:
        for name in WORKSPACE_DIRS:
            (self.workspace / name).mkdir(parents=True, exist_ok=True)

    def security_warnings(self) -> list[str]:
        """What an operator must hear before the app is reachable by others."""
        if self.auth:
            return []
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
