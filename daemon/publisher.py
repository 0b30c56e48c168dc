"""The published messages and the PUB socket that sends them.

Every message is two frames: the topic ``spotfinder.v1.<type>.<collection>`` (general to specific, so SUB
prefix filters work) and a JSON body.  Field names are an API: consumers parse them.

PUB is best-effort: a subscriber that is not connected, too slow, or connected across a crash between a
commit and its send misses messages.  The record is the ledger, served by ``GET /results?since=SEQ``; every
stored message has a ``seq`` and the ``ledger`` id beside it; heartbeats have no seq of their own and carry the
newest (``last_seq``, ``ledger``), so every gap in the seqs a subscriber saw is a loss it can fetch.
Messages are held back until ``hold_until`` (the settle time after binding), so subscribers that were
connected before a restart have reconnected before the first one goes out.
"""
from __future__ import annotations

import base64
import json
import os
import time
from datetime import datetime, UTC

import zmq

from spotfinder_core.image import name_template
from spotfinder_core.result import FIELDS, Result

from .roll import HOST

SCHEMA = "spotfinder.v1"
SERVICE_COLLECTION = "service"  # the collection of messages that concern no collection (heartbeats)


def readable(path: str) -> str:
    """A path as text for JSON and topics: bytes that are not UTF-8 shown escaped (``\\xff``), so any consumer
    can parse it; ``file_bytes_b64`` carries such a name exactly."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def collection_of(path: str) -> str:
    """Folder + file template, e.g. ``/data/visit/thau_3_2_####.cbf``: all frames of one sweep or grid."""
    return readable(os.path.join(os.path.dirname(path), name_template(path)[0]))


def topic(kind: str, collection: str) -> str:
    return "%s.%s.%s" % (SCHEMA, kind, collection)


def envelope(kind: str, seq: int | None, collection: str | None) -> dict:
    """The fields every message has; ``seq`` only for stored messages (the ledger adds its id beside it)."""
    now = time.time()
    stamp = {} if seq is None else {"seq": seq}
    return {"schema": SCHEMA, "type": kind, **stamp,
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "host": HOST, "collection": collection}


def frame_message(seq: int, frame, result: dict, worker: str | None, t_start: float | None) -> tuple[str, dict]:
    """The ``result`` message of a frame (``frame`` is the ledger's record, ``result`` a Result.as_dict())."""
    body = envelope("result", seq, frame.collection)
    body.update({name: result.get(name) for name in FIELDS})
    body["file"] = readable(frame.path)
    if body["file"] != frame.path:  # a name that is not UTF-8: its exact bytes too
        body["file_bytes_b64"] = base64.b64encode(os.fsencode(frame.path)).decode()
    t_done = frame.t_done
    queue_ms = None
    if t_start is not None and frame.t_complete is not None:
        queue_ms = round(max(0.0, t_start - frame.t_complete) * 1000.0, 3)
    body.update({"t_seen": frame.t_seen, "t_complete": frame.t_complete, "t_done": t_done,
                 "queue_ms": queue_ms, "proc_ms": result.get("proc_ms"), "worker": worker, "tries": frame.tries})
    return topic("result", frame.collection), body


def failure_message(seq: int, frame, reason: str) -> tuple[str, dict]:
    """A frame the service gave up on (never complete, vanished, killed its workers): an error result."""
    failed = Result.failure(frame.path, reason, frame.frame_index)
    failed.image_number = image_number_of(frame)
    return frame_message(seq, frame, failed.as_dict(), None, None)


def image_number_of(frame) -> int | None:
    """A frame's (ledger record or watcher event) image number before any result says it: the one recorded for a
    frame of an HDF5 series (image_nr_low + index; a data file alone, its image_nr_low), else its index from 1,
    else the number in a CBF's name.  A series frame is named by its master, whose name holds no number."""
    number = getattr(frame, "image_number", None)
    if number is not None:
        return number
    index = getattr(frame, "frame_index", None)
    return name_template(frame.path)[1] if index is None else index + 1


def error_message(seq: int, text: str, collection: str | None = None, **fields) -> tuple[str, dict]:
    """A service-level error (a worker died, a frame was re-sent) that is not a frame's result."""
    body = envelope("error", seq, collection)
    body.update({"error": text, **fields})
    return topic("error", collection or SERVICE_COLLECTION), body


def heartbeat_message(**fields) -> tuple[str, dict]:
    """Not stored and without a seq: a seq is spent only on what /results serves."""
    body = envelope("heartbeat", None, None)
    body.update(fields)
    return topic("heartbeat", SERVICE_COLLECTION), body


class Publisher:
    """One PUB socket; a high send HWM so slow subscribers never block the pipeline (PUB drops instead)."""

    def __init__(self, *, context: zmq.Context, endpoint: str, hold_until: float = 0.0):
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 2000)  # close() flushes what is queued, for at most 2 s
        self.socket.bind(endpoint)
        self.hold_until = hold_until  # time.monotonic() before which messages are kept back
        self._held: list[dict] = []

    def send(self, message: dict) -> None:
        self._held.append(message)
        self.flush()

    def flush(self) -> None:
        """Send what is held, once the settle time has passed (called from the main loop too)."""
        if self._held and time.monotonic() >= self.hold_until:
            for message in self._held:
                self.socket.send_multipart([message["topic"].encode(), json.dumps(message["body"]).encode()])
            self._held.clear()

    def close(self) -> None:
        self.hold_until = 0.0  # stopping: what is held goes out now
        self.flush()
        self.socket.close()
