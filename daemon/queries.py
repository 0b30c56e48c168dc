"""On-demand queries over HTTP: DISTL's legacy URLs (byte-identical text) and the JSON API.

Routes (registered on the service's :class:`~spotfinder_daemon.http.HttpServer`):

* ``GET /spotfinder/distl.signal_strength?distl.image=...&...`` (any path no other route names: DISTL's
  server ignored it): DISTL's text, with DISTL's error texts at status 200; ``format=json`` gives JSON;
* ``GET /api/v1/analyse?image=...&res.outer=...``: the result fields as JSON, with real status codes;
* ``POST /spotfinder`` (any path), thin_client's multipart form: ``filename=<frame>`` gives DISTL's short
  POST text; ``filename=EXIT`` stops the service (loopback clients only).

Parameters are parsed the way DISTL's server did: full paths or unique suffixes, the first value of a
repeated key, over the service's start-up parameters.  A frame is analysed only if its real path (after
symlinks) lies inside a data root; a refused frame is answered exactly like a missing one in the legacy
text, so the reply reveals nothing about files outside the roots.
"""
from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import logging
import os
from collections.abc import Callable
from urllib.parse import parse_qs

from spotfinder_core import ParameterError, Params
from spotfinder_core.params import parse_word

from .http import Request, Response, error_response, json_response
from .ondemand import Lane, LaneClosed, LaneFull, Outcome

log = logging.getLogger("spotfinder.queries")

LEGACY_TYPE = "text/plain"  # DISTL's exact header value, no charset
RETRY_AFTER_S = 2
# DISTL's POST path maps no distl.res.* limit onto the analysis (only its GET path does): kept as a quirk.
IGNORED_BY_POST = ("distl.res.outer", "distl.res.inner")


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
        if not any(os.path.commonpath((real, root)) == root for root in self.folders):
            return absolute, "outside"
        if not os.path.isfile(real) or not os.access(real, os.R_OK):
            return absolute, "missing"
        return absolute, "ok"


def _legacy_text(text: str, status: int = 200, **headers: str) -> Response:
    return Response(status, text.encode(), LEGACY_TYPE, headers)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _form_fields(request: Request) -> dict[str, str]:
    """The fields of a multipart/form-data (thin_client) or urlencoded POST body; first value wins."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + request.body)
        fields: dict[str, str] = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if name and name not in fields:
                fields[name] = payload.decode("utf-8", "replace")
        return fields
    return {key: values[0] for key, values in parse_qs(request.body.decode("utf-8", "replace")).items()}


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
        http.fallback("GET", "legacy_get", self.legacy_get)
        http.fallback("POST", "legacy_post", self.legacy_post)

    # ----- parameters --------------------------------------------------------------------------------------
    def _params(self, query_string: str) -> Params:
        """Start-up parameters overridden by the query's; ParameterError like DISTL's (an unknown key first)."""
        words = ["%s=%s" % (key, values[0]) for key, values in parse_qs(query_string).items() if key != "format"]
        values, first_bad = dict(self.startup.explicit()), None
        for word in words:
            try:
                path, value = parse_word(word, home_scope=None)
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
        except ParameterError as exc:
            return _legacy_text(str(exc), 200 if exc.unknown else 400)
        image = params["distl.image"]
        if image is None:
            return _legacy_text("Missing distl.image: add distl.image=FRAME to the query.\n", 400)
        path, verdict = self.roots.locate(image)
        if verdict != "ok":
            return _legacy_text("%s is not a readable file" % image)
        return self._legacy_answer(path, params, "body")

    def legacy_post(self, request: Request) -> Response:
        filename = _form_fields(request).get("filename")
        if filename is None:
            return _legacy_text("POST needs a filename field (multipart/form-data, as thin_client sends).\n", 400)
        if filename.strip() == "EXIT":
            if not _is_loopback(request.client):
                log.warning("EXIT from %s refused: only accepted from this host", request.client)
                return _legacy_text("EXIT is accepted only from this host.\n", 403)
            log.warning("EXIT received from %s: the service stops", request.client)
            return Response(200, b"", LEGACY_TYPE, then=self.stop_service)
        path, verdict = self.roots.locate(filename)
        if verdict != "ok":
            return _legacy_text("%s is not a readable file" % filename)
        params = Params({k: v for k, v in self.startup.explicit().items() if k not in IGNORED_BY_POST})
        return self._legacy_answer(path, params, "post")

    def api_get(self, request: Request) -> Response:
        try:
            params = self._params(request.query_string)
        except ParameterError as exc:
            return error_response(400, str(exc))
        image = params["distl.image"]
        if image is None:
            return error_response(400, "missing image: add image=FRAME (or distl.image=FRAME) to the query")
        path, verdict = self.roots.locate(image)
        if verdict == "outside":
            return error_response(403, "%s is outside the data roots" % image)
        if verdict == "missing":
            return error_response(404, "%s is not a readable file" % image)
        outcome = self._run(path, params, None)
        if isinstance(outcome, Response):
            return outcome
        result = outcome.result
        return json_response(result, 200 if result["status"] == "ok" else 422)

    # ----- the lane ----------------------------------------------------------------------------------------
    def _legacy_answer(self, path: str, params: Params, reply: str) -> Response:
        outcome = self._run(path, params, reply, legacy=True)
        return outcome if isinstance(outcome, Response) else _legacy_text(outcome.text)

    def _run(self, path: str, params: Params, reply: str | None, legacy: bool = False) -> Outcome | Response:
        """The worker's outcome, or the error reply (busy, stopping, timed out, failed)."""
        def failure(status: int, text: str, **headers: str) -> Response:
            if legacy:
                return _legacy_text("Sorry: %s\n" % text, status, **headers)
            response = error_response(status, text)
            response.headers.update(headers)
            return response

        try:
            job = self.lane.submit(path, params.replace(distl__image=path), reply)
        except LaneFull:
            return failure(503, "the spotfinder service is busy; retry later", **{"Retry-After": str(RETRY_AFTER_S)})
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
