"""The one place that knows where the shared real data lives (``../shared`` beside the checkout) and how a
test that needs it is skipped, with the reason."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "data" / "real"
REFERENCE = SHARED / "reference" / "distl"
PROBE = SHARED / "peer" / "probe"
# The real DISTL's venv (../shared/peer/setup.sh builds it), its dxtbx stand-in, and cctbx's stock server clients
PEER_VENV = Path(os.environ.get("DISTL_PEER_VENV", "~/.distl-peer")).expanduser()
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_SHIM = SHARED / "peer" / "shim"
PEER_DISTL = SHARED / "peer" / "distl"
STOCK_CLIENTS = next(PEER_VENV.glob("lib/python3*/site-packages/spotfinder/servers"), None)


def need(*paths: Path, what: str) -> None:
    """Skip the calling test, naming ``what`` and the first missing path, unless every path exists."""
    missing = [path for path in paths if not path.exists()]
    if missing:
        pytest.skip("%s live in %s; not present in this checkout (missing %s)" % (what, SHARED, missing[0]))


def real_files(names: tuple[str, ...], what: str) -> list[str]:
    """Paths of files under data/real; the test is skipped when one is missing."""
    paths = [REAL / name for name in names]
    need(*paths, what=what)
    return [str(path) for path in paths]


def peer_missing(*also: Path) -> Path | None:
    """The first of the real DISTL's venv (its python) and ``also`` (parts of ../shared/peer) that is not
    there; None when the peer is set up."""
    return next((path for path in (PEER_PYTHON, *also) if not path.exists()), None)


def need_peer(*also: Path) -> None:
    """Skip the calling test unless the real DISTL is set up (``peer_missing``), saying what is missing and how
    to set it up."""
    missing = peer_missing(*also)
    if missing is not None:
        pytest.skip("the real DISTL is not set up (missing %s): run %s, or set DISTL_PEER_VENV"
                    % (missing, SHARED / "peer" / "setup.sh"))


def real_distl_body(frame: str, *words: str) -> str:
    """The body the real DISTL prints for ``frame`` (what follows its parameter echo), run live through
    ../shared/peer/distl; the test is skipped when that peer is not set up."""
    need_peer(PEER_DISTL)
    done = subprocess.run(["sh", str(PEER_DISTL), str(frame), *words], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout.split("#phil __OFF__\n\n", 1)[1]
