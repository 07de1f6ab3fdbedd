"""A small stand-in for the Send API, served on loopback for end-to-end tests."""

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GraphStub:
    """Record every call and answer like the Send API.

    ``script[recipient]`` is a list of answers used one per call to that
    recipient, then success. An answer is a dict with any of: ``sleep``
    (seconds before answering), ``drop`` (close without answering),
    ``status``, ``json`` and ``headers``.
    """

    def __init__(self):
        self.calls = []
        self.script = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without this, Nagle's algorithm adds ~40 ms to every answer.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                recipient = str(body.get("recipient", {}).get("id"))
                with stub._lock:
                    steps = stub.script.get(recipient) or []
                    answer = steps.pop(0) if steps else {}
                    call = {
                        "t": time.time(),
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "body": body,
                        "status": None
                        if answer.get("drop")
                        else answer.get("status", 200),
                    }
                    stub.calls.append(call)
                    message_id = f"m_{next(stub._ids)}"
                time.sleep(answer.get("sleep", 0))
                if answer.get("drop"):
                    self.close_connection = True
                    return
                data = json.dumps(
                    answer.get(
                        "json", {"recipient_id": recipient, "message_id": message_id}
                    )
                ).encode()
                self.send_response(answer.get("status", 200))
                for name, value in answer.get("headers", {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting: a timeout, as intended

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def calls_to(self, recipient):
        with self._lock:
            return [
                c for c in self.calls if c["body"]["recipient"].get("id") == recipient
            ]

    def successes_to(self, recipient):
        """Calls to recipient that were answered with a message_id."""
        return [c for c in self.calls_to(recipient) if c["status"] == 200]
