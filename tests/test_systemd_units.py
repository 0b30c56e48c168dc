"""The systemd units: they verify with systemd-analyze, and say what the service needs."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
INSTALLED = "/opt/spotfinder/bin/spotfinder"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name,instance", [("spotfinder.service", "spotfinder.service"),
                                           ("spotfinder-worker@.service", "spotfinder-worker@beamline.service")])
def test_units_verify(tmp_path, name, instance):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    executable = Path(sys.executable).with_name("spotfinder")
    if not executable.exists():
        pytest.skip("the spotfinder console script is not installed beside %s" % sys.executable)
    text = (UNITS / name).read_text()
    assert INSTALLED in text
    (tmp_path / instance).write_text(text.replace(INSTALLED, str(executable)))
    proc = subprocess.run([analyze, "verify", str(tmp_path / instance)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr


def test_service_unit_is_notify_with_watchdog_and_hardening():
    service = unit("spotfinder.service")["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"
    assert service["ExecStart"].endswith("serve --config /etc/spotfinder/spotfinder.yaml")
    assert service["User"] == "spotfinder" and service["StateDirectory"] == "spotfinder"
    assert "NUMBA_CACHE_DIR=/var/lib/spotfinder" in service["Environment"]  # writable JIT cache
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
                       "RestrictNamespaces": "yes", "LockPersonality": "yes",
                       "SystemCallArchitectures": "native"}.items():
        assert service[key] == value, key
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "MemoryDenyWriteExecute" not in service  # numba needs to compile at run time
    assert int(service["TimeoutStopSec"]) >= 60


def test_worker_unit_connects_to_its_instance():
    service = unit("spotfinder-worker@.service")["Service"]
    assert service["ExecStart"] == INSTALLED + " worker --connect %i"
