"""A first start after an install: the workers compile the analysis kernels, and the service says so.

numba's cache is empty (a fresh NUMBA_CACHE_DIR), so the worker compiles every kernel before it joins (~10 s
of CPU on the 2-core development host).  Meanwhile /status answers, in state "preparing" with that reason, and
the log says what it waits for; then it serves, and a frame written meanwhile gets its result.
benchmarks/bench_startup.py measures the times.
"""
from __future__ import annotations

import shutil
import signal

from service_helpers import Subscriber, child_env, make_service, wait_for  # noqa: F401 (fixture)
from shared_data import real_files

from spotfinder_daemon.status import PREPARING

FIRST_START_S = 180  # a generous bound for a loaded 2-core machine: the benchmark, not this test, measures it


def test_a_first_start_says_it_is_preparing_until_its_compiled_worker_joins(make_service, tmp_path):  # noqa: F811
    frame = real_files(("thaumatin_grid_dls_i24_pilatus3_6m/thau_3_2_0001.cbf",), "the PILATUS 6M frame")[0]
    service = make_service(workers=1)
    subscriber = Subscriber(service.pub, "spotfinder.v1.result.")
    try:
        service.start(env=child_env(NUMBA_CACHE_DIR=str(tmp_path / "fresh-numba-cache")), wait_workers=0)
        early = service.wait_status(lambda s: s["state"] != "starting", 30, "/status past starting")
        assert early["state"] == "preparing" and early["workers_alive"] == 0, early
        assert not early["healthy"] and early["health"] == PREPARING, early
        shutil.copyfile(frame, service.watch / "thau_3_2_0001.cbf")
        service.wait_status(lambda s: s["state"] == "serving", FIRST_START_S, "serving after the compilation")
        wait_for(lambda: subscriber.messages, 60, "the frame's result")
        assert subscriber.messages[0]["status"] == "ok", subscriber.messages[0]
        assert "preparing: the workers load the analysis kernels" in service.log.read_text()
        service.signal(signal.SIGTERM)
        assert service.wait(60) == 0
    finally:
        subscriber.close()
