"""The commands on EIGER HDF5 series: ``distl.signal_strength x_master.h5 distl.range=...`` prints DISTL's text
(the multi-frame layout of the stock command, checked against the real DISTL), ``spotfinder find`` analyses every
frame with a progress bar on a terminal, and bad input is one line per frame."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from shared_data import PEER_DISTL, need_peer, real_files
from spotfinder_core import nexus
from spotfinder_core.image import read_frame
from spotfinder_daemon.cli import distl_signal_strength, main

SMALL_MOLECULE = "small_molecule_dls_i19_pilatus_300k/ximg2700_00001.cbf"
EIGER_9M = "eiger_9m_master/dectris_eiger_master.h5"


def changed(pixels: np.ndarray) -> list[np.ndarray]:
    """The frame and two copies with other counts, gaps and bad pixels kept."""
    valid = pixels >= 0
    return [pixels, np.where(valid, pixels // 2, pixels),
            np.where(valid, np.maximum(np.roll(pixels, (9, -23), axis=(0, 1)), 0), pixels)]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A real PILATUS 300K frame and two changed copies, as CBFs (with its header) and as one HDF5 series."""
    from fabio.cbfimage import CbfImage

    (source,) = real_files((SMALL_MOLECULE,), "the PILATUS 300K small-molecule frame")
    out = tmp_path_factory.mktemp("cli_hdf5")
    raw = open(source, "rb").read()
    contents = re.search(rb"_array_data\.header_contents\s*;\s*\n(.*?)\n;", raw, re.S).group(1).decode("latin-1")
    frames = changed(read_frame(source).pixels)
    cbfs = []
    for k, frame in enumerate(frames):
        cbfs.append(str(out / ("ximg2700_%05d.cbf" % (k + 1))))
        CbfImage(data=frame, header={"_array_data.header_convention": "PILATUS_1.2",
                                     "_array_data.header_contents": contents}).write(cbfs[-1])
    master = nexus.write_series(str(out), "ximg", frames, layout="nxmx", nimages_per_file=2,
                                geometry=nexus.cbf_geometry(source), dtype=np.uint32)
    return {"dir": out, "cbfs": cbfs, "master": master, "source": source}


def cli_text(capsys, argv) -> tuple[int, str, str]:
    code = distl_signal_strength(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def body(text: str) -> str:
    return text.split("#phil __OFF__\n\n", 1)[1]


def test_one_frame_of_a_master_is_its_cbfs_text_under_the_masters_name(series, capsys, monkeypatch):
    """DISTL names a frame of x_master.h5 by the file's name (its file-name patterns give it no number, so it
    also echoes the name first) and numbers it by its index: "image #1"."""
    monkeypatch.chdir(series["dir"])
    code, out, err = cli_text(capsys, ["ximg_master.h5", "distl.range=1", "distl.bins.verbose=True"])
    assert (code, err) == (0, "")
    assert '  image = "ximg_master.h5"' in out and "  range = 1\n" in out
    _, cbf_out, _ = cli_text(capsys, [series["cbfs"][1], "distl.bins.verbose=True"])
    expected = body(cbf_out).replace("File : ximg2700_00002.cbf", "File : ximg_master.h5")
    expected = expected.replace(series["cbfs"][1], series["master"])
    expected = expected.replace("on image #2 within", "on image #1 within")
    assert body(out) == "ximg_master.h5\n" + expected


def test_a_range_of_frames_has_the_stock_commands_layout(series, capsys, monkeypatch):
    """The real DISTL's multi-frame text (its dxtbx stand-in accepts distl.range on a CBF and reads the same frame
    for each index): our text for the same frames of an HDF5 series has its layout line for line."""
    distl = PEER_DISTL
    need_peer(distl)
    folder = series["dir"] / "same"
    folder.mkdir(exist_ok=True)
    frame = read_frame(series["source"]).pixels
    master = nexus.write_series(str(folder), "same", [frame] * 3, layout="legacy", nimages_per_file=2,
                                geometry=nexus.cbf_geometry(series["source"]), dtype=np.uint32)
    words = ["distl.range=0,3", "distl.bins.verbose=True"]
    done = subprocess.run([str(distl), series["cbfs"][0], *words], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    theirs = re.sub(r"File : ximg2700_0000\d\.cbf", "File : same_master.h5", body(done.stdout))
    theirs = theirs.replace(series["cbfs"][0], master)
    monkeypatch.chdir(folder)
    code, out, _ = cli_text(capsys, ["same_master.h5", *words])
    assert code == 0
    assert body(out) == "same_master.h5\n" + theirs


def test_range_errors(series, capsys, monkeypatch):
    monkeypatch.chdir(series["dir"])
    code, out, err = cli_text(capsys, ["ximg_master.h5"])
    assert (code, out) == (2, "")
    assert err == ("Sorry: ximg_master.h5: an HDF5 file of 3 frames needs a frame index (distl.range=N, frame=N)\n")
    code, out, err = cli_text(capsys, [series["cbfs"][0], "distl.range=0"])
    assert (code, out) == (2, "")
    assert err.startswith("Sorry: distl.range names frames of an HDF5 (EIGER) file; ")
    code, out, err = cli_text(capsys, ["ximg_master.h5", "distl.range=2,2"])
    assert (code, out, err) == (2, "", "Sorry: distl.range=2,2 names no frame (the end is excluded)\n")
    # frames past the end: the others are printed, each bad one is one line, and the exit code says so
    code, out, err = cli_text(capsys, ["ximg_master.h5", "distl.range=1,5"])
    assert code == 2 and out.count("Number of focus spots on image #") == 2
    assert err == "Sorry: ximg_master.h5 frames 3 to 4 are out of range: it holds frames 0 to 2\n"
    code, out, err = cli_text(capsys, ["ximg_master.h5", "distl.range=7,1000000000"])
    assert (code, out, err) == (
        2, "", "Sorry: ximg_master.h5 frames 7 to 999999999 are out of range: it holds frames 0 to 2\n")
    os.rename(series["dir"] / "ximg_data_000002.h5", series["dir"] / "away.h5")
    try:
        code, out, err = cli_text(capsys, ["ximg_master.h5", "distl.range=2"])
    finally:
        os.rename(series["dir"] / "away.h5", series["dir"] / "ximg_data_000002.h5")
    assert (code, out) == (2, "")
    assert err == "Sorry: ximg_master.h5 frame 2: data file ximg_data_000002.h5 of frame index 2 is missing\n"


def test_find_analyses_every_frame_of_a_series(series, capsys):
    eiger_9m = real_files((EIGER_9M,), "the EIGER 9M master")[0]
    code = main(["find", "--json", series["master"], series["cbfs"][0], eiger_9m])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2
    assert [(r["file"], r["frame_index"], r["image_number"], r["status"]) for r in records] == [
        (series["master"], 0, 1, "ok"), (series["master"], 1, 2, "ok"), (series["master"], 2, 3, "ok"),
        (series["cbfs"][0], None, 1, "ok"), (eiger_9m, 0, None, "error")]
    assert records[4]["error"] == "data file dectris_eiger_data_000001.h5 of frame index 0 is missing"
    code = main(["find", "--json", series["cbfs"][1]])
    cbf = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in records[1].items() if k not in ("file", "image_number", "frame_index", "proc_ms")} == {
        k: v for k, v in cbf.items() if k not in ("file", "image_number", "frame_index", "proc_ms")}
    everything = sorted(str(p) for p in series["dir"].glob("ximg_*.h5"))  # find ximg_*.h5: no frame twice
    assert len(everything) == 3 and main(["find", "--json", *everything]) == 0
    assert [json.loads(line)["frame_index"] for line in capsys.readouterr().out.splitlines()] == [0, 1, 2]
    code = main(["find", series["master"], "distl.range=1,3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["frame", "ximg_master.h5:1", "ximg_master.h5:2"]


def test_find_shows_a_progress_bar_on_a_terminal(series):
    """stderr on a terminal: a tqdm bar counting the series' frames; the results still go to stdout."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        done = subprocess.run([sys.executable, "-m", "spotfinder_daemon.cli", "find", series["master"]],
                              stdout=subprocess.PIPE, stderr=terminal, timeout=300)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0
    assert len(done.stdout.decode().splitlines()) == 4
    assert b"3/3" in shown and b"frame" in shown


def test_a_one_frame_master_without_a_range_is_numbered_by_its_name(series, capsys, monkeypatch):
    """Without distl.range DISTL numbers any file by its name's pattern: x_master.h5 is "image #3"."""
    folder = series["dir"] / "one"
    folder.mkdir(exist_ok=True)
    nexus.write_series(str(folder), "one", [read_frame(series["source"]).pixels], layout="legacy",
                       geometry=nexus.cbf_geometry(series["source"]), dtype=np.uint32)
    monkeypatch.chdir(folder)
    code, out, _ = cli_text(capsys, ["one_master.h5"])
    assert code == 0 and "Number of focus spots on image #3 within" in out
    code, out, _ = cli_text(capsys, ["one_master.h5", "distl.range=0"])
    assert code == 0 and "Number of focus spots on image #0 within" in out
