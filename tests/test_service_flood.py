"""Nothing an HTTP client sends may slow the frame path.

Issue 13: 16 clients posting 1 MiB forms of 15,000 parts stalled frame processing from a p50 of 0.01 s to 82 s,
because each form was parsed whole in an HTTP thread, holding the service's GIL against its main loop.  Forms
are now streamed and refused past MAX_FORM_PARTS parts; here the latency of watched frames (file complete ->
result, the result's own ``t_complete`` and ``t_done``) is measured quiet and again under such a flood (forms of
many tiny parts, and forms of one huge field), and must stay within a small bound of the quiet one.
"""
from __future__ import annotations

import http.client
import shutil
import statistics
import threading
import time

import pytest

from service_helpers import make_service, real_frames, subscribe, wait_for
from spotfinder_daemon.http import MAX_FORM_PARTS

__all__ = ["make_service", "subscribe"]  # fixtures used by name

CLIENTS = 16
FORM_BYTES = 1 << 20
FRAMES = 16
FRAME_EVERY_S = 0.5  # one frame at a time: the latency measured is the frame path's, not a queue's
FLOOD_LEAD_S = 1.0  # the flood runs this long before the first frame, so every frame meets it
REPLY_TIMEOUT_S = 10.0
BOUNDARY = "fuzzboundary"


def many_parts_form() -> bytes:
    """FORM_BYTES of 15,000 tiny fields (the last one filling up): the form that stalled the service."""
    part = "--%s\r\nContent-Disposition: form-data; name=\"f%%d\"\r\n\r\n%%s\r\n" % BOUNDARY
    body = "".join(part % (n, "x") for n in range(14_999)).encode()
    tail = "--%s--\r\n" % BOUNDARY
    filler = FORM_BYTES - len(body) - len(part % (14_999, "") + tail)
    return body + (part % (14_999, "x" * filler) + tail).encode()


def huge_field_form() -> bytes:
    """FORM_BYTES of one field's value."""
    head = ("--%s\r\nContent-Disposition: form-data; name=\"filename\"\r\n\r\n" % BOUNDARY).encode()
    tail = ("\r\n--%s--\r\n" % BOUNDARY).encode()
    return head + b"y" * (FORM_BYTES - len(head) - len(tail)) + tail


class Flood:
    """CLIENTS threads POSTing ``body`` to /spotfinder in a loop, each on a new connection, until stopped;
    every reply's (status, content type, body, seconds) is kept, and every failure to get one."""

    def __init__(self, port: int, body: bytes):
        self.port, self.body = port, body
        self.replies: list[tuple[int, str, bytes, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post_until_stopped, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REPLY_TIMEOUT_S + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a flood client hung"

    def _post_until_stopped(self) -> None:
        headers = {"Content-Type": "multipart/form-data; boundary=%s" % BOUNDARY}
        while not self._stop.is_set():
            start = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REPLY_TIMEOUT_S)
            try:
                connection.request("POST", "/spotfinder", body=self.body, headers=headers)
                reply = connection.getresponse()
                self.replies.append((reply.status, reply.getheader("Content-Type"), reply.read(),
                                     time.monotonic() - start))
            except OSError as exc:
                self.failures.append(repr(exc))
            finally:
                connection.close()


def frame_latencies(service, subscriber, sources: list[str], prefix: str) -> list[float]:
    """Seconds from complete to done of FRAMES copies of ``sources`` written one every FRAME_EVERY_S."""
    names = []
    for number in range(FRAMES):
        name = str(service.watch / ("%s_%04d.cbf" % (prefix, number + 1)))
        shutil.copyfile(sources[number % len(sources)], name)
        names.append(name)
        time.sleep(FRAME_EVERY_S)

    def answered() -> dict | None:
        found = {r["file"]: r for r in subscriber.results() if r["file"] in names}
        return found if len(found) == FRAMES else None

    mine = wait_for(answered, 30, "the %s frames' results" % prefix)
    assert all(r["status"] == "ok" for r in mine.values()), [r["error"] for r in mine.values()]
    return [r["t_done"] - r["t_complete"] for r in mine.values()]


@pytest.mark.parametrize("form", [many_parts_form, huge_field_form], ids=["15000-parts", "one-huge-field"])
def test_a_flood_of_hostile_forms_does_not_slow_watched_frames(form, make_service, subscribe):
    sources = real_frames()
    service = make_service(workers=2).start()
    subscriber = subscribe(service.pub)
    time.sleep(0.5)  # the subscriber connected and the publisher settled
    quiet = statistics.median(frame_latencies(service, subscriber, sources, "quiet"))

    body = form()
    assert len(body) == FORM_BYTES
    with Flood(service.http_port, body) as flood:
        time.sleep(FLOOD_LEAD_S)
        flooded = frame_latencies(service, subscriber, sources, "flooded")
    under_flood = statistics.median(flooded)
    figures = "p50 quiet %.3f s, under %d clients %.3f s (max %.3f s); %d flood replies, p50 %.3f s" % (
        quiet, CLIENTS, under_flood, max(flooded), len(flood.replies),
        statistics.median(r[3] for r in flood.replies) if flood.replies else float("nan"))
    assert under_flood < 1.0 and under_flood <= 3 * quiet + 0.2, figures

    assert flood.replies and not flood.failures, "%s; failures: %s" % (figures, flood.failures[:5])
    assert {(status, kind) for status, kind, _, _ in flood.replies} == {(400, "text/plain")}, figures
    assert all(text.startswith(b"Sorry: ") and len(text) < 200 for _, _, text, _ in flood.replies), flood.replies[0]
    if form is many_parts_form:
        assert all(b"more than %d parts" % MAX_FORM_PARTS in text for _, _, text, _ in flood.replies)
    assert statistics.median(r[3] for r in flood.replies) < 1.0, figures
    assert service.status()["healthy"]
