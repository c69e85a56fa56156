"""A local alert webhook for tests: an HTTP server on 127.0.0.1 that records every JSON
POST (the alerts of the buffer manager, the audit and fixity repair).

Use: ``from helpers_webhook import webhook_fixture  # noqa: F401`` in a test module, then a
test's ``webhook`` argument is ``(url, received)``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(name="webhook")
def webhook_fixture():
    """(url, received): the webhook's URL and the list of alerts it received."""
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alert", _Hook.received
    server.shutdown()
    server.server_close()
