"""The one-shot command's warm helper (spotfinder_daemon.warm), run for real: the console script starts it,
later calls are answered by it on their own streams with the same bytes and status, and it leaves when its
sources change, when it has been idle, or when told to.

Every test has a runtime folder of its own (XDG_RUNTIME_DIR, short enough for a socket's address) and stops
what it started; the rest of the suite runs with SPOTFINDER_WARM=0 (conftest.py), so that no other test
leaves a helper behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import spotfinder_core
import spotfinder_daemon
from service_helpers import child_env, entry_point_command
from spotfinder_daemon import warm

START_S = 180.0  # a helper's start: imports and kernels from numba's cache (~0.4 s), compiling them when cold
CALL_S = 300.0


class Helper:
    """The folder a helper lives in, and the console script run against it."""

    def __init__(self, runtime: Path, idle_s: str, **env: str):
        self.runtime = runtime
        self.env = child_env(SPOTFINDER_WARM=idle_s, XDG_RUNTIME_DIR=str(runtime), **env)

    def call(self, *args: str, cwd: Path | None = None, **env: str) -> tuple[subprocess.CompletedProcess, int]:
        """The console script's outcome, and its pid."""
        process = subprocess.Popen(entry_point_command("distl_signal_strength", *args), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env={**self.env, **env}, cwd=cwd)
        try:
            out, err = process.communicate(timeout=CALL_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, out, err), process.pid

    def files(self, suffix: str) -> list[Path]:
        return sorted((self.runtime / "spotfinder-daemon").glob("warm-*" + suffix))

    def log(self) -> str:
        return "".join(path.read_text() for path in self.files(".log"))

    def wait_ready(self, other_than: int | None = None) -> int:
        """The pid of the helper that has said it is ready (another than ``other_than``)."""
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            ready = [int(pid) for pid in re.findall(r"pid (\d+) ready", self.log())]
            if ready and ready[-1] != other_than:
                return ready[-1]
            assert warm.FAILED not in self.log(), self.log()
            time.sleep(0.1)
        raise AssertionError("no helper became ready within %g s; its log: %r" % (START_S, self.log()))

    def stop(self) -> None:
        """SIGTERM to the helper holding each lock here (checked to be one: a pid is never signalled blindly)."""
        for lock in self.files(".lock"):
            pid = warm.helper_pid(str(lock))
            if pid is None:
                continue
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
                    if b"spotfinder_daemon.warm" not in cmdline.read():
                        continue
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
            if not gone(pid, 30.0):
                os.kill(pid, signal.SIGKILL)


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
    folder = Path(tempfile.mkdtemp(prefix="sfwarm-", dir="/tmp"))
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
    # a reader that stops early: quiet, status 0, as in the caller's own process
    with subprocess.Popen(entry_point_command("distl_signal_strength", str(frame)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=helper.env) as process:
        process.stdout.close()
        assert process.wait(timeout=CALL_S) == 0
        assert process.stderr.read() == b""
    assert "call 3 from pid" in helper.log()
    assert helper.wait_ready() == pid  # one helper answered all of them


def test_the_helper_leaves_when_its_sources_change(runtime, simulated):
    """Run from a copy of our packages (PYTHONPATH), so that a source file can be changed without touching the
    installation the other tests use."""
    code = runtime / "code"
    for package in (spotfinder_core, spotfinder_daemon):
        shutil.copytree(Path(package.__file__).parent, code / package.__name__,
                        ignore=shutil.ignore_patterns("__pycache__"))
    helper = Helper(runtime, "120", PYTHONPATH=str(code))
    try:
        frame = str(simulated["paths"]["blank"])
        expected, _ = helper.call(frame)
        assert expected.returncode == 0, expected.stderr
        old = helper.wait_ready()
        source = code / "spotfinder_core" / "report.py"
        source.write_text(source.read_text() + "\n")
        changed, _ = helper.call(frame)  # the helper refuses it; the caller runs it itself
        assert (changed.returncode, changed.stdout, changed.stderr) == (expected.returncode, expected.stdout,
                                                                         expected.stderr)
        assert gone(old, 30.0), "the helper of the old sources is still running"
        again, _ = helper.call(frame)  # runs here or in a new helper; either way a new one is there after it
        assert again.stdout == expected.stdout
        assert helper.wait_ready(other_than=old) != old
    finally:
        helper.stop()


def test_an_idle_helper_leaves_and_removes_its_socket_and_pid(runtime, simulated):
    helper = Helper(runtime, "1")
    try:
        assert helper.call(str(simulated["paths"]["blank"]))[0].returncode == 0
        pid = helper.wait_ready()
        assert gone(pid, 60.0), "the helper did not leave after 1 s without a call"
        assert helper.files(".sock") == []
        assert [lock.read_text() for lock in helper.files(".lock")] == [""]
        assert "no call for 1 s: leaving" in helper.log()
    finally:
        helper.stop()


@pytest.mark.parametrize("setting", ["soon", "1e300", "-5", "inf"])
def test_a_setting_that_cannot_be_read_is_named_once_and_starts_no_helper(runtime, simulated, setting):
    done, _ = Helper(runtime, setting).call(str(simulated["paths"]["blank"]))
    assert done.returncode == 0 and b"Spot Total" in done.stdout
    assert done.stderr.count(b"SPOTFINDER_WARM=%s: expected the helper's idle time in seconds"
                             % setting.encode()) == 1
    assert not (runtime / "spotfinder-daemon").exists()


def test_spotfinder_warm_0_starts_no_helper(runtime, simulated):
    done, _ = Helper(runtime, "0").call(str(simulated["paths"]["blank"]))
    assert done.returncode == 0 and b"Spot Total" in done.stdout and done.stderr == b""
    assert not (runtime / "spotfinder-daemon").exists()


def test_no_helper_in_a_folder_others_can_reach(runtime, simulated):
    (runtime / "spotfinder-daemon").mkdir(mode=0o700)
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


def test_a_helper_that_fails_to_start_is_not_started_again_at_once(runtime, simulated):
    """A helper whose socket cannot be made (its name is taken by a folder) logs why, once, and the calls go
    on in their own processes without starting one each time."""
    helper = Helper(runtime, "120")
    try:
        frame = str(simulated["paths"]["blank"])
        paths = _paths_of(helper)
        os.makedirs(paths["socket"])  # os.replace cannot put the socket there
        for _ in range(3):
            done, _ = helper.call(frame)
            assert done.returncode == 0 and b"Spot Total" in done.stdout
            deadline = time.monotonic() + START_S
            while warm.FAILED not in helper.log() and time.monotonic() < deadline:
                time.sleep(0.1)
        assert helper.log().count(warm.FAILED) == 1, helper.log()
        assert not warm.held(paths["lock"])
    finally:
        helper.stop()


def test_a_helper_log_that_cannot_be_opened_leaves_the_call_as_it_was(runtime, simulated):
    """The call that would start a helper cannot open its log (a folder has its name): the command's own
    text and status, no traceback, and no helper."""
    helper = Helper(runtime, "120")
    try:
        paths = _paths_of(helper)
        os.makedirs(paths["log"])
        own, _ = helper.call(str(simulated["paths"]["blank"]), SPOTFINDER_WARM="0")
        done, _ = helper.call(str(simulated["paths"]["blank"]))
        assert (done.returncode, done.stdout, done.stderr) == (own.returncode, own.stdout, own.stderr)
        assert done.returncode == 0 and b"Spot Total" in done.stdout
        assert not warm.held(paths["lock"])
    finally:
        helper.stop()


def _paths_of(helper: Helper) -> dict[str, str]:
    """warm.paths() as the helper's callers compute it (in a process with their environment)."""
    code = "import json; from spotfinder_daemon import warm; print(json.dumps(warm.paths()))"
    done = subprocess.run([sys.executable, "-c", code], env=helper.env, capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)
