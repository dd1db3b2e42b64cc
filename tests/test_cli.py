"""The command line: every sub-command has --help, user errors print one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from soco_det.cli import COMMANDS, main
from soco_det.viz import KINDS


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    assert f"soco-det {command}" in out.split("\n\n")[0]  # the usage paragraph names the command


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_viz_kind_has_help(kind, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["viz", kind, "--help"])
    assert exc.value.code == 0
    assert f"soco-det viz {kind}" in capsys.readouterr().out


def test_top_level_help_lists_the_pipeline(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_console_entry_point_and_module_entry_point_agree():
    module = subprocess.run([sys.executable, "-m", "soco_det", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.startswith("soco-det ")
