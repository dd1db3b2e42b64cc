"""The command line: every sub-command has --help, user errors print one line and exit 2; the
installed ``soco-det`` console script runs ``soco_det.commands.main:main`` and its help imports no torch."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soco_det.commands.main import COMMANDS, main
from soco_det.commands.viz import KINDS


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


REPO = Path(__file__).resolve().parents[1]


def console_script() -> Path:
    """The installed ``soco-det`` script (beside this interpreter, where pip puts it)."""
    try:
        dist = importlib.metadata.distribution("soco-det")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("soco-det is not installed (pip install -e .): no console script to test")
    (entry,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "soco-det"]
    assert entry.value == "soco_det.commands.main:main"
    script = Path(sys.executable).parent / ("soco-det.exe" if os.name == "nt" else "soco-det")
    assert script.is_file(), f"soco-det is installed but {script} is missing"
    return script


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the script imports this checkout, whichever one was installed
    env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([str(console_script()), *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_console_script_and_module_entry_point_agree():
    script = run_script("--version")
    module = subprocess.run(
        [sys.executable, "-m", "soco_det", "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    assert script.returncode == module.returncode == 0
    assert script.stdout.startswith("soco-det ") and script.stdout == module.stdout
    bad = run_script("no-such-command")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["pretrain", "--help"],
        ["proposals", "--help"],
        ["proposals", "compute", "--help"],
        ["proposals", "IMAGES", "--help"],
    ],
)
def test_help_does_not_import_torch(args):
    # PYTHONPROFILEIMPORTTIME makes Python list every module it imports, on stderr.
    proc = run_script(*args, PYTHONPROFILEIMPORTTIME="1")
    assert proc.returncode == 0 and proc.stdout.startswith("usage:") and "soco-det" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "soco_det.commands.main" in imported  # the listing works
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "torchvision", "numpy", "skimage", "numba"))
    assert not heavy, f"soco-det {' '.join(args)} imported {heavy[:5]}"


def test_proposals_help_lists_the_subcommands_and_the_default_form(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["proposals", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert all(word in out for word in ("compute", "merge", "import", "export", "info"))
    assert "soco-det proposals IMAGES -o STORE" in " ".join(out.split())


@pytest.mark.parametrize(
    "subcommand, words",
    [
        ("compute", ["--workers", "--max-side", "--shard", "--chunk-size", "--exif-transpose"]),
        ("merge", ["--allow-missing", "--overwrite"]),
        ("import", ["--images", "--exif-transpose", "--overwrite"]),
        ("export", ["--format", "--overwrite"]),
        ("info", ["STORE"]),
    ],
)
def test_each_proposals_subcommand_has_help_with_exactly_its_options(subcommand, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["proposals", subcommand, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"usage: soco-det proposals {subcommand} ")
    assert all(word in out for word in words)
    others = {"--workers", "--allow-missing", "--images", "--format", "--overwrite"} - set(words)
    assert not [word for word in others if word in out]


def test_proposals_without_a_subcommand_word_is_compute():
    from soco_det.commands.main import build_parser, normalize_argv

    argv = [
        "proposals",
        "/data/x",
        "-o",
        "s",
        "--workers",
        "3",
        "--max-side",
        "64",
        "--shard",
        "1/4",
        "--param",
        "scale=500",
        "--exif-transpose",
        "--chunk-size",
        "8",
    ]
    implicit = build_parser().parse_args(normalize_argv(argv))
    explicit = build_parser().parse_args(normalize_argv(["proposals", "compute", *argv[1:]]))
    assert vars(implicit) == vars(explicit)
    assert implicit.subcommand == "compute" and implicit.images == ["/data/x"] and implicit.workers == 3
    # Options before the folder, and the global options before the command, too.
    args = build_parser().parse_args(normalize_argv(["--log-level", "DEBUG", "proposals", "-o", "s", "/data/x"]))
    assert (args.subcommand, args.images, args.output, args.log_level) == ("compute", ["/data/x"], "s", "DEBUG")
    # A folder named like a sub-command: after the word, or as ./merge.
    assert build_parser().parse_args(normalize_argv(["proposals", "compute", "merge", "-o", "s"])).images == ["merge"]
    assert build_parser().parse_args(normalize_argv(["proposals", "./merge", "-o", "s"])).images == ["./merge"]


@pytest.mark.parametrize(
    "argv, wrong",
    [
        (["proposals", "export", "STORE", "-o", "x.json", "--workers", "2"], "proposals export"),
        (["proposals", "info", "STORE", "--format", "coco"], "proposals info"),
        (["proposals", "merge", "a", "b", "-o", "s", "--images", "d"], "proposals merge"),
        (["proposals", "IMAGES", "-o", "s", "--allow-missing"], "proposals compute"),
        (["proposals", "IMAGES", "-o", "s", "--format", "coco"], "proposals compute"),
    ],
)
def test_an_option_of_another_proposals_subcommand_is_refused(argv, wrong, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err[-1].startswith(f"soco-det {wrong}: error: unrecognized arguments: --")
