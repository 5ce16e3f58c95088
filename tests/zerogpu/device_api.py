"""A stand-in for ZeroGPU's device API on 127.0.0.1, which the real `spaces` package talks to
(SPACES_ZERO_DEVICE_API_URL): `/schedule` grants a GPU at once, every other call succeeds. It
records each request, so a test can read what was reported and which durations were asked for."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class DeviceAPI:
    def __init__(self):
        self.requests: list[tuple[str, dict]] = []  # (path, query parameters)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                url = urlsplit(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((url.path, params))
                body = b""
                if url.path == "/schedule":
                    body = json.dumps({"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-stand-in",
                                       "allowToken": f"token-{len(api.requests)}"}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> DeviceAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def durations(self) -> list[int]:
        """The GPU seconds each /schedule asked for, in order."""
        return [int(params["durationSeconds"]) for path, params in self.requests if path == "/schedule"]
