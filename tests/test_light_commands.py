"""Commands that analyse no frame start without the numerical stack (numpy, numba: about half a second).

Each command runs in a fresh interpreter through the function its console script calls; the interpreter then
reports which heavy modules were loaded.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service_helpers import REPO, child_env, free_port

HEAVY = ("numpy", "scipy", "numba", "spotfinder_core.analysis", "spotfinder_core.image")
PROBE = """
import json, sys
from spotfinder_daemon.cli import {function} as entry_point
try:
    entry_point(sys.argv[2:])
except SystemExit:
    pass
loaded = sorted(name for name in sys.modules if name in {heavy} or name.split(".")[0] in {heavy})
with open(sys.argv[1], "w") as out:
    json.dump(loaded, out)
"""
SUBCOMMANDS = ("find", "serve", "worker", "listen", "replay", "stop", "config")


def heavy_modules_loaded(tmp_path, function: str, *args: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    report = tmp_path / "loaded.json"
    code = PROBE.format(function=function, heavy=heavy)
    subprocess.run([sys.executable, "-c", code, str(report), *args], capture_output=True, env=child_env(), timeout=60,
                   cwd=tmp_path)
    return json.loads(report.read_text())


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in SUBCOMMANDS]],
                         ids=lambda args: " ".join(args))
def test_help_is_light(tmp_path, args):
    assert heavy_modules_loaded(tmp_path, "main", *args) == []


def test_stop_without_a_service_is_light(tmp_path):
    assert heavy_modules_loaded(tmp_path, "main", "stop", "--state-dir", str(tmp_path)) == []


def test_listen_is_light(tmp_path):
    endpoint = "tcp://127.0.0.1:%d" % free_port()
    assert heavy_modules_loaded(tmp_path, "main", "listen", endpoint, "--timeout", "0.2") == []


def test_config_example_and_a_refused_serve_are_light(tmp_path):
    assert heavy_modules_loaded(tmp_path, "main", "config", "--example") == []
    assert heavy_modules_loaded(tmp_path, "main", "serve", "--state-dir", str(tmp_path), "--watch", "/no/such") == []


def test_replay_with_a_template_is_light(tmp_path, make_frame):
    make_frame(str(tmp_path / "a_00001.cbf"))
    (tmp_path / "out").mkdir()
    assert heavy_modules_loaded(tmp_path, "main", "replay", str(tmp_path / "a_00001.cbf"), "--to",
                                str(tmp_path / "out"), "--template", "b_#####.cbf") == []
    assert (tmp_path / "out" / "b_00001.cbf").is_file()


@pytest.mark.parametrize("function, args", [("distl_signal_strength", ["--help"]), ("distl_thin_client", []),
                                            ("distl_mp_spotfinder_server_read_file", ["--help"])])
def test_distl_usage_is_light(tmp_path, function, args):
    assert heavy_modules_loaded(tmp_path, function, *args) == []


def test_loading_settings_is_light(tmp_path):
    code = ("import sys; from spotfinder_daemon.config import load; load(%r)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'scipy', 'numba')))"
            % str(REPO / "config" / "spotfinder.yaml"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_the_probe_sees_an_analysis(tmp_path, simulated):
    """A frame analysed loads the numerical stack (the probe above would notice it), and not the HTTP client
    only distl.thin_client needs (with ssl and email, ~10 ms of a one-shot command's start)."""
    loaded = heavy_modules_loaded(tmp_path, "distl_signal_strength", str(simulated["paths"]["blank"]),
                                  heavy=(*HEAVY, "http.client"))
    assert {"numpy", "numba", "spotfinder_core.analysis"} <= set(loaded)
    assert "http.client" not in loaded
