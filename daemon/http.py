"""The HTTP side: a route table over a stdlib ThreadingHTTPServer.

Routes map (method, path) to ``handler(Request) -> Response``; the service registers ``/status`` and
``/results``, and later features (the legacy ``/spotfinder/distl.signal_strength`` queries, POST, a
``/metrics`` page) add theirs with :meth:`HttpServer.route` without touching the server.  Every
connection has a socket timeout so an idle client cannot pin a thread.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("spotfinder.http")

SOCKET_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 1 << 20


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of a query argument."""
        values = self.query.get(name)
        return values[-1] if values else default


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, (json.dumps(data, indent=1) + "\n").encode(), "application/json")


def error_response(status: int, text: str) -> Response:
    return json_response({"error": text}, status)


Handler = Callable[[Request], Response]


class _RequestHandler(BaseHTTPRequestHandler):
    server_version = "spotfinder"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(error_response(413, "request body too large"))
            return
        body = self.rfile.read(length) if length else b""
        request = Request(self.command, url.path, parse_qs(url.query, keep_blank_values=True),
                          {k.lower(): v for k, v in self.headers.items()}, body, self.client_address[0])
        routes = self.server.routes
        handler = routes.get((self.command, url.path))
        if handler is None:
            allowed = any(path == url.path for _, path in routes)
            self._reply(error_response(405 if allowed else 404,
                                       "method not allowed" if allowed else "no such resource: %s" % url.path))
            return
        try:
            response = handler(request)
        except Exception:
            log.exception("handler for %s %s failed", self.command, url.path)
            response = error_response(500, "internal error")
        self._reply(response)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def _reply(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class HttpServer:
    def __init__(self, host: str, port: int):
        self.server = ThreadingHTTPServer((host, port), _RequestHandler)
        self.server.daemon_threads = True
        self.server.routes = {}
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.server.routes[(method.upper(), path)] = handler

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
