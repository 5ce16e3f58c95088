"""Users of a public Space: "Sign in with Hugging Face" (Gradio's OAuth, `hf_oauth: true`) gives
each signed-in user a workspace of their own; signed-out visitors may generate with the catalog
models and do nothing else. Locally and behind --auth none of this is used.

Three pieces, all keyed on the signed-in user that Gradio's OAuth keeps in the session cookie:
- `RequestContext`: what the tabs receive as `ctx`; every attribute is that of the AppContext of
  whoever sent the request being handled (Gradio's request context variable; jobs started by a
  handler keep it, see studio.jobs).
- `guard_visitors`: wraps every event handler that is not for visitors so that it refuses them.
- `WorkspaceFileGuard`: Gradio's file route serves from the workspace only the folders the page
  shows, and on a multi-user Space only those of the signed-in user's own folder. (Images shown
  in the page are copies in Gradio's cache, under a hash of their content, so it needs no more.)
  It is used locally too, without the per-user part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import USERS_DIR, AppContext
from studio.fileio import inside

SIGN_IN = "Sign in with Hugging Face (top of the page) to caption and train: each signed-in user gets a " \
          "workspace of their own. Signed out, you can generate with the catalog models."
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=")


def oauth_info(request: Any) -> dict | None:
    """The signed-in user's OAuth info from the request's session, or None (signed out/expired)."""
    if request is None:
        return None
    if isinstance(request, dict):  # an ASGI scope
        session = request.get("session") or {}
    else:  # a gr.Request, or the Starlette request inside it
        underlying = getattr(request, "request", None) or request
        scope = getattr(underlying, "scope", None)
        session = scope.get("session", {}) if isinstance(scope, dict) else getattr(underlying, "session", None) or {}
    info = session.get("oauth_info") if hasattr(session, "get") else None
    if not isinstance(info, dict) or not isinstance(info.get("userinfo"), dict):
        return None
    expires_at = info.get("expires_at")
    if isinstance(expires_at, int | float) and expires_at < time.time():
        return None
    return info


def signed_in_user(request: Any) -> str | None:
    info = oauth_info(request)
    name = info["userinfo"].get("preferred_username") if info else None
    return name if isinstance(name, str) and name else None


def hub_token(request: Any) -> str | None:
    """The signed-in user's OAuth access token (scopes in the README front matter), kept for
    publishing to the Hub on their behalf."""
    info = oauth_info(request)
    token = info.get("access_token") if info else None
    return token if isinstance(token, str) else None


def current_request():
    from gradio.context import LocalContext

    return LocalContext.request.get(None)


class RequestContext:
    """The AppContext of whoever sent the request being handled (see the module docstring)."""

    def __init__(self, root: AppContext):
        self._root = root

    def resolve(self) -> AppContext:
        return self._root.for_user(signed_in_user(current_request()))

    def __getattr__(self, name: str):
        return getattr(self.resolve(), name)


def guard_visitors(app: gr.Blocks, ctx: RequestContext, allowed: Iterable[Any]) -> None:
    """Make every event handler except those in `allowed` (BlockFunction objects) refuse visitors."""
    allowed = set(map(id, allowed))
    for block_fn in app.fns.values():
        own = isinstance(getattr(block_fn.fn, "__self__", None), gr.LoginButton)  # its login-state check
        if id(block_fn) not in allowed and block_fn.fn is not None and not own:
            block_fn.fn = _signed_in_only(block_fn.fn, ctx, block_fn.api_name or block_fn.name)


def _signed_in_only(fn: Callable, ctx: RequestContext, name: str) -> Callable:
    import functools
    import inspect

    def refuse():
        if ctx.resolve().is_visitor:
            print(f"refused {name} to a signed-out visitor", flush=True)
            raise gr.Error(SIGN_IN)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            refuse()
            yield from fn(*args, **kwargs)

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        refuse()
        return fn(*args, **kwargs)

    return wrapper


SERVED_DIRS = ("datasets", "outputs", "loras", "runs")  # what the page shows or offers to download


class WorkspaceFileGuard:
    """ASGI middleware (inside Gradio's session middleware, where there is one): the file route
    serves from the workspace only what the page needs, the folders SERVED_DIRS without hidden
    files (undo logs, caches, presets and models stay private); on a multi-user Space only those
    of the signed-in user's own folder. Anything else is 404, whether or not it exists."""

    def __init__(self, app, workspace: Path, per_user: bool = False):
        self.app = app
        self.workspace = Path(workspace).resolve()
        self.per_user = per_user
        from gradio.utils import get_upload_folder

        self.gradio_cache = Path(get_upload_folder()).resolve()  # may lie inside the workspace

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and not self._allowed(scope):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"File not found."})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        path = scope.get("path", "")
        route = next((r for r in FILE_ROUTES if r in path), None)
        if route is None:
            return True
        wanted = path.split(route, 1)[1]  # the ASGI path is decoded once already, as Gradio's route reads it
        target = Path(wanted).expanduser()
        if not target.is_absolute():
            target = Path.cwd() / target
        if not inside(target, self.workspace) or inside(target, self.gradio_cache):
            return True  # Gradio's own checks decide (its cache, uploads, static files)
        root = self.workspace
        if self.per_user:
            user = signed_in_user(scope) if "session" in scope else None
            if user is None:
                return False
            root = root / USERS_DIR / user
        try:
            parts = target.resolve().relative_to(root.resolve()).parts
        except ValueError:
            return False
        return len(parts) > 1 and parts[0] in SERVED_DIRS and not any(p.startswith(".") for p in parts)
