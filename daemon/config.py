"""Service settings: embedded defaults, overridden by a YAML file, overridden by command-line flags.

Everything is validated here, once, so a bad setting stops the start with one clear message
(:class:`ConfigError`) instead of a traceback from deep inside a socket or a thread.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from spotfinder_core import ParameterError, parse_words


class ConfigError(ValueError):
    """A setting that cannot work; the message is meant for the user as it is."""


def default_state_dir() -> str:
    """systemd's StateDirectory= when set, else a per-user folder."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "spotfinder")


@dataclass(frozen=True)
class Settings:
    """One validated, immutable set of service settings (see config/spotfinder.yaml for each one)."""

    watch: tuple[str, ...] = ()
    polling: bool = False
    poll_interval_s: float = 1.0
    incomplete_timeout_s: float = 30.0
    reconcile_interval_s: float = 60.0
    pub: str = "tcp://127.0.0.1:5601"
    http: str = "127.0.0.1:8125"
    work_endpoint: str = "tcp://127.0.0.1:5602"
    results_endpoint: str = "tcp://127.0.0.1:5603"
    workers: int | None = None
    state_dir: str = ""
    data_root: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    dispatch_timeout_s: float = 10.0
    frame_timeout_s: float = 300.0
    max_tries: int = 3
    worker_liveness_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    retention_days: float = 30.0
    pub_settle_s: float = 0.5
    ondemand_queue: int | None = None
    ondemand_timeout_s: float = 120.0
    http_timeout_s: float = 10.0
    http_max_connections: int = 128
    log_level: str = "info"
    verify_md5: bool = True

    @property
    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers is None else self.workers

    @property
    def ondemand_capacity(self) -> int:
        """How many HTTP queries may wait for a worker before more are refused with 503."""
        return 2 * max(self.worker_count, 1) + 8 if self.ondemand_queue is None else self.ondemand_queue

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


KEYS = tuple(f.name for f in fields(Settings))
LOG_LEVELS = ("debug", "info", "warning", "error")
_ENDPOINT = re.compile(r"^(tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})|ipc://.+)$")


def check_endpoint(name: str, value: object) -> str:
    m = _ENDPOINT.match(value) if isinstance(value, str) else None
    if not m or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise ConfigError("%s: bad ZeroMQ endpoint %r (expected tcp://HOST:PORT or ipc://PATH)" % (name, value))
    return value


def connect_endpoint(bound: str) -> str:
    """The address a local peer connects to for an endpoint we bind (``*`` and 0.0.0.0 mean any interface)."""
    return re.sub(r"^tcp://(\*|0\.0\.0\.0):", "tcp://127.0.0.1:", bound)


def _number(name: str, value: object, kind=float, minimum: float = 0.0, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError("%s: expected %s, got %r" % (name, "an integer" if kind is int else "a number", value))
    if value < minimum:
        raise ConfigError("%s: must be at least %g, got %r" % (name, minimum, value))
    return kind(value)


def _folders(name: str, value: object, must_exist: bool = True) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError("%s: expected a list of folders, got %r" % (name, value))
    out = []
    for folder in value:
        path = os.path.abspath(os.path.expanduser(folder))
        if must_exist and not os.path.isdir(path):
            raise ConfigError("%s: folder %s does not exist" % (name, folder))
        out.append(path)
    return tuple(dict.fromkeys(out))


def validate(raw: dict) -> Settings:
    """Settings from a dict of raw values (defaults for what is missing); ConfigError on the first problem."""
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError("unknown setting %r (known settings: %s)" % (unknown[0], ", ".join(KEYS)))
    values = {f.name: f.default for f in fields(Settings)}
    values.update(raw)
    for name in ("polling", "verify_md5"):
        if not isinstance(values[name], bool):
            raise ConfigError("%s: expected true or false, got %r" % (name, values[name]))
    for key in ("poll_interval_s", "incomplete_timeout_s", "reconcile_interval_s", "dispatch_timeout_s",
                "frame_timeout_s", "worker_liveness_s", "heartbeat_interval_s", "drain_timeout_s", "pub_settle_s",
                "ondemand_timeout_s", "http_timeout_s", "retention_days"):
        values[key] = _number(key, values[key], minimum=0.0 if key in ("pub_settle_s", "retention_days") else 0.01)
    if values["worker_liveness_s"] < 3 * values["heartbeat_interval_s"]:
        raise ConfigError("worker_liveness_s (%g) must be at least 3 x heartbeat_interval_s (%g), or live workers "
                          "would be presumed dead between two heartbeats"
                          % (values["worker_liveness_s"], values["heartbeat_interval_s"]))
    values["workers"] = _number("workers", values["workers"], int, 0, allow_none=True)
    values["ondemand_queue"] = _number("ondemand_queue", values["ondemand_queue"], int, 1, allow_none=True)
    values["http_max_connections"] = _number("http_max_connections", values["http_max_connections"], int, 1)
    values["max_tries"] = _number("max_tries", values["max_tries"], int, 1)
    for key in ("pub", "work_endpoint", "results_endpoint"):
        check_endpoint(key, values[key])
    if len({values["pub"], values["work_endpoint"], values["results_endpoint"]}) < 3:
        raise ConfigError("pub, work_endpoint and results_endpoint must be three different endpoints")
    http = values["http"]
    host, _, port = http.rpartition(":") if isinstance(http, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("http: expected HOST:PORT, got %r" % (http,))
    values["data_root"] = _folders("data_root", values["data_root"])
    values["watch"] = _folders("watch", values["watch"])
    for folder in values["watch"]:
        if values["data_root"] and not any(Path(folder).is_relative_to(root) for root in values["data_root"]):
            raise ConfigError("watch: folder %s is outside every data_root" % folder)
    if not isinstance(values["state_dir"], str):
        raise ConfigError("state_dir: expected a folder, got %r" % (values["state_dir"],))
    values["state_dir"] = os.path.abspath(os.path.expanduser(values["state_dir"] or default_state_dir()))
    words = values["parameters"]
    if isinstance(words, dict):  # {distl.res.outer: 4.9} reads more naturally in YAML than a word list
        words = ["%s=%s" % (k, v) for k, v in words.items()]
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise ConfigError("parameters: expected a list of key=value words, got %r" % (words,))
    try:
        parse_words(words)
    except ParameterError as exc:
        raise ConfigError("parameters: %s" % exc) from None
    values["parameters"] = tuple(words)
    if values["log_level"] not in LOG_LEVELS:
        raise ConfigError("log_level: expected one of %s, got %r" % (", ".join(LOG_LEVELS), values["log_level"]))
    return Settings(**values)


def read_file(path: str) -> dict:
    """The settings a YAML file sets; ConfigError if it is missing or not a mapping."""
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
