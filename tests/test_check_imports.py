"""tools/check_imports.py: the floor-plan check `make test` runs finds cycles and upward imports,
counting imports inside functions, and passes on the package itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "soco_det"
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


LAYERS = [("base", ["soco_det", "soco_det.errors"]), ("data", ["soco_det.data", "soco_det.data.*"]),
          ("engine", ["soco_det.engine", "soco_det.engine.*"])]  # fmt: skip


def test_a_cycle_hidden_in_a_function_and_an_upward_import_are_found(tmp_path):
    tool = _tool()
    pkg = _package(
        tmp_path,
        {
            "errors.py": "",
            "data/__init__.py": "",
            "data/a.py": "from soco_det.data import b\n",
            # the import inside a function closes the cycle a -> b -> a
            "data/b.py": "def f():\n    from soco_det.data.a import x\n    return x\n",
            "data/c.py": "from soco_det.engine.loop import run\n",  # data imports a later stage
            "engine/__init__.py": "",
            "engine/loop.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from soco_det.data import c\n",
        },
    )
    modules = tool.module_names(pkg)
    edges = tool.import_edges(modules)
    found_cycles, upward, unplaced = tool.check(modules, edges, LAYERS)
    assert found_cycles == [["soco_det.data.a", "soco_det.data.b"]]
    assert upward == [("soco_det.data.c", "soco_det.engine.loop", "data", "engine")]
    assert unplaced == []
    assert "soco_det.data.c" not in edges.get("soco_det.engine.loop", set())  # TYPE_CHECKING imports never run


def test_the_package_has_no_cycle_and_no_upward_import():
    tool = _tool()
    modules = tool.module_names(REPO / "soco_det")
    edges = tool.import_edges(modules)
    found_cycles, upward, unplaced = tool.check(modules, edges, tool.read_layers(REPO / "docs" / "architecture.md"))
    assert (found_cycles, upward, unplaced) == ([], [], [])
