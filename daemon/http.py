"""The HTTP side: a route table over a stdlib ThreadingHTTPServer that cannot be exhausted.

Routes map (method, path) to ``handler(Request) -> Response``; a per-method fallback takes the paths no
route names (DISTL's server ignored the path, so the legacy queries are such a fallback).

Why it never hangs:
* every connection has a socket timeout, and a deadline for reading a whole request (request line,
  headers, body): a client that connects and sends nothing, or trickles bytes, is cut off;
* at most ``max_connections`` connections have a handler thread; one over the cap gets a 503 at once
  from the accepting thread and is closed;
* request line and body sizes are limited (414, 413), and a handler's exception becomes a 500 reply,
  never a traceback to the client.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("spotfinder.http")

MAX_URL_BYTES = 8 * 1024
MAX_BODY_BYTES = 1 << 20
LISTEN_BACKLOG = 128
REAP_EVERY_S = 0.25
REFUSED_LINGER_S = 2.0
BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 33\r\n\r\n"
              b"too many connections; retry later")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str
    query_string: str = ""

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
    then: Callable[[], None] | None = None  # run once the reply has been written (e.g. stop the service)


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, (json.dumps(data, indent=1) + "\n").encode(), "application/json")


def error_response(status: int, text: str) -> Response:
    return json_response({"error": text}, status)


Handler = Callable[[Request], Response]


class _RequestHandler(BaseHTTPRequestHandler):
    server_version = "spotfinder"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.timeout_s
        super().setup()

    def handle_one_request(self) -> None:
        self.server.deadlines.arm(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.connection)

    def _serve(self) -> None:
        self.route_name = "unmatched"
        if len(self.path) > MAX_URL_BYTES:
            self._reply(error_response(414, "URL longer than %d bytes" % MAX_URL_BYTES))
            return
        body = self._read_body()
        if body is None:
            return
        self.server.deadlines.disarm(self.connection)  # the request is in; what follows is our own time
        url = urlsplit(self.path)
        request = Request(self.command, url.path, parse_qs(url.query, keep_blank_values=True),
                          {k.lower(): v for k, v in self.headers.items()}, body, self.client_address[0], url.query)
        with self.server.serving():
            self._reply(self._answer(request))

    def _answer(self, request: Request) -> Response:
        handler, self.route_name = self.server.find(self.command, request.path)
        if handler is None:
            allowed = self.server.knows(request.path)
            return error_response(405 if allowed else 404,
                                  "method not allowed" if allowed else "no such resource: %s" % request.path)
        try:
            return handler(request)
        except Exception:
            log.exception("handler for %s %s failed", self.command, request.path)
            return error_response(500, "internal error")

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering why it is refused."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(error_response(411, "send a Content-Length, not a chunked body"), close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._reply(error_response(400, "bad Content-Length"), close=True)
            return None
        if length > MAX_BODY_BYTES:
            self._reply(error_response(413, "request body larger than %d bytes" % MAX_BODY_BYTES), close=True)
            return None
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # timed out or cut off mid-body: nobody is left to answer
            self.close_connection = True
            return None
        return body

    def _reply(self, response: Response, close: bool = False) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()
        self.server.observe(getattr(self, "route_name", "unmatched"), response.status)
        if response.then is not None:
            response.then()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the stdlib (bad request line, too long, bad headers): short text, counted."""
        self.close_connection = True
        self.route_name = "malformed"
        if self.request_version == "HTTP/0.9":  # the default of an unparsable line: answer with a status line
            self.request_version = "HTTP/1.0"
        self._reply(Response(code, (message or self.responses.get(code, ("error",))[0]).encode()), close=True)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class _Deadlines:
    """Cuts off connections that take longer than ``limit_s`` to deliver a request, and closes refused ones
    a little later (one reaper thread)."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}
        self._closing: list[tuple[float, socket.socket]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reap, name="http-deadlines", daemon=True)

    def arm(self, conn: socket.socket) -> None:
        with self._lock:
            self._due[conn] = time.monotonic() + self.limit_s

    def disarm(self, conn: socket.socket) -> None:
        with self._lock:
            self._due.pop(conn, None)

    def close_later(self, conn: socket.socket) -> None:
        """Close a refused connection after ``REFUSED_LINGER_S``: closing at once, with its request unread,
        would reset the connection and could destroy the 503 before the client read it."""
        with self._lock:
            self._closing.append((time.monotonic() + REFUSED_LINGER_S, conn))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _reap(self) -> None:
        while not self._stop.wait(REAP_EVERY_S):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, due in self._due.items() if due < now]
                for conn in late:
                    del self._due[conn]
                done = [conn for due, conn in self._closing if due < now]
                self._closing = [(due, conn) for due, conn in self._closing if due >= now]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # the handler's read returns at once and it closes
                except OSError:
                    pass
            for conn in done:
                conn.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, timeout_s: float, max_connections: int):
        self.timeout_s = timeout_s
        self.routes: dict[tuple[str, str], Handler] = {}
        self.fallbacks: dict[str, tuple[Handler, str]] = {}
        self.observe: Callable[[str, int], None] = lambda route, status: None
        self.deadlines = _Deadlines(timeout_s)
        self.max_connections = max_connections
        self.connections = 0  # connections with a handler thread
        self.busy = 0  # of which answering a request (not reading one, not idle between requests)
        self.counts = threading.Condition()
        super().__init__(address, _RequestHandler)

    def find(self, method: str, path: str) -> tuple[Handler | None, str]:
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler, path
        return self.fallbacks.get(method, (None, "unmatched"))

    def knows(self, path: str) -> bool:
        return any(known == path for _, known in self.routes)

    @contextlib.contextmanager
    def serving(self):
        with self.counts:
            self.busy += 1
        try:
            yield
        finally:
            with self.counts:
                self.busy -= 1
                self.counts.notify_all()

    def process_request(self, request, client_address) -> None:
        with self.counts:
            full = self.connections >= self.max_connections
            if not full:
                self.connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread could be started: give the slot back, drop the connection
            self._release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self.counts:
            self.connections -= 1
            self.counts.notify_all()

    def _refuse(self, conn: socket.socket) -> None:
        """Over the cap: 503 straight from the accepting thread, without waiting for the request."""
        self.observe("rejected", 503)
        try:
            conn.setblocking(False)
            conn.send(BUSY_REPLY)  # a fresh socket's send buffer takes it whole
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        self.deadlines.close_later(conn)

    def handle_error(self, request, client_address) -> None:
        """A connection that broke (reset, timeout): one debug line instead of a traceback on stderr."""
        log.debug("connection from %s ended badly", client_address[0], exc_info=True)


class HttpServer:
    def __init__(self, *, host: str, port: int, timeout_s: float = 10.0, max_connections: int = 128):
        self.server = _Server((host, port), timeout_s, max_connections)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.server.routes[(method.upper(), path)] = handler

    def fallback(self, method: str, name: str, handler: Handler) -> None:
        """``handler`` answers the ``method`` requests no route names; ``name`` labels them in metrics."""
        self.server.fallbacks[method.upper()] = (handler, name)

    def observe(self, callback: Callable[[str, int], None]) -> None:
        """``callback(route, status)`` after every reply (metrics)."""
        self.server.observe = callback

    def start(self) -> None:
        self.server.deadlines.start()
        self.thread.start()

    def stop_listening(self) -> None:
        """Accept no more connections; the ones already open are still served."""
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, and give the connections still being served ``timeout`` seconds to finish."""
        self.stop_listening()
        end = time.monotonic() + timeout
        with self.server.counts:
            while self.server.busy and time.monotonic() < end:
                self.server.counts.wait(max(0.0, end - time.monotonic()))
        self.server.deadlines.stop()
