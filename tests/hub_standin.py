"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for driving huggingface_hub's own
client in tests (the real Hub is unreachable here). A real HTTP server in a thread; it implements
exactly the endpoints that huggingface_hub 2.x calls to publish a model repository:

- GET  /api/whoami-v2                                  who the bearer token belongs to
- POST /api/repos/create                               409 when it exists, 403 outside your namespaces
- GET  /api/models/OWNER/NAME[/revision/REV]           repo_info / model_info (private repos need the owner)
- POST /api/validate-yaml                              the README's metadata (create_commit checks it first)
- POST /api/models/OWNER/NAME/preupload/REV            "lfs" for binary files, "regular" for text
- POST /OWNER/NAME.git/info/lfs/objects/batch          git-LFS batch API, "basic" transfer: a PUT URL and
- PUT  /_lfs/OID, POST /_lfs/verify                    a verify URL (an object already stored needs neither)
- POST /api/models/OWNER/NAME/commit/REV               the NDJSON commit, applied all at once or not at all
- HEAD/GET /OWNER/NAME/resolve/REV/PATH                downloads (hf_hub_download, ModelCard.load)

Uploaded LFS objects sit in a store of their own, as on the real Hub: a repository shows them only
once a commit names them. Xet storage is not emulated: tests turn it off (HF_HUB_DISABLE_XET), so the
client takes the LFS path. `fail_next["commit"] = N` makes the next N commits answer 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".png", ".jpg", ".jpeg", ".webp", ".bin", ".gz", ".zip")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:  # what the preupload endpoint reports, as huggingface_hub compares it
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_hash(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"]


class HubStandIn:
    """`with HubStandIn({"token": ("user", ["org"])}) as hub:` ... `hub.url`, `hub.repos`, `hub.calls`."""

    def __init__(self, users: dict[str, tuple[str, list[str]]]):
        self.users = users
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unexpected: list[tuple[str, str]] = []
        self.fail_next: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, repo_id: str) -> set[str]:
        return set(self.repos[repo_id].files)

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.calls if m == method and re.search(pattern, p))

    # -- the API ------------------------------------------------------------------------------------
    def user_of(self, headers) -> tuple[str, list[str]] | None:
        auth = headers.get("authorization") or ""
        return self.users.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def may_write(self, user, repo_id: str) -> bool:
        return user is not None and repo_id.split("/")[0] in (user[0], *user[1])

    def visible(self, user, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        return repo if repo and (not repo.private or self.may_write(user, repo_id)) else None

    def whoami(self, user, body):
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}
        return 200, {"type": "user", "name": user[0], "fullname": user[0], "avatarUrl": "",
                     "orgs": [{"name": org, "type": "org"} for org in user[1]],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}

    def create_repo(self, user, body):
        repo_id = f"{body.get('organization') or (user or ('',))[0]}/{body['name']}"
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if not self.may_write(user, repo_id):
            return 403, {"error": f"You don't have the rights to create a model under the namespace {repo_id}"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        repo = Repo(repo_id, body.get("visibility", "public") == "private" or body.get("private") is True)
        self._commit(repo, "initial commit", {".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)}, [])
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, user, repo_id):
        repo = self.visible(user, repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 200, {"id": repo_id, "modelId": repo_id, "private": repo.private, "sha": repo.sha,
                     "siblings": [{"rfilename": path} for path in sorted(repo.files)], "tags": []}

    def validate_yaml(self, user, body):
        text = body.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
        errors = []
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            meta, errors = None, [{"message": f"YAML does not parse: {exc}"}]
        if not errors and not isinstance(meta, dict):
            errors = [{"message": "empty or missing yaml metadata in repo card"}]
        elif not errors:
            errors = [{"message": m} for m in card_metadata_errors(meta)]
        return (400 if errors else 200), {"errors": errors, "warnings": []}

    def preupload(self, user, repo_id, body):
        repo = self.visible(user, repo_id)
        if repo is None or not self.may_write(user, repo_id):
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = []
        for item in body["files"]:
            lfs = item["path"].lower().endswith(LFS_SUFFIXES) or item["size"] > 10 * 1024 * 1024
            stored = repo.files.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": stored.oid if stored and stored.lfs == lfs else None})
        return 200, {"files": files, "commitOid": repo.sha}

    def lfs_batch(self, user, repo_id, body):
        if not self.may_write(user, repo_id) or repo_id not in self.repos:
            return 403, {"message": "write access required"}
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/_lfs/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid, data: bytes):
        if hashlib.sha256(data).hexdigest() != oid:
            return 400, {"error": "content does not match its oid"}
        self.lfs[oid] = data
        return 200, {}

    def lfs_verify(self, user, body):
        ok = body.get("oid") in self.lfs and len(self.lfs[body["oid"]]) == body.get("size")
        return (200, {}) if ok else (404, {"error": "object not found"})

    def commit(self, user, repo_id, raw: bytes):
        repo = self.visible(user, repo_id)
        if repo is None or not self.may_write(user, repo_id):
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if self.fail_next.get("commit", 0) > 0:
            self.fail_next["commit"] -= 1
            return 500, {"error": "Internal Error (stand-in: failing this commit on purpose)"}
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "the first line must be the header"}
        added, deleted = {}, []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                added[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif line["key"] == "lfsFile":
                data = self.lfs.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    return 400, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"}
                added[value["path"]] = StoredFile(data, lfs=True)
            elif line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return 400, {"error": f"unknown key {line['key']}"}
        oid = self._commit(repo, lines[0]["value"]["summary"], added, deleted)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _commit(self, repo: Repo, summary: str, added: dict, deleted: list) -> str:
        for path in deleted:
            repo.files = {p: f for p, f in repo.files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        repo.files.update(added)
        oid = hashlib.sha1(f"{repo.repo_id}{len(repo.commits)}{summary}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "summary": summary, "files": sorted(added)})
        return oid

    def resolve(self, user, repo_id, path):
        repo = self.visible(user, repo_id)
        stored = repo.files.get(path) if repo else None
        if stored is None:
            return 404, b"", {"X-Error-Code": "EntryNotFound" if repo else "RepoNotFound"}
        return 200, stored.data, {"X-Repo-Commit": repo.sha, "ETag": f'"{stored.oid}"',
                                  "Content-Type": "application/octet-stream"}


def card_metadata_errors(meta: dict) -> list[str]:
    """What the Hub's metadata validation would refuse in a model card (the checks that matter here)."""
    errors = []
    base = meta.get("base_model")
    if base is not None and not all(isinstance(b, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", b)
                                    for b in (base if isinstance(base, list) else [base])):
        errors.append(f'"base_model" must be a Hub model id, got {base!r}')
    if meta.get("license") == "other" and not meta.get("license_name"):
        errors.append('"license_name" is required when "license" is "other"')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    for widget in meta.get("widget") or []:
        if not isinstance(widget, dict) or not isinstance(widget.get("text"), str):
            errors.append('each "widget" entry needs a "text"')
    return errors


ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}(/revision/[^/]+)?", "repo_info"),
    ("POST", rf"/api/models/{REPO}/preupload/[^/]+", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/[^/]+", "commit"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("POST", r"/_lfs/verify", "lfs_verify"),
    ("GET", rf"/{REPO}/resolve/[^/]+/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/[^/]+/(?P<path>.+)", "resolve"),
]


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _send(self, status: int, payload, headers: dict | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            kind = "application/json" if not isinstance(payload, bytes) else "application/octet-stream"
            for key, value in {"Content-Type": kind, **(headers or {})}.items():
                self.send_header(key, value)
            if status >= 400 and isinstance(payload, dict) and "error" in payload:
                self.send_header("X-Error-Message", str(payload["error"]))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path)
            raw = self._body() if self.command in ("POST", "PUT") else b""
            with hub.lock:
                hub.calls.append((self.command, path))
                for method, pattern, name in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if method == self.command and match:
                        answer = self._call(name, match.groupdict(), raw)
                        break
                else:
                    hub.unexpected.append((self.command, path))
                    answer = (404, {"error": f"the stand-in has no {self.command} {path}"})
            self._send(*answer)

        def _call(self, name: str, groups: dict, raw: bytes):
            user = hub.user_of(self.headers)
            if name == "lfs_put":
                return hub.lfs_put(groups["oid"], raw)
            if name == "commit":
                return hub.commit(user, groups["repo"], raw)
            if name == "resolve":
                return hub.resolve(user, groups["repo"], groups["path"])
            if name == "repo_info":
                return hub.repo_info(user, groups["repo"])
            body = json.loads(raw or b"{}")
            if "repo" in groups:
                return getattr(hub, name)(user, groups["repo"], body)
            return getattr(hub, name)(user, body)

        do_GET = do_POST = do_PUT = do_HEAD = _route

    return Handler
