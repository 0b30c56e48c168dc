"""The one-shot command's warm helper (spotfinder_daemon.warm), run for real: the console script starts it,
later calls are answered by it on their own streams with the same bytes and status, and it leaves when its
sources change, when it has been idle, or when told to.

Every test has a runtime folder of its own (XDG_RUNTIME_DIR) and stops what it started; the rest of the suite
runs with SPOTFINDER_WARM=0 (conftest.py), so that no other test leaves a helper behind.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from service_helpers import child_env, entry_point_command

START_S = 180.0  # a helper's start: imports and kernels from numba's cache (~1 s), compiling them when cold


class Helper:
    """The folder a helper lives in, and the console script run against it."""

    def __init__(self, runtime: Path, idle_s: str):
        self.runtime = runtime
        self.env = child_env(SPOTFINDER_WARM=idle_s, XDG_RUNTIME_DIR=str(runtime))

    def call(self, *args: str, cwd: Path | None = None, **env: str) -> tuple[subprocess.CompletedProcess, int]:
        """The console script's outcome, and its pid."""
        process = subprocess.Popen(entry_point_command("distl_signal_strength", *args), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env={**self.env, **env}, cwd=cwd)
        out, err = process.communicate(timeout=300)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err), process.pid

    def files(self, suffix: str) -> list[Path]:
        return sorted((self.runtime / "spotfinder-daemon").glob("warm-*" + suffix))

    def log(self) -> str:
        return "".join(path.read_text() for path in self.files(".log"))

    def pid(self) -> int | None:
        """The running helper's pid, once it is ready to take calls."""
        sockets = self.files(".sock")
        if not sockets or "ready" not in self.log():
            return None
        return int(Path(str(sockets[0])[:-len(".sock")] + ".lock").read_text().split()[0])

    def wait_ready(self) -> int:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None:
                return pid
            assert "Traceback" not in self.log(), self.log()
            time.sleep(0.1)
        raise AssertionError("no helper became ready within %g s; its log: %r" % (START_S, self.log()))

    def stop(self) -> None:
        for lock in self.files(".lock"):
            try:
                pid = int(lock.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (ValueError, IndexError, OSError):
                continue
            gone(pid, 30.0) or os.kill(pid, signal.SIGKILL)


def gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def runtime():
    """A runtime folder short enough for a socket's address (pytest's own folders are not)."""
    folder = Path(tempfile.mkdtemp(prefix="sfwarm-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def helper(runtime):
    made = Helper(runtime, "120")
    yield made
    made.stop()


def test_a_later_call_is_answered_by_the_helper_with_the_same_bytes(helper, simulated, tmp_path):
    frame = simulated["paths"]["spots"]
    # by a relative name: the helper's child works in its caller's folder
    first, _ = helper.call(frame.name, "distl.bins.verbose=True", cwd=frame.parent)
    assert first.returncode == 0, first.stderr
    assert b"Spot Total" in first.stdout
    pid = helper.wait_ready()
    second, caller = helper.call(frame.name, "distl.bins.verbose=True", cwd=frame.parent)
    assert (second.returncode, second.stdout, second.stderr) == (first.returncode, first.stdout, first.stderr)
    assert re.search(r"call 1 from pid %d\b" % caller, helper.log()), helper.log()
    # bad input: the same one-line complaint and status as in the caller's own process
    broken = tmp_path / "broken_0001.cbf"
    broken.write_bytes(frame.read_bytes()[:-70000])
    served, _ = helper.call(str(broken))
    own, _ = helper.call(str(broken), SPOTFINDER_WARM="0")
    assert served.returncode == own.returncode == 2
    assert served.stderr == own.stderr and b"truncated" in served.stderr
    assert (served.stdout, own.stdout) == (b"", b"")
    assert "call 2 from pid" in helper.log()
    assert helper.pid() == pid  # one helper answered all of them


def test_the_helper_leaves_when_its_sources_change_and_a_new_one_starts(helper, simulated):
    import spotfinder_core.report as report

    frame = str(simulated["paths"]["blank"])
    expected, _ = helper.call(frame)
    old = helper.wait_ready()
    source = Path(report.__file__)
    before = source.stat()
    try:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        changed, _ = helper.call(frame)  # the helper refuses it; the caller runs it and starts a new helper
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (changed.returncode, changed.stdout, changed.stderr) == (expected.returncode, expected.stdout,
                                                                     expected.stderr)
    assert gone(old, 30.0), "the helper of the old sources is still running"
    assert "our source files changed: leaving" in helper.log() or helper.wait_ready() != old


def test_an_idle_helper_leaves_and_removes_its_socket(runtime, simulated):
    helper = Helper(runtime, "1")
    try:
        assert helper.call(str(simulated["paths"]["blank"]))[0].returncode == 0
        pid = helper.wait_ready()
        assert gone(pid, 60.0), "the helper did not leave after 1 s without a call"
        assert helper.files(".sock") == []
        assert "no call for 1 s: leaving after 0 calls" in helper.log()
    finally:
        helper.stop()


def test_spotfinder_warm_0_starts_no_helper_and_a_bad_value_is_named(runtime, simulated):
    frame = str(simulated["paths"]["blank"])
    off = Helper(runtime, "0")
    done, _ = off.call(frame)
    assert done.returncode == 0 and not (runtime / "spotfinder-daemon").exists()
    bad = Helper(runtime, "soon")
    done, _ = bad.call(frame)
    assert done.returncode == 0 and b"Spot Total" in done.stdout
    assert done.stderr.count(b"SPOTFINDER_WARM=soon: expected the helper's idle time in seconds") == 1
    assert not (runtime / "spotfinder-daemon").exists()


def test_no_helper_in_a_folder_others_can_reach(runtime, simulated):
    (runtime / "spotfinder-daemon").mkdir(parents=True, mode=0o700)
    os.chmod(runtime / "spotfinder-daemon", 0o777)  # a socket here could be swapped by anyone
    helper = Helper(runtime, "120")
    try:
        done, _ = helper.call(str(simulated["paths"]["blank"]))
        assert done.returncode == 0 and b"Spot Total" in done.stdout
        time.sleep(1.0)
        assert helper.files(".lock") == [] and helper.files(".sock") == []
    finally:
        helper.stop()


def test_no_helper_where_a_socket_address_does_not_fit(tmp_path, simulated):
    runtime = tmp_path / ("deep" * 30)  # longer than a Unix socket's 108-byte address
    runtime.mkdir(mode=0o700)
    helper = Helper(runtime, "120")
    try:
        done, _ = helper.call(str(simulated["paths"]["blank"]))
        assert done.returncode == 0 and b"Spot Total" in done.stdout and done.stderr == b""
        assert helper.files(".lock") == []
    finally:
        helper.stop()
