"""Service settings: embedded defaults, overridden by a YAML file, overridden by command-line flags.

Each setting is declared once, as a field of :class:`Settings` made by :func:`setting`: its type, default,
kind of value (with bounds or choices), the comments that document it in the example file, and its
``spotfinder serve`` flag if it has one.  Validation, the unknown-key check, the serve flags and the example
file (``spotfinder config --example``, kept as config/spotfinder.yaml) are all made from these declarations,
so they cannot drift apart.

Everything is validated here, once, so a bad setting stops the start with one clear message
(:class:`ConfigError`) instead of a traceback from deep inside a socket or a thread.  This module imports no
part of the analysis (``spotfinder stop`` and the other light commands load settings too).
"""
from __future__ import annotations

import itertools
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from spotfinder_core.params import ParameterError, parse_words


class ConfigError(ValueError):
    """A setting that cannot work; the message is meant for the user as it is."""


def default_state_dir() -> str:
    """systemd's StateDirectory= when set, else a per-user folder."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "spotfinder")


LOG_LEVELS = ("debug", "info", "warning", "error")
REMOTE_WORK_PORT, REMOTE_RESULTS_PORT = 5602, 5603  # what `spotfinder worker --connect HOST` connects to
IPC_PATH_MAX = 107  # bytes of an AF_UNIX socket path (sun_path) on Linux
_ENDPOINT = re.compile(r"^(tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})|ipc://.+)$")


def check_endpoint(name: str, value: object) -> str:
    m = _ENDPOINT.match(value) if isinstance(value, str) else None
    if not m or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise ConfigError("%s: bad ZeroMQ endpoint %r (expected tcp://HOST:PORT or ipc://PATH)" % (name, value))
    return value


def connect_endpoint(bound: str) -> str:
    """The address a local peer connects to for an endpoint we bind (``*`` and 0.0.0.0 mean any interface)."""
    return re.sub(r"^tcp://(\*|0\.0\.0\.0):", "tcp://127.0.0.1:", bound)


# ----- kinds of values ---------------------------------------------------------------------------------------
# Each check takes the setting's declaration and a raw value (from YAML, a flag or the default) and returns the
# value Settings holds, or raises ConfigError naming the setting.

def _check_boolean(declared: Setting, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError("%s: expected true or false, got %r" % (declared.name, value))
    return value


def _check_number(declared: Setting, value: object, integer: bool = False) -> float | int | None:
    if value is None and declared.nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError("%s: expected %s, got %r" % (declared.name, "an integer" if integer else "a number", value))
    if value < declared.minimum:
        raise ConfigError("%s: must be at least %g, got %r" % (declared.name, declared.minimum, value))
    return int(value) if integer else float(value)


def _check_integer(declared: Setting, value: object) -> int | None:
    return _check_number(declared, value, integer=True)


def _check_endpoint(declared: Setting, value: object) -> str:
    return check_endpoint(declared.name, value)


def _check_local_endpoint(declared: Setting, value: object) -> str:
    return value if value == "" else check_endpoint(declared.name, value)


def _check_address(declared: Setting, value: object) -> str:
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("%s: expected HOST:PORT, got %r" % (declared.name, value))
    return value


def _check_folders(declared: Setting, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError("%s: expected a list of folders, got %r" % (declared.name, value))
    out = []
    for folder in value:
        path = os.path.abspath(os.path.expanduser(folder))
        if not os.path.isdir(path):
            raise ConfigError("%s: folder %s does not exist" % (declared.name, folder))
        out.append(path)
    return tuple(dict.fromkeys(out))


def _check_state_folder(declared: Setting, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError("%s: expected a folder, got %r" % (declared.name, value))
    return os.path.abspath(os.path.expanduser(value or default_state_dir()))


def _check_words(declared: Setting, value: object) -> tuple[str, ...]:
    if isinstance(value, dict):  # {distl.res.outer: 4.9} reads more naturally in YAML than a word list
        value = ["%s=%s" % item for item in value.items()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise ConfigError("%s: expected a list of key=value words, got %r" % (declared.name, value))
    return tuple(value)


def _check_choice(declared: Setting, value: object) -> str:
    if value not in declared.choices:
        raise ConfigError("%s: expected one of %s, got %r" % (declared.name, ", ".join(declared.choices), value))
    return value


@dataclass(frozen=True, kw_only=True)
class Kind:
    """What values a setting takes: how one is checked and normalised, and how its serve flag reads one."""

    check: Callable[[Setting, object], object]
    flag_options: Mapping[str, object] = field(default_factory=dict)  # argparse's add_argument() options


BOOLEAN = Kind(check=_check_boolean, flag_options={"action": "store_true"})
NUMBER = Kind(check=_check_number, flag_options={"type": float})
INTEGER = Kind(check=_check_integer, flag_options={"type": int})
ENDPOINT = Kind(check=_check_endpoint)
LOCAL_ENDPOINT = Kind(check=_check_local_endpoint)  # "" = an ipc:// socket in the state folder
ADDRESS = Kind(check=_check_address)
FOLDERS = Kind(check=_check_folders, flag_options={"action": "append"})
STATE_FOLDER = Kind(check=_check_state_folder)
WORDS = Kind(check=_check_words)
CHOICE = Kind(check=_check_choice)


# ----- declarations ------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Section:
    """A part of the example file: a heading (none when empty), and a comment that closes it."""

    title: str = ""
    closing: str = ""


@dataclass(frozen=True, kw_only=True)
class Flag:
    """``spotfinder serve``'s flag for a setting: ``--name-with-dashes``; its help gets the default appended."""

    help: str
    metavar: str | None = None


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting's declaration; ``name`` and ``default`` are its field's in :class:`Settings`."""

    name: str = ""
    default: object = None
    kind: Kind
    section: Section
    minimum: float = 0.0  # numbers only
    nullable: bool = False  # numbers only: null is a value of its own (explained in the comments)
    choices: tuple[str, ...] = ()  # CHOICE only
    above: str = ""  # comment lines above the setting in the example file
    beside: str = ""  # comment on the setting's own line
    flag: Flag | None = None

    def check(self, value: object) -> object:
        return self.kind.check(self, value)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(default: object, **declaration) -> object:
    """A field of Settings carrying its declaration (see :class:`Setting` for the keywords)."""
    return field(default=default, metadata={"setting": Setting(**declaration)})


WATCHING = Section(title="What to watch")
SOCKETS = Section(title="Sockets")
WORKERS = Section(title="Workers", closing="""\
Maintenance: `kill -USR2 <service pid>` asks every local worker to stop after its current frame and keeps
them stopped (frames wait in the queue, no try is charged); a second SIGUSR2 starts them again.  While
paused the service reports itself unhealthy ("no live workers"), so under systemd's WatchdogSec= it is
restarted after that long: pause only when no frames are expected.""")
DELIVERY = Section(title="Delivery guarantees")
ONDEMAND = Section(title="On-demand queries (HTTP)")
ANALYSIS = Section(title="Analysis")
LOGGING = Section()


@dataclass(frozen=True, kw_only=True)
class Settings:
    """One validated, immutable set of service settings; each field is a setting's one declaration."""

    watch: tuple[str, ...] = setting(
        (), kind=FOLDERS, section=WATCHING, flag=Flag(help="folder to watch recursively (repeatable)", metavar="DIR"),
        above="""\
Folders watched recursively for *.cbf, *.cbf.gz and *.cbf.bz2 (also files renamed into place).
Frames already there when the service starts, and not yet in the ledger, are processed too.""",
        beside="e.g. [/dls/i24/data/2026/mx12345-1]")
    polling: bool = setting(
        False, kind=BOOLEAN, section=WATCHING, flag=Flag(help="poll the folders (NFS/GPFS) instead of inotify"),
        above="""\
Poll instead of using inotify.  Needed on NFS/GPFS/Lustre, where inotify does not see files written by
other hosts (the detector's writer).""")
    poll_interval_s: float = setting(
        1.0, kind=NUMBER, minimum=0.01, section=WATCHING,
        beside="how often the polling observer rescans (polling: true only)")
    incomplete_timeout_s: float = setting(
        30.0, kind=NUMBER, minimum=0.01, section=WATCHING, above="""\
A frame file that stops growing while its CBF binary section is incomplete, or that vanishes, is
published as an error result after this long (measured from its last growth).""")
    reconcile_interval_s: float = setting(
        60.0, kind=NUMBER, minimum=0.01, section=WATCHING, above="""\
How often the folders are rescanned for frame files no event announced (events lost to an inotify
overflow, files re-created under a name already analysed).  A frame file re-created under a known name (a
new inode, or a create/rename event) is analysed and published again; one written on in place is not.""")
    data_root: tuple[str, ...] = setting(
        (), kind=FOLDERS, section=WATCHING,
        flag=Flag(help="folder watched and queried frames must lie under (repeatable; default for HTTP queries: "
                       "the watched folders)", metavar="DIR"),
        above="""\
Folders every watched folder must lie under, and every frame an HTTP query names (compared after
resolving symlinks; a frame elsewhere is refused like a missing one).  [] = no limit on watched folders,
and HTTP queries may name frames under the watched folders only (none at all if nothing is watched).
distl.mp_spotfinder_server_read_file, which watches nothing, defaults to its working folder.""")

    pub: str = setting(
        "tcp://127.0.0.1:5601", kind=ENDPOINT, section=SOCKETS,
        flag=Flag(help="PUB endpoint to bind", metavar="ENDPOINT"),
        above="PUB socket for results, heartbeats and errors: topic spotfinder.v1.<type>.<collection>, JSON body.")
    http: str = setting(
        "127.0.0.1:8125", kind=ADDRESS, section=SOCKETS, flag=Flag(help="HTTP address", metavar="HOST:PORT"),
        above="""\
HTTP: GET /status, /results?since=SEQ, /metrics (Prometheus), the on-demand queries
(GET /spotfinder/distl.signal_strength?distl.image=FRAME&..., GET /api/v1/analyse?image=FRAME&...,
thin_client POST /spotfinder).  Loopback only unless you name another interface (e.g. 0.0.0.0:8125).""")
    http_timeout_s: float = setting(
        10.0, kind=NUMBER, minimum=0.01, section=SOCKETS,
        beside="a connection must deliver each whole request within this (idle ones are cut)")
    http_max_connections: int = setting(
        512, kind=INTEGER, minimum=1, section=SOCKETS, above="""\
Open connections served at once (a query waiting for a worker holds one, and a thread, but no CPU); more
get an immediate 503, except a few kept for GET /status and /metrics so they answer under any load.""")
    http_max_upload_bytes: int = setting(
        256 << 20, kind=INTEGER, minimum=1, section=SOCKETS, above="""\
Largest multipart POST body on DISTL's routes: pilatus_client and adsc_client push the frame's pixels
beside its filename (~100 MB for an EIGER 16M).  Only the form's small fields are kept; the pixels are
dropped as they stream in, and each MiB must arrive within http_timeout_s.  A larger body gets a 413.""")
    work_endpoint: str = setting(
        "", kind=LOCAL_ENDPOINT, section=SOCKETS, above="""\
Dispatcher PUSH socket (workers PULL frames here) and collector PULL socket (workers PUSH results here).
"" = an ipc:// socket in the state folder (work, results): local workers need no TCP port, and services
with their own state folders share a host.  For `spotfinder worker --connect HOST` on other hosts, bind
both on a reachable interface at the ports it expects: tcp://*:%d and tcp://*:%d."""
        % (REMOTE_WORK_PORT, REMOTE_RESULTS_PORT))
    results_endpoint: str = setting("", kind=LOCAL_ENDPOINT, section=SOCKETS)
    pub_settle_s: float = setting(
        0.5, kind=NUMBER, minimum=0.0, section=SOCKETS, above="""\
Seconds to hold messages back after binding, so subscribers that were connected before a restart have
reconnected.  PUB is best-effort (a subscriber that is away or too slow misses messages); the record is
GET /results?since=SEQ.  Stored messages are numbered 1, 2, 3... (seq, beside the ledger's id); heartbeats
take no seq and carry last_seq, the newest, so any gap in the seqs a subscriber saw is a message it missed.""")

    workers: int | None = setting(
        None, kind=INTEGER, minimum=0, nullable=True, section=WORKERS,
        flag=Flag(help="local worker processes (default: number of cores)", metavar="N"),
        beside="local worker processes; null = number of cores; 0 = remote workers only")
    heartbeat_interval_s: float = setting(
        1.0, kind=NUMBER, minimum=0.01, section=WORKERS, beside="worker heartbeats and the PUB heartbeat message")
    worker_liveness_s: float = setting(
        5.0, kind=NUMBER, minimum=0.01, section=WORKERS,
        beside="a worker not heard from for this long is presumed dead (>= 3 x heartbeat)")
    worker_start_s: float = setting(
        60.0, kind=NUMBER, minimum=0.01, section=WORKERS, above="""\
A local worker loads its compiled kernels (about 1 s) before it joins, or compiles them when numba's cache
is missing or stale (14 s measured on one free core, more with several workers per core).  One that has not
joined within worker_liveness_s plus this is killed and replaced, and its next start is allowed twice as long.""")
    worker_memory_mb: int | None = setting(
        1024, kind=INTEGER, minimum=512, nullable=True, section=WORKERS, above="""\
The budget of each worker for one frame, sent with each job so remote workers follow it too.  Memory: the
worker's data (its heap and private mappings, RLIMIT_DATA) may not grow past this; a frame needing more is
one error result "out of memory (budget N MB)", and the worker goes on (or leaves for a fresh one when the
analysis could not free that frame's arrays).  A worker holds ~250 MB of its own; with an EIGER2 16M frame it
peaks at ~650 MB, with a PILATUS 6M frame at ~400 MB.  null = no limit.""")
    worker_frame_s: float | None = setting(
        30.0, kind=NUMBER, minimum=0.01, nullable=True, section=WORKERS, above="""\
Time: a frame still running after this long is one error result, not sent again; its worker leaves and a
fresh one starts (a PILATUS 6M frame takes ~0.2 s).  It acts only below frame_timeout_s, which stays for
workers that stop answering altogether.  null = no limit.""")

    state_dir: str = setting(
        "", kind=STATE_FOLDER, section=DELIVERY, flag=Flag(help="folder of the ledger", metavar="DIR"),
        beside='ledger folder; "" = $STATE_DIRECTORY (systemd) or ~/.local/state/spotfinder')
    dispatch_timeout_s: float = setting(
        10.0, kind=NUMBER, minimum=0.01, section=DELIVERY,
        beside="a sent frame no worker has started by then is sent again")
    frame_timeout_s: float = setting(
        300.0, kind=NUMBER, minimum=0.01, section=DELIVERY,
        beside="a started frame not finished by then is sent again (its worker hung)")
    max_tries: int = setting(
        3, kind=INTEGER, minimum=1, section=DELIVERY,
        beside="a frame whose worker died or hung this many times is published as failed")
    drain_timeout_s: float = setting(
        30.0, kind=NUMBER, minimum=0.01, section=DELIVERY,
        beside="on SIGTERM, how long to wait for frames in flight before handing them back")
    collection_quiet_s: float = setting(
        60.0, kind=NUMBER, minimum=0.1, section=DELIVERY, above="""\
A collection (a folder + file template, or an HDF5 series) ends when all its expected frames are done, or,
when no count is known or frames are missing, after this long without a new frame: its `end` message
then gives the completeness and the missing numbers.""")
    retention_days: float = setting(
        30.0, kind=NUMBER, minimum=0.0, section=DELIVERY, above="""\
Frames finished longer ago than this, and their stored messages (GET /results), are forgotten; frame files
older than this are not caught up at start either.  0 = keep everything.""")

    ondemand_queue: int = setting(
        256, kind=INTEGER, minimum=1, section=ONDEMAND, above="""\
They go to the same workers, ahead of the watched frames' backlog, and wait like Apache's clients did
until a worker is free: a query is taken while the queries ahead of it x the recent time per frame /
the workers leave it its answer within ondemand_timeout_s.  Beyond that, with no worker running, or
while this many queries already wait (queued or at a worker; each holds an HTTP connection), it is
answered 503 at once, with a Retry-After from the same estimate.""")
    ondemand_timeout_s: float = setting(
        120.0, kind=NUMBER, minimum=0.01, section=ONDEMAND,
        beside="a query with no result after this long is answered 504")

    parameters: tuple[str, ...] = setting(
        (), kind=WORDS, section=ANALYSIS, above="""\
DISTL parameters applied to every frame, as key=value words (or a mapping), e.g. [distl.res.outer=2.0].
They are also the defaults an on-demand query overrides (DISTL's POST ignores distl.res.outer/inner).""")
    verify_md5: bool = setting(
        True, kind=BOOLEAN, section=ANALYSIS, above="""\
Check each frame's pixels against the Content-MD5 in its header (DISTL does not): a corrupt section of the
right size becomes an error result instead of wrong numbers.  It costs ~10 ms of CPU per PILATUS 6M frame
(~15% of its analysis); turn it off only on a host that cannot otherwise keep up.  Truncated frames and
wrong pixel counts are refused either way.  Sent with each job, so remote workers follow it too.""")

    log_level: str = setting(
        "info", kind=CHOICE, choices=LOG_LEVELS, section=LOGGING, flag=Flag(help="log level"),
        beside="debug, info, warning or error (stderr, one line per event)")

    @property
    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers is None else self.workers

    @property
    def ondemand_roots(self) -> tuple[str, ...]:
        """The folders HTTP queries may name frames in: the data roots, else the watched folders."""
        return self.data_root or self.watch

    @property
    def http_address(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host, int(port)

    def params(self):
        """The DISTL parameters applied to every frame."""
        return parse_words(self.parameters)


SETTINGS: tuple[Setting, ...] = tuple(replace(f.metadata["setting"], name=f.name, default=f.default)
                                      for f in fields(Settings))
KEYS = tuple(declared.name for declared in SETTINGS)


# ----- checks across settings --------------------------------------------------------------------------------

def liveness_outlasts_heartbeats(values: dict) -> None:
    if values["worker_liveness_s"] < 3 * values["heartbeat_interval_s"]:
        raise ConfigError("worker_liveness_s (%g) must be at least 3 x heartbeat_interval_s (%g), or live workers "
                          "would be presumed dead between two heartbeats"
                          % (values["worker_liveness_s"], values["heartbeat_interval_s"]))


def local_endpoints_in_state_folder(values: dict) -> None:
    """Resolve the work and results endpoints left "" to ipc:// sockets in the state folder."""
    for name in ("work_endpoint", "results_endpoint"):
        if values[name] == "":
            path = os.path.join(values["state_dir"], name.split("_")[0])
            if len(os.fsencode(path)) > IPC_PATH_MAX:
                raise ConfigError("%s: the state folder's path is too long for an ipc:// socket in it (%s); set "
                                  "%s to a tcp:// or shorter ipc:// endpoint" % (name, path, name))
            values[name] = "ipc://" + path


def endpoints_differ(values: dict) -> None:
    if len({values["pub"], values["work_endpoint"], values["results_endpoint"]}) < 3:
        raise ConfigError("pub, work_endpoint and results_endpoint must be three different endpoints")


def watch_inside_data_root(values: dict) -> None:
    for folder in values["watch"]:
        if values["data_root"] and not any(Path(folder).is_relative_to(root) for root in values["data_root"]):
            raise ConfigError("watch: folder %s is outside every data_root" % folder)


def parameters_parse(values: dict) -> None:
    try:
        parse_words(values["parameters"])
    except ParameterError as exc:
        raise ConfigError("parameters: %s" % exc) from None


CHECKS = (liveness_outlasts_heartbeats, local_endpoints_in_state_folder, endpoints_differ, watch_inside_data_root,
          parameters_parse)


def validate(raw: dict) -> Settings:
    """Settings from a dict of raw values (defaults for what is missing); ConfigError on the first problem."""
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError("unknown setting %r (known settings: %s)" % (unknown[0], ", ".join(KEYS)))
    values = {declared.name: declared.check(raw.get(declared.name, declared.default)) for declared in SETTINGS}
    for check in CHECKS:
        check(values)
    return Settings(**values)


def read_file(path: str) -> dict:
    """The settings a YAML file sets; ConfigError if it is missing or not a mapping."""
    import yaml  # here, not at the top: the light commands (--help, stop, listen) start without it (~9 ms)

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror or exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " (line %d)" % (mark.line + 1) if mark else ""
        raise ConfigError("config file %s is not valid YAML%s" % (path, where)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file %s: expected a mapping of settings at the top level" % path)
    return data


def load(config_file: str | None = None, overrides: dict | None = None) -> Settings:
    """Defaults, then the file, then the flags that were given (None means not given)."""
    raw = read_file(config_file) if config_file else {}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate(raw)


# ----- the serve flags and the example file ------------------------------------------------------------------

FLAGGED = tuple(declared for declared in SETTINGS if declared.flag)


def add_flags(parser) -> None:
    """``spotfinder serve``'s flag for each setting that has one; each defaults to None (not given)."""
    for declared in FLAGGED:
        default = declared.check(declared.default)  # as the service will use it (state_dir: the folder)
        shown = default not in (None, "", ()) and not isinstance(default, bool)
        options = dict(declared.kind.flag_options, dest=declared.name, default=None,
                       help="%s (default %s)" % (declared.flag.help, default) if shown else declared.flag.help)
        if declared.flag.metavar:
            options["metavar"] = declared.flag.metavar
        if declared.choices:
            options["choices"] = declared.choices
        parser.add_argument(declared.option, **options)


def flag_overrides(args) -> dict:
    """The settings given as serve flags, by name (None where a flag was not given)."""
    return {declared.name: getattr(args, declared.name) for declared in FLAGGED}


EXAMPLE_WIDTH = 107
BESIDE_COLUMN = 32
EXAMPLE_HEADER = """\
spotfinder serve: every setting, with its embedded default.

No file is needed: these defaults are built in.  `spotfinder serve --config FILE` reads a file like this \
one; command-line flags (%s) override it.  An unknown key, a bad endpoint or a missing folder stops the \
start with one line on stderr and exit status 2.  Durations are in seconds."""


def _comment(text: str) -> list[str]:
    return [("# " + line).rstrip() for line in text.splitlines()]


def _yaml_value(value: object) -> str:
    """A default as the example file writes it: flow style, and "" for the empty string."""
    if value == "":
        return '""'
    import yaml

    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain, default_flow_style=True).removesuffix("...\n").strip()


def example() -> str:
    """The documented example settings file: every setting with its default and comments, section by section."""
    title, _, paragraph = EXAMPLE_HEADER.partition("\n\n")
    paragraph %= ", ".join(declared.option for declared in FLAGGED)
    lines = _comment(title) + ["#"] + _comment(textwrap.fill(paragraph, EXAMPLE_WIDTH - 2, break_on_hyphens=False))
    for section, members in itertools.groupby(SETTINGS, key=lambda declared: declared.section):
        lines.append("")
        if section.title:
            lines.append(("# --- %s " % section.title).ljust(EXAMPLE_WIDTH, "-"))
        for declared in members:
            lines += _comment(declared.above)
            line = "%s: %s" % (declared.name, _yaml_value(declared.default))
            lines.append(line.ljust(BESIDE_COLUMN) + "# " + declared.beside if declared.beside else line)
        lines += _comment(section.closing)
    return "\n".join(lines) + "\n"
