"""A real HTTP server that serves task images the way Label Studio does, for unit tests.

It checks the ``Authorization`` header like Label Studio: a legacy ``Token …`` or a ``Bearer``
access token obtained from ``POST /api/token/refresh/`` with a Personal Access Token (a JWT).
The end-to-end tests run the real Label Studio; this one makes the fault cases cheap.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def make_jwt(payload: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


class FakeLabelStudio:
    def __init__(self, legacy_token: str = "legacy-token-123", legacy_enabled: bool = True):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.legacy_token = legacy_token
        self.legacy_enabled = legacy_enabled
        self.pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600, "jti": "pat"})
        self.refreshes = 0
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.access_tokens: set[str] = set()
        self.delay = 0.0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                header = self.headers.get("Authorization")
                if header == f"Token {fake.legacy_token}":
                    return fake.legacy_enabled
                return header is not None and header.removeprefix("Bearer ") in fake.access_tokens

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/token/refresh/" and body.get("refresh") == fake.pat:
                    fake.refreshes += 1
                    access = make_jwt(
                        {"token_type": "access", "exp": time.time() + 300, "n": fake.refreshes}
                    )
                    fake.access_tokens.add(access)
                    self._send(200, json.dumps({"access": access}).encode())
                else:
                    self._send(401, b'{"detail": "invalid token"}')

            def do_GET(self) -> None:
                fake.requests.append((self.path, self.headers.get("Authorization")))
                if fake.delay:
                    time.sleep(fake.delay)
                if self.path.startswith("/external/"):  # a foreign host needs no LS token
                    entry = fake.files.get(self.path)
                elif not self._authorised():
                    self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    return
                else:
                    entry = fake.files.get(self.path)
                if entry is None:
                    self._send(404, b'{"detail": "Not found."}')
                    return
                self._send(200, entry[0], entry[1])

        return Handler
