"""The live page (``GET /``): static files shipped as package data, nothing built at install time.

``index.html``, ``app.js`` and ``style.css`` are ours; ``uPlot.iife.min.js`` and ``uPlot.min.css`` are uPlot
1.6.32 (MIT, ``uPlot.LICENSE`` beside them), vendored from npm so the page works offline.  The page only
reads (``/status``, ``/api/v1/collections``, ``/events``); its Content-Security-Policy allows no script or
style from anywhere else and no framing by another site.
"""
from __future__ import annotations

from importlib import resources

from ..http import HttpServer, Request, Response, error_response

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8", "uPlot.iife.min.js": "text/javascript; charset=utf-8",
         "uPlot.min.css": "text/css; charset=utf-8", "uPlot.LICENSE": "text/plain; charset=utf-8"}
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                      "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-cache"}


def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def register(http: HttpServer) -> None:
    """``GET /`` (the page; with a query string, DISTL's query as before) and ``GET /web/NAME`` (its files),
    read once here."""
    served = {name: Response(200, _read(name), kind, dict(HEADERS)) for name, kind in FILES.items()}

    def page(request: Request) -> Response:
        if request.query_string:  # DISTL's server ignored the path: `GET /?distl.image=...` is a query
            return http.answer_as_fallback(request)
        return served["index.html"]

    def asset(request: Request) -> Response:
        return served.get(request.path[len("/web/"):]) or error_response(404, "no such file: %s" % request.path)

    http.route("GET", "/", page)
    http.route("GET", "/web/", asset, prefix=True)
