"""A local OpenAI-compatible /v1/chat/completions server for captioning tests."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "An illustration of Hakurei Reimu from Touhou, standing at a shrine. She smiles."


class FakeServer:
    """/v1/chat/completions on 127.0.0.1: records requests, can fail, stall or cut answers short."""

    def __init__(self):
        self.requests: list[dict] = []
        self.statuses: list[int] = []  # statuses to answer before succeeding (500, 429, ...)
        self.delay = 0.0
        self.answer = ANSWER
        self.finish_reason = "stop"
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    status = server.statuses.pop(0) if server.statuses else 200
                try:
                    time.sleep(server.delay)
                    if self.path != "/v1/chat/completions":
                        status = 404
                    if status != 200:
                        return self._send(
                            status, {"error": {"message": f"status {status}"}}, {"Retry-After": "0"}
                        )
                    message = {"role": "assistant", "content": server.answer}
                    self._send(
                        200, {"choices": [{"message": message, "finish_reason": server.finish_reason}]}
                    )
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
