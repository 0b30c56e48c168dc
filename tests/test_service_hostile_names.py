"""File names that are not UTF-8 (Linux names are bytes): stored, analysed and published losslessly."""
from __future__ import annotations

import base64
import os
import signal

import pytest

from service_helpers import make_service, subscribe

__all__ = ["make_service", "subscribe"]  # fixtures used by name

HOSTILE = b"fz_name_\xff\xfe_0001.cbf"


def published_names(results: list[dict]) -> list[bytes]:
    """Each result's exact file name: ``file_bytes_b64`` when the name is not UTF-8, else ``file``."""
    return sorted(base64.b64decode(r["file_bytes_b64"]) if "file_bytes_b64" in r else os.fsencode(r["file"])
                  for r in results)


def write_frames(make_frame, source, folder: bytes, names: list[bytes]) -> None:
    """Frames written under ``names`` (fabio cannot write a name that is not ASCII into a header)."""
    for seed, name in enumerate(names):
        data = make_frame(str(source / ("source_%04d.cbf" % seed)), seed=seed)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_name_that_is_not_utf8_is_answered_once_and_survives_a_restart(polling, make_service, subscribe, make_frame,
                                                                        tmp_path):
    service = make_service(workers=1, polling=polling, poll_interval_s=0.2).start()
    watch = os.fsencode(service.watch)
    subscriber = subscribe(service.pub)
    names = [HOSTILE, b"good_0001.cbf", b"good_0002.cbf"]
    write_frames(make_frame, tmp_path, watch, names)
    results = subscriber.settled_results(service, 3, 60)
    assert published_names(results) == sorted(os.path.join(watch, n) for n in names)
    hostile = next(r for r in results if "file_bytes_b64" in r)
    assert hostile["status"] == "ok", hostile
    assert hostile["file"] == os.fsdecode(watch) + "/fz_name_\\xff\\xfe_0001.cbf"  # readable, escaped
    assert hostile["collection"] == os.fsdecode(watch) + "/fz_name_\\xff\\xfe_####.cbf"  # and so its topic
    assert service.status()["workers_alive"] == 1

    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    later = [b"fz_name_\xff\xfe_0002.cbf", b"good_0003.cbf"]
    write_frames(make_frame, tmp_path, watch, later)
    service.start()  # the catch-up scan meets both hostile names: the old one known, the new one new
    results = subscriber.settled_results(service, 5, 60)
    assert published_names(results) == sorted(os.path.join(watch, n) for n in names + later)
    assert published_names(service.results_record()) == published_names(results)
