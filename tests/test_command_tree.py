"""The command tree: the installed programs are the functions the tests drive, and ``spotfinder`` has one parser."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spotfinder_daemon import cli
from spotfinder_daemon.publisher import SCHEMA
from service_helpers import child_env, python_command

PROGRAMS = {"spotfinder": cli.main, "distl.signal_strength": cli.distl_signal_strength,
            "distl.thin_client": cli.distl_thin_client,
            "distl.mp_spotfinder_server_read_file": cli.distl_mp_spotfinder_server_read_file}


def test_the_installed_console_scripts_are_the_functions_the_tests_drive():
    """tests run ``python -m spotfinder_daemon.cli`` (whose __main__ calls cli.main) and the cli functions."""
    scripts = importlib.metadata.distribution("spotfinder-daemon").entry_points.select(group="console_scripts")
    assert {script.name: script.load() for script in scripts} == PROGRAMS


def test_the_console_script_and_python_m_give_the_same_command():
    installed = Path(sys.executable).with_name("spotfinder")
    if not installed.exists():
        pytest.skip("the spotfinder console script is not installed beside %s" % sys.executable)
    by_script = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=30)
    by_module = subprocess.run(python_command("--help"), capture_output=True, text=True, env=child_env(), timeout=30)
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout


def test_every_subcommand_is_a_row_of_the_table_with_its_handler():
    parser = cli.build_parser()
    for subcommand in cli.SUBCOMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([subcommand.name, "--help"])
        assert done.value.code == 0
    assert parser.parse_args(["stop"]).run is cli.commands.run_stop
    assert parser.parse_args(["find", "x.cbf"]).run is cli.commands.run_find


def test_options_and_operands_mix():
    args = cli.build_parser().parse_args(["find", "a.cbf", "--json", "b.cbf", "distl.res.outer=4.9"])
    assert args.json and args.items == ["a.cbf", "b.cbf", "distl.res.outer=4.9"]
    args = cli.build_parser().parse_args(["replay", "a.cbf", "--to", "out", "b.cbf"])
    assert args.frames == ["a.cbf", "b.cbf"] and args.to == "out"


def test_find_as_the_readme_writes_it(simulated):
    frame = str(simulated["paths"]["spots"])
    plain = subprocess.run(python_command("find", frame, "--json"), capture_output=True, text=True,
                           env=child_env(), timeout=120)
    limited = subprocess.run(python_command("find", frame, "--json", "distl.res.outer=4.9"), capture_output=True,
                             text=True, env=child_env(), timeout=120)
    assert plain.returncode == limited.returncode == 0, limited.stderr
    assert json.loads(limited.stdout)["in_resolution_total"] < json.loads(plain.stdout)["in_resolution_total"]


def test_unknown_options_are_still_refused():
    done = subprocess.run(python_command("find", "x.cbf", "--jsn"), capture_output=True, text=True, env=child_env(),
                          timeout=30)
    assert done.returncode == 2 and "unrecognized arguments: --jsn" in done.stderr


def test_listen_hears_every_published_message_by_default():
    assert cli.build_parser().parse_args(["listen"]).topic == SCHEMA + "."
