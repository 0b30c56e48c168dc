"""The messages between the service and its workers, declared once: their types, the wire format, the checks.

The service sends a :class:`Job` (the dispatcher, for watched frames and on-demand queries alike); a worker
sends the collector its reports: :class:`Ready` once, :class:`Started` when it takes a job, :class:`Result`
when it is done, a :class:`Heartbeat` every second (``busy`` names the job it holds), :class:`Bye` as it
leaves.  A job and the reports about it name it by ``lane`` and ``id``: ``watch`` jobs are watched-folder
frames with their ledger id, ``query`` jobs on-demand HTTP queries numbered by the lane's own counter, so
an id is unique within its lane only.

On the wire each message is one ZeroMQ frame of UTF-8 JSON, an object with the protocol version ``v``
and the message ``type`` besides the fields of its class, for example::

    {"v": 1, "type": "job", "lane": "watch", "id": 42,
     "frame": {"path": "/data/x_00001.cbf", "index": null},
     "params": {"distl.res.outer": 2.0, "distl.scanbox_windows": [101, 51, 51]},
     "verify_md5": true, "reply": null, "roots": ["/data"], "budget_mb": 1024, "budget_s": 30.0}
    {"v": 1, "type": "heartbeat", "worker": "host:1a2b3c4d5e6f", "pid": 4711, "host": "host",
     "busy": {"lane": "query", "id": 3}}

``params`` holds the explicitly set DISTL parameters by full path, each value checked against the kind
the parameter table declares (tuples travel as arrays and come back as tuples).  Fields a message does
not declare are ignored; a message of another version, an unknown type, a missing or ill-typed field is
refused with one :class:`ProtocolError` naming the reason, because the results endpoint may face other
hosts, and a worker of another version must be turned away rather than misread.

A job's ``roots`` are the folders its frame must really lie in (the data roots, the watched folders): the
worker opens the frame once, checks where the *opened* file lies, and analyses that open file, so a symlink
flipped between the service's check and the worker's open cannot smuggle in a file from elsewhere.  A frame
refused there gets an error result whose ``error`` is one of :data:`REFUSALS`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar, NoReturn

from spotfinder_core import Params
from spotfinder_core.params import BY_PATH

VERSION = 1
WATCH = "watch"  # frames of the watched folders, ids from the ledger
QUERY = "query"  # on-demand HTTP queries, ids from the lane's counter
LANES = (WATCH, QUERY)
REPLIES = ("body", "post", "bcsb")  # DISTL's GET text, its short POST text, its Apache BCSB XML
# The error of a frame the worker refused to open (the same verdicts as the service's own path check).
REFUSALS = {"outside": "not a file inside the allowed folders", "missing": "not a readable file"}


def inside(real: str, roots: tuple[str, ...]) -> bool:
    """Whether a resolved path lies inside one of the (resolved) roots: what a job's ``roots`` mean, for the
    service's check before it sends a query and the worker's check of the file it opened."""
    return any(os.path.commonpath((real, root)) == root for root in roots)


class ProtocolError(ValueError):
    """A message that cannot be read; ``job`` names the job it was about when that much could be read, so
    a worker can still answer it with an error result."""

    def __init__(self, reason: str, *, job: JobKey | None = None):
        super().__init__(reason)
        self.job = job


@dataclass(frozen=True, kw_only=True)
class JobKey:
    """A job's name across the service: its lane and its id within that lane."""

    lane: str
    id: int


@dataclass(frozen=True, kw_only=True)
class FrameRef:
    """A frame by file and place in it: ``index`` is None for a single-frame file (CBF), else the 0-based
    number of the frame inside a multi-frame file (EIGER HDF5: the series' master, whose data files the
    worker's reader finds beside it)."""

    path: str
    index: int | None = None


@dataclass(frozen=True, kw_only=True)
class Job:
    """Service -> worker: analyse one frame; ``reply`` asks for DISTL's text as well (``body`` or ``post``);
    ``roots``: the folders the opened frame must really lie in (None: no check); ``budget_mb`` and ``budget_s``:
    the worker's memory and time budget for it (None: none), sent with the job so remote workers follow them."""

    TYPE: ClassVar[str] = "job"
    lane: str
    id: int
    frame: FrameRef
    params: Params
    verify_md5: bool = True
    reply: str | None = None
    roots: tuple[str, ...] | None = None
    budget_mb: int | None = None
    budget_s: float | None = None

    @property
    def key(self) -> JobKey:
        return JobKey(lane=self.lane, id=self.id)


@dataclass(frozen=True, kw_only=True)
class Report:
    """Worker -> collector: every report names its worker; ``pid`` and ``host`` are for the roll and /status."""

    TYPE: ClassVar[str]
    worker: str
    pid: int | None = None
    host: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ready(Report):
    TYPE: ClassVar[str] = "ready"


@dataclass(frozen=True, kw_only=True)
class JobReport(Report):
    """A report about one job, named by its lane and id; ``t_start``: when the worker started it (wall clock)."""

    lane: str
    id: int
    t_start: float | None = None

    @property
    def key(self) -> JobKey:
        return JobKey(lane=self.lane, id=self.id)


@dataclass(frozen=True, kw_only=True)
class Started(JobReport):
    TYPE: ClassVar[str] = "started"


@dataclass(frozen=True, kw_only=True)
class Result(JobReport):
    """The analysis result as ``Result.as_dict()`` gives it, and the text the job asked for."""

    TYPE: ClassVar[str] = "result"
    result: dict
    text: str | None = None


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Report):
    TYPE: ClassVar[str] = "heartbeat"
    busy: JobKey | None = None


@dataclass(frozen=True, kw_only=True)
class Bye(Report):
    TYPE: ClassVar[str] = "bye"


Message = Job | Report
REPORTS: dict[str, type[Report]] = {cls.TYPE: cls for cls in (Ready, Started, Result, Heartbeat, Bye)}


# ----- encoding ------------------------------------------------------------------------------------------------
def encode_params(params: Params) -> dict[str, object]:
    """The explicitly set parameters, as JSON values."""
    return {path: list(value) if isinstance(value, tuple) else value for path, value in params.explicit().items()}


def _plain(value):
    """JSON for the numpy scalars an analysis may leave in its result."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError("%s is not JSON serializable" % type(value).__name__)


def _wire_value(value: object) -> object:
    if isinstance(value, Params):
        return encode_params(value)
    if isinstance(value, (JobKey, FrameRef)):
        return asdict(value)
    return value


def encode(message: Message) -> bytes:
    """One message as the bytes of its ZeroMQ frame; TypeError or ValueError for a value JSON cannot hold."""
    body = {"v": VERSION, "type": message.TYPE}
    body.update((f.name, _wire_value(getattr(message, f.name))) for f in fields(message))
    return json.dumps(body, default=_plain).encode()


# ----- decoding: what each wire field may hold -----------------------------------------------------------------
def _fail(name: str, value: object, expected: str) -> NoReturn:
    raise ProtocolError("bad %s %.80r: expected %s" % (name, value, expected))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _worker_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        _fail(name, value, "a non-empty worker id")
    return value


def _optional(check: Callable[[object], bool], expected: str) -> Callable[[str, object], object]:
    def read(name: str, value: object) -> object:
        if value is not None and not check(value):
            _fail(name, value, expected + " or null")
        return value
    return read


def _lane(name: str, value: object) -> str:
    if value not in LANES:
        _fail(name, value, " or ".join(LANES))
    return value


def _job_id(name: str, value: object) -> int:
    if not _is_int(value):
        _fail(name, value, "an integer")
    return value


def _object(name: str, value: object) -> dict:
    if not isinstance(value, dict):
        _fail(name, value, "an object")
    return value


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "true or false")
    return value


def _reply(name: str, value: object) -> str | None:
    if value is not None and value not in REPLIES:
        _fail(name, value, " or ".join(REPLIES) + " or null")
    return value


def _roots(name: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        _fail(name, value, "a list of absolute folder paths or null")
    return tuple(value)


def _busy(name: str, value: object) -> JobKey | None:
    if value is None:
        return None
    value = _object(name, value)
    return JobKey(lane=_lane("busy.lane", value.get("lane")), id=_job_id("busy.id", value.get("id")))


def _frame(name: str, value: object) -> FrameRef:
    value = _object(name, value)
    path, index = value.get("path"), value.get("index")
    if not isinstance(path, str) or not path:
        _fail("frame.path", path, "a file path")
    if index is not None and (not _is_int(index) or index < 0):
        _fail("frame.index", index, "a frame number from 0, or null")
    return FrameRef(path=path, index=index)


# Parameter kinds of spotfinder_core.params -> whether a JSON value is one; any parameter may be None.
_KINDS: dict[str, Callable[[object], bool]] = {
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "float": _is_number,
    "ints": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "floats": lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
}


def decode_params(values: object) -> Params:
    """Parameters from their JSON form: known paths only, each value of its declared kind; arrays become tuples."""
    values = _object("params", values)
    decoded = {}
    for path, value in values.items():
        param = BY_PATH.get(path)
        if param is None:
            raise ProtocolError("unknown parameter %.80r" % path)
        if value is not None and not _KINDS[param.kind](value):
            _fail(path, value, "a value of kind %s" % param.kind)
        decoded[path] = tuple(value) if isinstance(value, list) else value
    return Params(decoded)


FIELDS: dict[str, Callable[[str, object], object]] = {
    "worker": _worker_id,
    "pid": _optional(_is_int, "an integer"),
    "host": _optional(lambda v: isinstance(v, str), "a string"),
    "lane": _lane,
    "id": _job_id,
    "t_start": _optional(_is_number, "a number"),
    "result": _object,
    "text": _optional(lambda v: isinstance(v, str), "a string"),
    "busy": _busy,
    "frame": _frame,
    "params": lambda name, value: decode_params(value),
    "verify_md5": _boolean,
    "reply": _reply,
    "roots": _roots,
    "budget_mb": _optional(lambda v: _is_int(v) and v > 0, "a positive integer"),
    "budget_s": _optional(lambda v: _is_number(v) and v > 0, "a positive number"),
}


def _body(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("not a JSON object")
    if "v" not in body:
        raise ProtocolError("no protocol version (v); this end speaks %d" % VERSION)
    if body["v"] != VERSION:
        raise ProtocolError("protocol version %.20r; this end speaks %d" % (body["v"], VERSION))
    return body


def _build(cls: type[Message], body: dict, job: JobKey | None = None) -> Message:
    values = {}
    for f in fields(cls):
        if f.name in body:
            try:
                values[f.name] = FIELDS[f.name](f.name, body[f.name])
            except ProtocolError as exc:
                raise ProtocolError(str(exc), job=job) from None
        elif f.default is MISSING:
            raise ProtocolError("%s message without %s" % (cls.TYPE, f.name), job=job)
    return cls(**values)


def decode_job(data: bytes) -> Job:
    """The job in a message from the service; ProtocolError (with ``job`` once lane and id are read) if none."""
    body = _body(data)
    if body.get("type") != Job.TYPE:
        raise ProtocolError("not a job: type %.40r" % (body.get("type"),))
    try:
        key = JobKey(lane=_lane("lane", body.get("lane")), id=_job_id("id", body.get("id")))
    except ProtocolError:
        key = None
    return _build(Job, body, key)


def decode_report(data: bytes) -> Report:
    """The report in a message from a worker; ProtocolError if it is none."""
    body = _body(data)
    cls = REPORTS.get(body.get("type"))
    if cls is None:
        raise ProtocolError("unknown type %.40r" % (body.get("type"),))
    return _build(cls, body)
