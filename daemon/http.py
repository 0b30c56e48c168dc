"""The HTTP side: a route table over a stdlib ThreadingHTTPServer that cannot be exhausted.

Routes map (method, path) to ``handler(Request) -> Response``, a prefix route every path under a folder
(``/api/v1/collections/ID``); a per-method fallback takes the paths no route names (DISTL's server ignored
the path, so the legacy queries are such a fallback).  A reply may be streamed (``Response.stream``: Server-Sent
Events); it holds its connection until it ends, so whoever streams caps its streams below the connection cap.

Why it never hangs:
* every connection has a socket timeout, and a deadline for reading a whole request (request line,
  headers, body; for an upload, each chunk of it): a client that connects and sends nothing, or trickles
  bytes, is cut off;
* at most ``max_connections`` connections have a handler thread; one over the cap gets a 503 at once
  from the accepting thread and is closed, except the first ``RESERVED_CONNECTIONS`` over it, which may
  ask only for the routes named by :meth:`HttpServer.reserve` (``/status``, ``/metrics``), so these
  answer while every slot holds a waiting query;
* slow clients (slowloris) cannot hold the slots: a connection still reading its request after
  ``SLOW_READER_S`` with nothing waiting in its socket (so the client is slow, not this host) is a slow
  reader; a client address keeps at most ``MAX_SLOW_READERS_PER_CLIENT`` of
  them: the slowest beyond are cut by the reaper, and at once when a new connection finds every slot
  taken, so monitoring and queries get in while the attack lasts;
* request line and body sizes are limited (414, 413), and a handler's exception becomes a 500 reply,
  never a traceback to the client.

Why a web page cannot drive it: a state-changing request (POST, PUT, DELETE; DISTL's ``EXIT`` is a POST) that
a browser sent on another site's behalf is refused with 403: an ``Origin`` or ``Referer`` naming another
host:port than the service's own (its listening address, this host's names, loopback), or a ``Sec-Fetch-Site``
other than ``same-origin``/``none``.  DISTL's clients send none of these.  A form route reads a body that is
not multipart/form-data only as application/x-www-form-urlencoded, so a page's text/plain POST (which a
browser sends without asking the server first) carries no form fields.

Bodies: a route registered with ``form=True`` (DISTL's POST) takes multipart/form-data bodies up to
``max_upload_bytes`` (pilatus_client and adsc_client push the frame's pixels beside the ``filename`` field):
they are parsed as they stream in, only small fields are kept (``Request.form``), file parts are dropped as they
pass, and each ``BODY_CHUNK_BYTES`` must arrive within the request deadline.  Every other body is read whole,
up to ``MAX_BODY_BYTES``.  DISTL's routes (its ``/spotfinder`` paths and the fallbacks) answer errors in text.
"""
from __future__ import annotations

import array
import contextlib
import email.policy
import fcntl
import functools
import json
import logging
import select
import socket
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

log = logging.getLogger("spotfinder.http")

MAX_URL_BYTES = 8 * 1024
MAX_BODY_BYTES = 1 << 20  # a body read whole (every one but a form route's multipart upload)
BODY_CHUNK_BYTES = 1 << 20  # an upload is read and parsed in chunks of this; each re-arms the request deadline
MAX_FIELD_BYTES = 64 * 1024  # a form field longer than this (or past MAX_BODY_BYTES of them) is dropped
MAX_FORM_PARTS = 256
LEGACY_PREFIX = "/spotfinder"  # DISTL's clients' paths: errors there are answered in text, as DISTL did
LEGACY_TEXT_TYPE = "text/plain"  # DISTL's exact header value, no charset
LISTEN_BACKLOG = 511  # Apache's: a burst of clients waits in the kernel for the accepting thread
STATE_CHANGING = ("POST", "PUT", "DELETE")  # refused when a browser sent them for another site
SAME_SITE_FETCHES = ("same-origin", "none")  # Sec-Fetch-Site values of a request the service's own page or a user made
RESERVED_CONNECTIONS = 8  # beyond the cap, for the reserved routes only
SLOW_READER_S = 0.1  # a request not read in this long is slow (on a beamline LAN one takes milliseconds)
MAX_SLOW_READERS_PER_CLIENT = 16
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
    form: dict[str, str] = field(default_factory=dict)  # a form route's fields (a streamed upload's body is b"")

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
    # A reply of unknown length (Server-Sent Events): stream(write, wait) writes it after the headers until it
    # returns.  wait(seconds) pauses; it returns True when the server stops listening (end the reply), and,
    # like write, raises OSError when the client has gone.
    stream: Callable[[Callable[[bytes], None], Callable[[float], bool]], None] | None = None


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, (json.dumps(data, indent=1) + "\n").encode(), "application/json")


def error_response(status: int, text: str) -> Response:
    return json_response({"error": text}, status)


def legacy_error(status: int, text: str) -> Response:
    """An error on DISTL's routes: text, in the ``Sorry: ...`` form its libtbx tools print."""
    return Response(status, ("Sorry: %s\n" % text).encode(), LEGACY_TEXT_TYPE)


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class _Route:
    handler: Handler | None
    name: str  # the label in metrics
    form: bool = False  # the body is a form: a multipart upload is streamed, its small fields kept
    legacy: bool = False  # a DISTL route: errors are answered in text


class FormError(ValueError):
    """A multipart body not worth reading on (malformed, or too many parts)."""


class StreamedForm:
    """multipart/form-data parsed as it is fed (python-multipart's streaming parser): small fields are kept in
    ``fields`` (the first of a name wins), file parts and fields over ``MAX_FIELD_BYTES`` are dropped as they
    pass, so an upload is never held whole."""

    def __init__(self, boundary: str):
        self.fields: dict[str, str] = {}
        self._parts = 0
        self._kept_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
        self._value: bytearray | None = None  # the field being kept; None while a part's content is dropped
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin, "on_header_field": self._header_name_data,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end})

    def feed(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise FormError("malformed multipart body: %s" % exc) from None

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_FORM_PARTS:
            raise FormError("more than %d parts in the form" % MAX_FORM_PARTS)
        self._disposition, self._value = b"", None

    def _header_name_data(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        name = options.get(b"name")
        if name is not None and b"filename" not in options:
            self._name = name.decode("utf-8", "replace")
            if self._name not in self.fields:
                self._value = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._value is None:
            return
        if len(self._value) + end - start > MAX_FIELD_BYTES or self._kept_bytes + len(self._value) > MAX_BODY_BYTES:
            self._value = None
        else:
            self._value += data[start:end]

    def _part_end(self) -> None:
        if self._value is not None:
            self.fields[self._name] = self._value.decode("utf-8", "replace")
            self._kept_bytes += len(self._value)
            self._value = None


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
        url = urlsplit(self.path)
        self.route = self.server.find("GET" if self.command == "HEAD" else self.command, url.path)
        self.route_name = "unmatched"
        if self.connection in self.server.reserved and url.path not in self.server.reserved_paths:
            busy = self._error(503, "too many connections; retry later")  # over the cap: /status and /metrics only
            busy.headers["Retry-After"] = "1"
            self._reply(busy, close=True)
            return
        if len(self.path) > MAX_URL_BYTES:
            self._reply(self._error(414, "URL longer than %d bytes" % MAX_URL_BYTES))
            return
        if self.command in STATE_CHANGING and self.server.foreign(self.headers):
            log.warning("%s %s from %s refused: sent on behalf of another site (Origin %r, Referer %r)", self.command,
                        url.path, self.client_address[0], self.headers.get("Origin"), self.headers.get("Referer"))
            self._reply(self._error(403, "cross-site request refused"), close=True)
            return
        content = self._read_body()
        if content is None:
            return
        self.server.deadlines.disarm(self.connection)  # the request is in; what follows is our own time
        body, form = content
        request = Request(self.command, url.path, parse_qs(url.query, keep_blank_values=True),
                          {k.lower(): v for k, v in self.headers.items()}, body, self.client_address[0], url.query,
                          form)
        with self.server.serving():
            self._reply(self._answer(request))

    def _error(self, status: int, text: str) -> Response:
        return legacy_error(status, text) if self.route.legacy else error_response(status, text)

    def _answer(self, request: Request) -> Response:
        self.route_name = self.route.name
        if self.route.handler is None:
            allowed = self.server.knows(request.path)
            return self._error(405 if allowed else 404,
                               "method not allowed" if allowed else "no such resource: %s" % request.path)
        try:
            return self.route.handler(request)
        except Exception:
            log.exception("handler for %s %s failed", self.command, request.path)
            return self._error(500, "internal error")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve  # HEAD: GET's reply without its body

    def _read_body(self) -> tuple[bytes, dict[str, str]] | None:
        """(the body, a form route's fields), or None after answering why the body is refused."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(self._error(411, "send a Content-Length, not a chunked body"), close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._reply(self._error(400, "bad Content-Length"), close=True)
            return None
        content_type = email.policy.HTTP.header_factory("content-type", self.headers.get("Content-Type", ""))
        upload = self.route.form and content_type.content_type == "multipart/form-data"
        limit = self.server.max_upload_bytes if upload else MAX_BODY_BYTES
        if length > limit:
            self._reply(self._error(413, "request body larger than %d bytes" % limit), close=True)
            return None
        if upload:
            return self._read_upload(length, content_type.params.get("boundary", ""))
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # timed out or cut off mid-body: nobody is left to answer
            self.close_connection = True
            return None
        if not self.route.form or content_type.content_type != "application/x-www-form-urlencoded":
            return body, {}
        return body, {key: values[0] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}

    def _read_upload(self, length: int, boundary: str) -> tuple[bytes, dict[str, str]] | None:
        """A multipart body streamed through :class:`StreamedForm` in chunks.  The request deadline is about
        progress here: each chunk re-arms it, so a large upload must keep moving, not finish within one deadline."""
        if not boundary:
            self._reply(self._error(400, "multipart/form-data without a boundary"), close=True)
            return None
        form = StreamedForm(boundary)
        remaining = length
        while remaining:
            try:
                chunk = self.rfile.read(min(remaining, BODY_CHUNK_BYTES))
            except OSError:  # the socket timed out
                chunk = b""
            if not chunk:  # cut off mid-body: nobody is left to answer
                self.close_connection = True
                return None
            remaining -= len(chunk)
            self.server.deadlines.arm(self.connection)
            try:
                form.feed(chunk)
            except FormError as exc:
                self._reply(self._error(400, str(exc)), close=True)
                return None
        return b"", form.fields

    def _reply(self, response: Response, close: bool = False) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        if response.stream is None:
            self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if close or response.stream is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()
        self.server.observe(getattr(self, "route_name", "unmatched"), response.status)
        if response.stream is not None and self.command != "HEAD":
            self._stream(response.stream)
        if response.then is not None:
            response.then()

    def _stream(self, stream) -> None:
        def write(data: bytes) -> None:
            self.wfile.write(data)
            self.wfile.flush()

        def wait(seconds: float) -> bool:
            """Pause; True when the server is closing; OSError when the client hung up (its socket is readable)."""
            end = time.monotonic() + seconds
            while not self.server.closing.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                if select.select([self.connection], [], [], min(left, 0.25))[0]:
                    # EOF: the client closed; anything else has no place on a stream: end it either way
                    raise ConnectionAbortedError("the client closed the stream or sent on it")
            return True
        try:
            stream(write, wait)
        except OSError:  # the client went away, or stopped reading for the socket timeout
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the stdlib (bad request line, too long, bad headers): short text, counted."""
        self.close_connection = True
        self.route_name = "malformed"
        if self.request_version == "HTTP/0.9":  # the default of an unparsable line: answer with a status line
            self.request_version = "HTTP/1.0"
        self._reply(Response(code, (message or self.responses.get(code, ("error",))[0]).encode()), close=True)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


def _cut(conn: socket.socket) -> None:
    """End a connection's reading: its handler's read returns at once and it closes."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _waiting_bytes(conn: socket.socket) -> int:
    """Bytes the client sent that no handler read yet (FIONREAD); 0 for a closed socket."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(conn.fileno(), termios.FIONREAD, count)
    except (OSError, ValueError):
        return 0
    return count[0]


class _Deadlines:
    """Cuts off connections that take longer than ``limit_s`` to deliver a request, and each client's slow
    readers beyond MAX_SLOW_READERS_PER_CLIENT; closes refused connections a little later (one reaper thread)."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}  # connections reading a request (or idle between requests)
        self._clients: dict[socket.socket, str] = {}  # every connection's client address, from admit to forget
        self._closing: list[tuple[float, socket.socket]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reap, name="http-deadlines", daemon=True)

    def admit(self, conn: socket.socket, client: str) -> None:
        """A new connection: its first request's deadline runs from now."""
        with self._lock:
            self._clients[conn] = client
            self._due[conn] = time.monotonic() + self.limit_s

    def forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._clients.pop(conn, None)
            self._due.pop(conn, None)

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

    def cut_beyond_client_cap(self) -> socket.socket | None:
        """Cut the slowest of the slow readers beyond a client's cap, and return it; None when there is none."""
        with self._lock:
            beyond = self._beyond_client_cap(time.monotonic())
            if not beyond:
                return None
            conn = min(beyond, key=self._due.__getitem__)
            del self._due[conn]
        _cut(conn)
        return conn

    def _slow(self, now: float) -> list[socket.socket]:
        """The slow readers, slowest first (under the lock): a request waiting in its socket is this host's delay."""
        started_before = now + self.limit_s - SLOW_READER_S  # a deadline before this was armed SLOW_READER_S ago
        old = [conn for conn, due in self._due.items() if due < started_before]
        return sorted((conn for conn in old if not _waiting_bytes(conn)), key=self._due.__getitem__)

    def _beyond_client_cap(self, now: float) -> list[socket.socket]:
        """Each client's slow readers beyond MAX_SLOW_READERS_PER_CLIENT, the slowest ones (under the lock)."""
        by_client: dict[str | None, list[socket.socket]] = {}
        for conn in self._slow(now):
            by_client.setdefault(self._clients.get(conn), []).append(conn)
        return [conn for conns in by_client.values()
                for conn in conns[:max(0, len(conns) - MAX_SLOW_READERS_PER_CLIENT)]]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _reap(self) -> None:
        while not self._stop.wait(REAP_EVERY_S):
            now = time.monotonic()
            with self._lock:
                late = {conn for conn, due in self._due.items() if due < now}
                late.update(self._beyond_client_cap(now))
                for conn in late:
                    del self._due[conn]
                done = [conn for due, conn in self._closing if due < now]
                self._closing = [(due, conn) for due, conn in self._closing if due >= now]
            for conn in late:
                _cut(conn)
            for conn in done:
                conn.close()


def _under(prefix: str, path: str) -> bool:
    """Whether a prefix route (``/api/v1/collections/``) answers ``path``: a path below it, not the folder itself."""
    return path.startswith(prefix) and len(path) > len(prefix)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, timeout_s: float, max_connections: int, max_upload_bytes: int):
        self.timeout_s = timeout_s
        self.max_upload_bytes = max_upload_bytes
        self.routes: dict[tuple[str, str], _Route] = {}
        self.prefixes: dict[tuple[str, str], _Route] = {}  # (method, "/path/"): every path under it
        self.closing = threading.Event()  # set when the server stops listening: streamed replies end
        self.fallbacks: dict[str, _Route] = {}
        self.observe: Callable[[str, int], None] = lambda route, status: None
        self.deadlines = _Deadlines(timeout_s)
        self.max_connections = max_connections
        self.connections = 0  # connections with a handler thread
        self.reserved: set[socket.socket] = set()  # of which over the cap: for the reserved paths only
        self.vacated: set[socket.socket] = set()  # cut to make room: no longer counted, their threads ending
        self.reserved_paths: set[str] = set()
        self.busy = 0  # of which answering a request (not reading one, not idle between requests)
        self.counts = threading.Condition()
        super().__init__(address, _RequestHandler)

    @functools.cached_property
    def names(self) -> set[str]:
        """The host names a request for this service may name in its Origin or Referer (lower case); looked up
        when the first such request comes (getfqdn asks DNS, which must not hold up the start)."""
        host = self.server_address[0]
        names = {"localhost", "127.0.0.1", "::1", socket.gethostname().lower(), socket.getfqdn().lower()}
        return names if host in ("", "0.0.0.0", "::") else names | {host.lower()}

    def foreign(self, headers) -> bool:
        """Whether a browser sent this request on behalf of another site (see the module's docstring)."""
        fetch_site = headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site.strip().lower() not in SAME_SITE_FETCHES:
            return True
        return any(value is not None and not self._own_url(value)
                   for value in (headers.get("Origin"), headers.get("Referer")))

    def _own_url(self, value: str) -> bool:
        try:
            url = urlsplit(value.strip())
            port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        except ValueError:
            return False
        return url.hostname is not None and url.hostname in self.names and port == self.server_address[1]

    def find(self, method: str, path: str) -> _Route:
        """The route answering ``method path``: a registered one, else the method's fallback, else none."""
        route = self.routes.get((method, path)) or self._under_prefix(method, path) or self.fallbacks.get(method)
        return route or _Route(None, "unmatched", legacy=path.startswith(LEGACY_PREFIX))

    def _under_prefix(self, method: str, path: str) -> _Route | None:
        matches = [prefix for known_method, prefix in self.prefixes if known_method == method and _under(prefix, path)]
        return self.prefixes[(method, max(matches, key=len))] if matches else None

    def knows(self, path: str) -> bool:
        return (any(known == path for _, known in self.routes)
                or any(_under(prefix, path) for _, prefix in self.prefixes))

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
            if self.connections >= self.max_connections:
                slowest = self.deadlines.cut_beyond_client_cap()
                if slowest is not None:
                    self.vacated.add(slowest)
                    self.connections -= 1
            full = self.connections >= self.max_connections + RESERVED_CONNECTIONS
            if not full:
                if self.connections >= self.max_connections:
                    self.reserved.add(request)
                self.connections += 1
                self.deadlines.admit(request, client_address[0])
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread could be started: give the slot back, drop the connection
            self._release(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request) -> None:
        with self.counts:
            if request in self.vacated:
                self.vacated.discard(request)
            else:
                self.connections -= 1
            self.reserved.discard(request)
            self.deadlines.forget(request)
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
    def __init__(self, *, host: str, port: int, timeout_s: float = 10.0, max_connections: int = 512,
                 max_upload_bytes: int = 256 << 20):
        self.server = _Server((host, port), timeout_s, max_connections, max_upload_bytes)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def route(self, method: str, path: str, handler: Handler, *, form: bool = False, prefix: bool = False) -> None:
        """``form``: the body is a form, given to the handler as ``Request.form`` (see the module's docstring);
        ``prefix``: ``path`` ends in ``/`` and the route answers every path under it (``/api/v1/collections/ID``)."""
        route = _Route(handler, path, form, path.startswith(LEGACY_PREFIX))
        (self.server.prefixes if prefix else self.server.routes)[(method.upper(), path)] = route

    def answer_as_fallback(self, request: Request) -> Response:
        """The answer of the method's fallback: for a route that shares its path with DISTL's queries (``/``)."""
        route = self.server.fallbacks.get("GET" if request.method == "HEAD" else request.method)
        return route.handler(request) if route else error_response(404, "no such resource: %s" % request.path)

    def reserve(self, *paths: str) -> None:
        """``paths`` are still answered over the connection cap (on RESERVED_CONNECTIONS more connections)."""
        self.server.reserved_paths.update(paths)

    def fallback(self, method: str, name: str, handler: Handler, *, form: bool = False) -> None:
        """``handler`` answers the ``method`` requests no route names (DISTL's, so errors are text); ``name``
        labels them in metrics."""
        self.server.fallbacks[method.upper()] = _Route(handler, name, form, legacy=True)

    def observe(self, callback: Callable[[str, int], None]) -> None:
        """``callback(route, status)`` after every reply (metrics)."""
        self.server.observe = callback

    def start(self) -> None:
        self.server.deadlines.start()
        self.thread.start()

    def stop_listening(self) -> None:
        """Accept no more connections; the ones already open are still served (streamed replies end)."""
        self.server.closing.set()
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
