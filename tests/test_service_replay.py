"""spotfinder replay: numbered copies, chunked or atomic, (de)compressed to the template's suffix."""
from __future__ import annotations

import bz2
import fcntl
import io
import json
import os
import subprocess

from spotfinder_daemon.replay import replay
from service_helpers import child_env, python_command


def test_replay_writes_numbered_copies_at_a_rate(tmp_path, make_frame):
    source = tmp_path / "src_00007.cbf"
    data = make_frame(str(source))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    lines = io.StringIO()
    assert replay([str(source)], str(out_dir), rate=20, count=3, chunks=3, start=5, out=lines) == 3
    names = sorted(os.listdir(out_dir))
    assert names == ["src_00005.cbf", "src_00006.cbf", "src_00007.cbf"]
    assert all((out_dir / n).read_bytes() == data for n in names)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    times = [r["t_complete"] for r in records]
    assert times[2] - times[0] >= 0.09  # paced at 20 Hz


def test_replay_atomic_and_compression_through_the_cli(tmp_path, make_frame):
    source = tmp_path / "src_00001.cbf.bz2"
    data = make_frame(str(tmp_path / "plain_00001.cbf"))
    source.write_bytes(bz2.compress(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = subprocess.run(python_command("replay", str(source), "--to", str(out_dir), "--count", "2", "--atomic",
                                         "--template", "grid_###.cbf"),
                          capture_output=True, text=True, env=child_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out_dir)) == ["grid_001.cbf", "grid_002.cbf"]  # no temporary files left
    assert (out_dir / "grid_001.cbf").read_bytes() == data


def test_replay_refuses_bad_arguments_in_one_line(tmp_path, make_frame):
    done = subprocess.run(python_command("replay", str(tmp_path / "missing.cbf"), "--to", str(tmp_path)),
                          capture_output=True, text=True, env=child_env(), timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("spotfinder: error: no such frame file")
    source = tmp_path / "a_00001.cbf"
    make_frame(str(source))
    done = subprocess.run(python_command("replay", str(source), "--to", str(tmp_path), "--template", "x.cbf"),
                          capture_output=True, text=True, env=child_env(), timeout=30)
    assert done.returncode == 2 and "exactly one run of #" in done.stderr


def test_replay_refuses_empty_and_corrupt_sources_in_one_line(tmp_path):
    (tmp_path / "empty_00001.cbf").write_bytes(b"")
    (tmp_path / "bad_00001.cbf.gz").write_bytes(b"\x1f\x8b not really gzip")
    for source, message in (("empty_00001.cbf", "is empty"), ("bad_00001.cbf.gz", "cannot decompress")):
        done = subprocess.run(python_command("replay", str(tmp_path / source), "--to", str(tmp_path), "--template",
                                             "out_#####.cbf"), capture_output=True, text=True, env=child_env(),
                              timeout=30)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_stop_with_a_garbled_pid_file_answers_in_one_line(tmp_path):
    (tmp_path / "spotfinder.pid").write_text("")
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:  # the state folder locked, as by a running service, but its pid file empty
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(python_command("stop", "--state-dir", str(tmp_path), "--timeout", "1"),
                              capture_output=True, text=True, env=child_env(), timeout=30)
    finally:
        os.close(folder)
    assert done.returncode == 1 and "empty or garbled" in done.stderr and "Traceback" not in done.stderr
