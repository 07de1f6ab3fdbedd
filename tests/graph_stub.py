"""A small stand-in for the Send API, served on loopback for end-to-end tests."""

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GraphStub:
    """Record every call; answer success, or an error for chosen recipients."""

    def __init__(self):
        self.calls = []
        self.errors = {}  # recipient id -> (HTTP status, body)
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
                    stub.calls.append(
                        {
                            "path": self.path,
                            "authorization": self.headers.get("Authorization"),
                            "body": body,
                        }
                    )
                    status, answer = stub.errors.get(recipient) or (
                        200,
                        {
                            "recipient_id": recipient,
                            "message_id": f"m_{next(stub._ids)}",
                        },
                    )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

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
