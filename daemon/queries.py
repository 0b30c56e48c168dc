"""On-demand queries over HTTP: DISTL's legacy URLs (byte-identical text) and the JSON API.

Routes (registered on the service's :class:`~spotfinder_daemon.http.HttpServer`):

* ``GET /spotfinder/distl.signal_strength?distl.image=...&...`` (any path no other route names: DISTL's
  server ignored it): DISTL's text, with DISTL's error texts at status 200; ``format=json`` gives JSON;
* ``GET /spotfinder/distl.signal_strength_bcsb?distl.image=...``: the BCSB XML of DISTL's Apache server,
  every error in its ``<status>`` element at status 200;
* ``GET /api/v1/analyse?image=...&res.outer=...``: the result fields as JSON, with real status codes;
  ``frame=N`` (or ``distl.range=N``) names frame N (from 0) of an EIGER HDF5 series (``image=x_master.h5``);
* ``POST /spotfinder`` (any path), thin_client's multipart form: ``filename=<frame>`` gives DISTL's short
  POST text; ``filename=EXIT`` stops the service (loopback clients only; a POST a browser sent for
  another site never gets here, see :mod:`~spotfinder_daemon.http`).  pilatus_client's and adsc_client's
  forms get the same (the pixels they push are dropped as they stream in); ``Expect: 200`` (DISTL's liveness
  probe) gets 200 at once.  Errors on these routes are text, ``Sorry: ...`` where DISTL had no wording.

A frame of an HDF5 series is named as DISTL names it, ``distl.image=x_master.h5&distl.range=N`` (one frame per
query: ``distl.range=A,B`` is answered only when it names one frame), and answered with the text the CLI
gives for it.  Parameters are parsed the way DISTL's server did: full paths or unique suffixes, the first value of a
repeated key, over the service's start-up parameters.  A frame is analysed only if its real path (after
symlinks) lies inside a data root; a refused frame is answered exactly like a missing one in the legacy
text, so the reply reveals nothing about files outside the roots.  The check is made here and again by the
worker on the file it opened (the job's ``roots``), so a symlink flipped in between smuggles nothing in.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from urllib.parse import parse_qs

from spotfinder_core import ParameterError, Params
from spotfinder_core.params import parse_word
from spotfinder_core.report import bcsb_xml

from . import protocol
from .http import LEGACY_TEXT_TYPE, Request, Response, error_response, json_response, legacy_error
from .ondemand import Lane, LaneClosed, LaneFull, Outcome

log = logging.getLogger("spotfinder.queries")

# DISTL's POST path maps no distl.res.* limit onto the analysis (only its GET path does): kept as a quirk.
IGNORED_BY_POST = ("distl.res.outer", "distl.res.inner")
# What DISTL's BCSB module (Python 3.11) puts in <status> without distl.image: os.path.isfile(None) raises.
BCSB_NO_IMAGE = "TypeError('stat: path should be string, bytes, os.PathLike or integer, not NoneType')"
REFUSED_BY_WORKER = {error: verdict for verdict, error in protocol.REFUSALS.items()}
FRAME = "frame"  # the JSON API's frame index (the legacy routes use distl.range)


class BadFrame(ValueError):
    """A frame index that names no single frame; the message is for the client."""


def frame_index(params: Params, frame: str | None = None) -> int | None:
    """The frame a query names inside a multi-frame file: ``frame`` (the JSON API's), else ``distl.range``'s
    single frame; None for neither (a CBF).  BadFrame for anything else."""
    if frame is not None:
        if not (frame.isascii() and frame.isdigit()):
            raise BadFrame("bad frame %.40r: expected a frame number from 0" % frame)
        return int(frame)
    span = params["distl.range"]
    if span is None:
        return None
    if len(span) == 2 and span[1] - span[0] != 1:
        raise BadFrame("distl.range=%d,%d names %d frames; a query answers one: ask distl.range=N for each"
                       % (span[0], span[1], max(0, span[1] - span[0])))
    return span[0]


class DataRoots:
    """The folders on-demand frames must lie in, compared after resolving symlinks."""

    def __init__(self, *, folders: tuple[str, ...]):
        self.folders = tuple(os.path.realpath(folder) for folder in folders)

    def locate(self, image: str) -> tuple[str, str]:
        """(the absolute path to analyse, verdict): ``ok``, ``outside`` the roots, or ``missing`` inside them.

        A relative path is taken from the service's working folder, as DISTL did; the absolute (not the
        resolved) path is analysed, because DISTL prints it in its bin tables.
        """
        try:
            absolute = os.path.abspath(image)
            real = os.path.realpath(absolute)
        except ValueError:  # an embedded NUL
            return image, "outside"
        if not protocol.inside(real, self.folders):
            return absolute, "outside"
        if not os.path.isfile(real) or not os.access(real, os.R_OK):
            return absolute, "missing"
        return absolute, "ok"


def _legacy_text(text: str) -> Response:
    return Response(200, text.encode(), LEGACY_TEXT_TYPE)


def _legacy_reply(outcome: Outcome | Response) -> Response:
    return outcome if isinstance(outcome, Response) else _legacy_text(outcome.text)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


class Queries:
    """The on-demand routes: parse, check the path, queue on the lane, wait, answer."""

    def __init__(self, *, lane: Lane, startup: Params, roots: DataRoots, timeout_s: float,
                 stop_service: Callable[[], None], on_error: Callable[[str], None]):
        self.lane = lane
        self.startup = startup
        self.roots = roots
        self.timeout_s = timeout_s
        self.stop_service = stop_service
        self.on_error = on_error

    def register(self, http) -> None:
        http.route("GET", "/api/v1/analyse", self.api_get)
        http.route("GET", "/spotfinder/distl.signal_strength_bcsb", self.bcsb_get)
        http.fallback("GET", "legacy_get", self.legacy_get)
        http.fallback("POST", "legacy_post", self.legacy_post, form=True)

    # ----- parameters --------------------------------------------------------------------------------------
    def _params(self, query_string: str, home_scope: str | None = None, api: bool = False) -> Params:
        """Start-up parameters overridden by the query's; ParameterError like DISTL's (an unknown key first).
        DISTL's Apache server resolves short keys inside ``home_scope="distl"``, its HTTP server in none; the
        JSON API (``api``) takes ``frame`` besides them."""
        ours = ("format", FRAME) if api else ("format",)
        words = ["%s=%s" % (key, values[0]) for key, values in parse_qs(query_string).items() if key not in ours]
        values, first_bad = dict(self.startup.explicit()), None
        for word in words:
            try:
                path, value = parse_word(word, home_scope=home_scope)
            except ParameterError as exc:
                if exc.unknown:
                    raise
                first_bad = first_bad or exc
                continue
            values[path] = value
        if first_bad is not None:
            raise first_bad
        return Params(values)

    # ----- routes ------------------------------------------------------------------------------------------
    def legacy_get(self, request: Request) -> Response:
        if request.arg("format") == "json":
            return self.api_get(request)
        try:
            params = self._params(request.query_string)
        except ParameterError as exc:  # DISTL's text for an unknown key; it dropped the connection on a bad value
            return _legacy_text(str(exc)) if exc.unknown else legacy_error(400, str(exc))
        image = params["distl.image"]
        if image is None:
            return legacy_error(400, "Missing distl.image: add distl.image=FRAME to the query.")
        try:
            index = frame_index(params)
        except BadFrame as exc:
            return _legacy_text("Sorry, can't process %s.  %s\n" % (image, exc))
        verdict, outcome = self._analyse(image, params, "body", legacy=True, index=index)
        if verdict != "ok":
            return _legacy_text("%s is not a readable file" % image)
        return _legacy_reply(outcome)

    def legacy_post(self, request: Request) -> Response:
        """thin_client's form (pilatus_client's and adsc_client's too: their pushed pixels never reach here, only
        ``filename`` counts, as in DISTL's read_file server)."""
        if "200" in request.headers.get("expect", ""):  # mp_spotfinder_server_is_alive: DISTL answers 200, empty
            return Response(200, b"", LEGACY_TEXT_TYPE)
        filename = request.form.get("filename")
        if filename is None:
            return legacy_error(400, "POST needs a filename field (multipart/form-data, as thin_client sends).")
        if filename.strip() == "EXIT":
            if not _is_loopback(request.client):
                log.warning("EXIT from %s refused: only accepted from this host", request.client)
                return legacy_error(403, "EXIT is accepted only from this host.")
            log.warning("EXIT received from %s: the service stops", request.client)
            return Response(200, b"", LEGACY_TEXT_TYPE, then=self.stop_service)
        params = Params({k: v for k, v in self.startup.explicit().items() if k not in IGNORED_BY_POST})
        verdict, outcome = self._analyse(filename, params, "post", legacy=True)
        if verdict != "ok":
            return _legacy_text("%s is not a readable file" % filename)
        return _legacy_reply(outcome)

    def bcsb_get(self, request: Request) -> Response:
        """DISTL's Apache BCSB reply: XML from the worker, or the status DISTL's module gives a refused query."""
        try:
            params = self._params(request.query_string, home_scope="distl")
        except ParameterError as exc:  # DISTL parses before it writes file_name
            return _legacy_text(bcsb_xml([("status", "Sorry(%r)" % str(exc))]))
        image = params["distl.image"]
        if image is None:
            return _legacy_text(bcsb_xml([("file_name", None), ("status", BCSB_NO_IMAGE)]))
        try:
            index = frame_index(params)
        except BadFrame as exc:
            return _legacy_text(bcsb_xml([("file_name", image), ("status", "Sorry(%r)" % str(exc))]))
        verdict, outcome = self._analyse(image, params, "bcsb", legacy=True, index=index)
        if verdict != "ok":
            refused = "Sorry(%r)" % ("%s not a readable file" % image)
            return _legacy_text(bcsb_xml([("file_name", image), ("status", refused)]))
        return _legacy_reply(outcome)

    def api_get(self, request: Request) -> Response:
        try:
            params = self._params(request.query_string, api=True)
        except ParameterError as exc:
            return error_response(400, str(exc))
        image = params["distl.image"]
        if image is None:
            return error_response(400, "missing image: add image=FRAME (or distl.image=FRAME) to the query")
        try:
            index = frame_index(params, request.arg(FRAME))
        except BadFrame as exc:
            return error_response(400, str(exc))
        verdict, outcome = self._analyse(image, params, None, index=index)
        if verdict == "outside":
            return error_response(403, "%s is outside the data roots" % image)
        if verdict == "missing":
            return error_response(404, "%s is not a readable file" % image)
        if isinstance(outcome, Response):
            return outcome
        result = outcome.result
        return json_response(result, 200 if result["status"] == "ok" else 422)

    # ----- the lane ----------------------------------------------------------------------------------------
    def _analyse(self, image: str, params: Params, reply: str | None, legacy: bool = False,
                 index: int | None = None) -> tuple[str, Outcome | Response | None]:
        """(verdict, the worker's outcome or the error reply): ``ok``, else the frame was refused (``outside``
        the roots or ``missing``) here or by the worker on the file it opened, and there is no outcome."""
        path, verdict = self.roots.locate(image)
        if verdict != "ok":
            return verdict, None
        outcome = self._run(path, params, reply, legacy, index)
        if isinstance(outcome, Outcome) and outcome.result["status"] == "error":
            refused = REFUSED_BY_WORKER.get(outcome.result.get("error"))
            if refused is not None:
                return refused, None
        return "ok", outcome

    def _run(self, path: str, params: Params, reply: str | None, legacy: bool = False,
             index: int | None = None) -> Outcome | Response:
        """The worker's outcome, or the error reply (refused at once when it could not be answered in time,
        stopping, timed out, failed)."""
        def failure(status: int, text: str, **headers: str) -> Response:
            response = legacy_error(status, text) if legacy else error_response(status, text)
            response.headers.update(headers)
            return response

        try:
            job = self.lane.submit(path, params.replace(distl__image=path), reply, self.timeout_s,
                                   roots=self.roots.folders, index=index)
        except LaneFull as refused:
            retry = {} if refused.retry_after_s is None else {"Retry-After": str(refused.retry_after_s)}
            return failure(503, "the spotfinder service cannot answer in time (%s); retry later" % refused.reason,
                           **retry)
        except LaneClosed:
            return failure(503, "the spotfinder service is stopping")
        outcome = job.wait(self.timeout_s)
        if outcome is None:
            self.lane.abandon(job)
            self.on_error("ondemand_timeout")
            return failure(504, "no result for %s within %.0f s" % (path, self.timeout_s))
        if outcome.error is not None:
            self.on_error("ondemand_failed")
            status = 503 if self.lane.closed else 500
            return failure(status, "can't process %s: %s" % (path, outcome.error))
        return outcome
