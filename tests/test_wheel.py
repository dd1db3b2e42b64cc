"""What a pip user gets: the wheel that ``python -m build`` makes of this checkout.

Fast: the pyproject metadata (SPDX licence, one version, URLs) and a wheel built without build
isolation, which must hold the recipes, the fine-tuning configs, LICENSE and NOTICE, and build without
a licence deprecation warning. Slow: that wheel installed into a fresh virtual environment (torch
first, as the README says), then ``soco-det --version``, ``soco-det demo --help``, a small
``soco-det demo`` and the README's Python API example, all from a folder outside the checkout.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import soco_det

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
# what a build reads from the checkout; everything else (tests, benchmarks, docs) stays out of the wheel
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "NOTICE", "soco_det")
# A demo small enough for a test: one pretraining epoch of 16 scenes, two fine-tuning iterations.
TINY_DEMO = ["--unlabeled", "16", "--train", "8", "--val", "4", "--size", "64"]
TINY_DEMO += ["--pretrain-epochs", "1", "--finetune-iters", "2"]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _shipped_data_files() -> list[str]:
    """The package-data files of the checkout that a user needs from the wheel (recipes, configs)."""
    files = [*(REPO / "soco_det" / "recipes").glob("*.yaml"), *(REPO / "soco_det" / "configs").rglob("*")]
    names = [p.relative_to(REPO).as_posix() for p in files if p.is_file() and "__pycache__" not in p.parts]
    assert any(n.endswith(".yaml") for n in names) and any("/mmdet/" in n for n in names)
    return sorted(names)


def test_pyproject_declares_the_licence_version_and_urls_in_the_current_form():
    meta = _pyproject()
    project = meta["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated {text = ...} table
    assert "LICENSE" in project["license-files"] and "NOTICE" in project["license-files"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639: the SPDX field only
    # the version is written once, in soco_det/__init__.py
    assert "version" not in project and "version" in project["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "soco_det.__version__"}
    assert project["urls"]["Homepage"].startswith("https://")
    # setuptools reads the SPDX string and license-files from 77 on
    (setuptools,) = [Requirement(r) for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.99") and setuptools.specifier.contains("77.0")
    assert "build" in {Requirement(r).name for r in project["optional-dependencies"]["test"]}


def test_licence_files_are_the_apache_2_text_and_the_copyright_notice():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    for section in ("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION", "END OF TERMS AND CONDITIONS"):
        assert section in text
    assert "Copyright 2026 the soco-det authors" in (REPO / "NOTICE").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """Build the wheel of a copy of this checkout (the build writes egg-info and build/ next to its
    sources); returns the wheel and the build's output."""
    pytest.importorskip("build", reason="python -m build is in the test extra: pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    # --no-isolation: this environment's setuptools, so the fast test needs no new packages
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (whl,) = (tmp / "dist").glob("soco_det-*.whl")
    return whl, output


def test_the_wheel_holds_the_recipes_configs_licence_and_metadata(wheel):
    whl, output = wheel
    assert whl.name.startswith(f"soco_det-{soco_det.__version__}-py3-none-any")
    # the table form of project.license made setuptools warn at every build
    assert not [line for line in output.splitlines() if "license" in line.lower() and "deprecat" in line.lower()]
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        dist_info = f"soco_det-{soco_det.__version__}.dist-info"
        missing = [n for n in _shipped_data_files() if n not in names]
        assert not missing, f"not in the wheel: {missing}"
        assert zf.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        assert zf.read(f"{dist_info}/licenses/NOTICE") == (REPO / "NOTICE").read_bytes()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
    headers = metadata.split("\n\n", 1)[0]
    assert f"\nVersion: {soco_det.__version__}\n" in headers
    assert "\nLicense-Expression: Apache-2.0\n" in headers and "\nLicense: " not in headers
    assert "Project-URL: Homepage, https://github.com/soco-det/soco-det" in headers
    assert "soco-det = soco_det.commands.main:main" in entry_points


# ---- slow: the wheel in a fresh virtual environment, outside the checkout ----------------------------


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user of the new venv: no PYTHONPATH (the tests run with the checkout on
    it), the venv's scripts first on PATH, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", VIRTUAL_ENV=str(venv))
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-6000:]}"
    return done


def _constraints(path: Path) -> Path:
    """Pin the new venv to the versions this environment was tested with (pip then finds them on this
    machine or in its cache, and the test checks the package, not today's newest releases)."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name != "soco-det":
            pins[name] = dist.version
    path.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return path


@pytest.fixture(scope="module")
def user(wheel, tmp_path_factory):
    """A fresh venv with torch and the wheel installed, and an empty folder outside the checkout."""
    whl, _ = wheel
    tmp = tmp_path_factory.mktemp("user")
    venv, home = tmp / "venv", tmp / "home"
    home.mkdir()
    _run([sys.executable, "-m", "venv", str(venv)], tmp, _clean_env(venv))
    env = _clean_env(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(_constraints(tmp / "pins.txt"))]
    # as the README says: torch first (the build the user wants), then soco-det
    # (the distributions' versions: torch.__version__ may carry a local tag such as +cu130 that the wheel has not)
    torch_pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision")]
    _run([*pip, *torch_pins], home, env, timeout=1800)
    _run([*pip, str(whl)], home, env, timeout=1800)
    yield venv, home, env
    shutil.rmtree(venv, ignore_errors=True)  # gigabytes (torch and its libraries)


@pytest.mark.slow  # minutes: installs torch into a new venv, then a small demo
def test_soco_det_demo_runs_from_the_wheel_outside_the_checkout(user):
    venv, home, env = user
    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import soco_det; print(soco_det.__file__)"], home, env).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO)
    version = _run(["soco-det", "--version"], home, env).stdout.strip()
    assert version == f"soco-det {soco_det.__version__}"
    assert "--pretrain-epochs" in _run(["soco-det", "demo", "--help"], home, env).stdout
    licence = _run([python, "-c", "import importlib.metadata as m; print(m.distribution('soco-det').files)"], home, env)
    assert "licenses/LICENSE" in licence.stdout

    _run(["soco-det", "demo", "-o", "demo_out", *TINY_DEMO], home, env, timeout=1800)
    out = home / "demo_out"
    assert "## 7. Fine-tuning and COCO evaluation" in (out / "report.md").read_text()
    assert (out / "pretrain" / "checkpoints" / "last.pt").is_file()
    exports = {p.name for p in (out / "export").iterdir()}
    assert {"soco_torchvision.pth", "soco_detectron2.pkl", "soco_mmdet.pth", "soco_timm_backbone.pth"} <= exports
    for init in ("soco", "untrained"):
        assert (out / f"finetune_{init}" / "checkpoints" / "last.pt").is_file()


def _readme_api_example() -> str:
    """The Python block of the README's "Python API" section, as a user would paste it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.slow
def test_the_readme_python_api_example_runs_from_the_wheel(user):
    venv, home, env = user
    python = str(venv / "bin" / "python")
    has_api = subprocess.run([python, "-c", "import soco_det.api"], cwd=home, env=env, capture_output=True)
    if has_api.returncode != 0:
        pytest.skip("soco_det.api is not in the package yet (issue 20): the README example cannot run")
    code = _readme_api_example()
    work = home / "api"
    (work / "imgs").mkdir(parents=True)
    _run(
        ["soco-det", "synth", "-o", "scenes", "--unlabeled", "16", "--train", "1", "--val", "1", "--size", "64"],
        work,
        env,
    )
    for image in sorted((work / "scenes" / "images" / "unlabeled").iterdir()):
        shutil.copy2(image, work / "imgs" / image.name)
    _run([python, "-c", code], work, env, timeout=1800)
    check = "import torch; sd = torch.load('soco_tv.pth', weights_only=True); print(len(sd), next(iter(sd)))"
    loaded = _run([python, "-c", check], work, env).stdout.split()
    assert int(loaded[0]) > 100 and loaded[1].startswith("backbone.")
    assert (work / "runs" / "soco" / "checkpoints" / "last.pt").is_file()
