"""Settings: defaults, file, flags; and configuration errors that stop the start with one clear line."""
from __future__ import annotations

import subprocess

import pytest

from spotfinder_daemon.cli import build_parser
from spotfinder_daemon.config import ConfigError, example, flag_overrides, load, validate
from service_helpers import REPO, child_env, free_port, free_ports, python_command


def test_defaults_need_no_file_and_flags_override_the_file(tmp_path):
    defaults = validate({})
    assert defaults.pub == "tcp://127.0.0.1:5601" and defaults.http == "127.0.0.1:8125"
    assert defaults.worker_count >= 1 and defaults.watch == ()
    config = tmp_path / "c.yaml"
    config.write_text("workers: 3\npub: tcp://127.0.0.1:7000\nparameters: {distl.res.outer: 4.9}\n")
    settings = load(str(config), {"workers": 1, "watch": [str(tmp_path)], "pub": None})
    assert settings.workers == 1 and settings.pub == "tcp://127.0.0.1:7000"
    assert settings.watch == (str(tmp_path),)
    assert settings.params()["distl.res.outer"] == 4.9


@pytest.mark.parametrize("raw, message", [
    ({"wacth": ["/tmp"]}, "unknown setting 'wacth'"),
    ({"pub": "tcp://localhost"}, "pub: bad ZeroMQ endpoint"),
    ({"pub": "tcp://127.0.0.1:70000"}, "pub: bad ZeroMQ endpoint"),
    ({"http": "8125"}, "http: expected HOST:PORT"),
    ({"watch": ["/no/such/folder"]}, "folder /no/such/folder does not exist"),
    ({"workers": -1}, "workers: must be at least 0"),
    ({"parameters": ["distl.res.outr=4"]}, "parameters: Unknown file or keyword"),
    ({"work_endpoint": "tcp://127.0.0.1:5601"}, "three different endpoints"),
    ({"heartbeat_interval_s": 6, "worker_liveness_s": 5}, "must be at least 3 x heartbeat_interval_s"),
    ({"state_dir": 5}, "state_dir: expected a folder"),
    ({"retention_days": -1}, "retention_days: must be at least 0"),
    ({"verify_md5": "no"}, "verify_md5: expected true or false"),
    ({"workers": 1.5}, "workers: expected an integer, got 1.5"),
    ({"poll_interval_s": "fast"}, "poll_interval_s: expected a number, got 'fast'"),
    ({"ondemand_queue": 0}, "ondemand_queue: must be at least 1"),
    ({"max_tries": None}, "max_tries: expected an integer, got None"),
    ({"log_level": "loud"}, "log_level: expected one of debug, info, warning, error, got 'loud'"),
    ({"parameters": "distl.res.outer=4"}, "parameters: expected a list of key=value words"),
    ({"data_root": ["/usr"], "watch": ["/tmp"]}, "watch: folder /tmp is outside every data_root"),
])
def test_bad_settings_are_refused_with_a_clear_message(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(raw)


@pytest.mark.parametrize("args, message", [
    (["--watch", "/no/such/folder"], "watch: folder /no/such/folder does not exist"),
    (["--pub", "udp://x"], "pub: bad ZeroMQ endpoint"),
    (["--config", "/no/such.yaml"], "cannot read config file /no/such.yaml"),
])
def test_serve_stops_with_one_line_and_exit_2_on_configuration_errors(tmp_path, args, message):
    done = subprocess.run(python_command("serve", "--state-dir", str(tmp_path), *args), capture_output=True,
                          text=True, env=child_env(), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["spotfinder: error: " + done.stderr.strip().split("error: ", 1)[1]]
    assert message in done.stderr and "Traceback" not in done.stderr


def test_serve_reports_an_unusable_state_folder_or_ledger_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ledger.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    for state_dir, message in ((blocker / "state", "cannot use state folder"), (corrupt, "is damaged")):
        pub, http = free_ports(2)
        done = subprocess.run(python_command("serve", "--state-dir", str(state_dir), "--workers", "0", "--pub",
                                             "tcp://127.0.0.1:%d" % pub, "--http", "127.0.0.1:%d" % http),
                              capture_output=True, text=True, env=child_env(), timeout=30)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_serve_reports_an_endpoint_in_use_in_one_line(tmp_path):
    import socket
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(python_command("serve", "--state-dir", str(tmp_path), "--workers", "0", "--pub",
                                             "tcp://127.0.0.1:%d" % port, "--http", "127.0.0.1:%d" % free_port()),
                              capture_output=True, text=True, env=child_env(), timeout=30)
    assert done.returncode == 2
    assert "cannot bind pub endpoint tcp://127.0.0.1:%d" % port in done.stderr
    assert "Traceback" not in done.stderr


def test_the_example_file_is_the_declarations_rendering_and_loads_as_the_defaults():
    """config/spotfinder.yaml is what ``spotfinder config --example`` prints; regenerate it with that command."""
    documented = (REPO / "config" / "spotfinder.yaml").read_text()
    assert documented == example()
    assert load(str(REPO / "config" / "spotfinder.yaml")) == validate({})
    printed = subprocess.run(python_command("config", "--example"), capture_output=True, text=True,
                             env=child_env(), timeout=30)
    assert printed.returncode == 0 and printed.stdout == documented


def test_serve_flags_are_the_declared_settings(tmp_path):
    """Each flag sets the setting of its name; a flag not given leaves the file's value."""
    args = build_parser().parse_args(["serve", "--workers", "3", "--polling", "--data-root", str(tmp_path),
                                      "--watch", str(tmp_path), "--log-level", "debug"])
    config = tmp_path / "c.yaml"
    config.write_text("http: 127.0.0.1:9000\npolling: false\n")
    settings = load(str(config), flag_overrides(args))
    assert (settings.workers, settings.polling, settings.log_level) == (3, True, "debug")
    assert settings.data_root == settings.watch == (str(tmp_path),) and settings.http == "127.0.0.1:9000"
    assert sorted(flag_overrides(build_parser().parse_args(["serve"]))) == sorted(
        ["watch", "polling", "data_root", "pub", "http", "workers", "state_dir", "log_level"])
