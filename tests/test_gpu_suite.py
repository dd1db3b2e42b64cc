"""benchmarks/gpu_suite.py: each part is time-boxed and failure-isolated, and the JSON is always written.

The whole suite is rehearsed with ``python benchmarks/gpu_suite.py --device cpu --tiny`` (minutes);
these checks cover the plumbing only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from engine_fixtures import REPO


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parts_fail_alone_and_the_json_keeps_every_outcome(tmp_path):
    mod = load_suite()
    args = argparse.Namespace(
        out=str(tmp_path / "out"),
        budget_s=60,
        device="cpu",
        tiny=True,
        threads=1,
        official_dir=str(tmp_path / "nowhere"),
        batch=4,
    )
    suite = mod.Suite(args)
    suite.part("boom", 10, lambda t: 1 / 0)
    suite.part("fine", 10, lambda t: {"img_per_s": 1.5})
    suite.part("slow", 10, lambda t: suite.sh("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1))
    suite.part("official", 10, lambda t: suite.official_step("fp16", t))
    suite.part("ceiling", 10, suite.ceiling)
    parts = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["parts"]
    assert parts["boom"]["status"] == "error" and "ZeroDivisionError" in parts["boom"]["error"]
    assert parts["fine"] == {
        "cap_s": 10,
        "result": {"img_per_s": 1.5},
        "status": "ok",
        "wall_s": parts["fine"]["wall_s"],
    }
    assert parts["slow"]["status"] == "timeout" and parts["slow"]["wall_s"] < 10
    assert parts["official"]["status"] == "error"  # no official scripts there (or no tarball)
    assert "official_step.py" in parts["official"]["error"] or "SoCo-official" in parts["official"]["error"]
    assert parts["ceiling"]["result"] == {"skipped": "ceiling.py needs CUDA"}
    suite.deadline = 0  # budget spent: later parts are skipped, not started
    suite.part("late", 10, lambda t: {"never": True})
    parts = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["parts"]
    assert parts["late"]["status"] == "skipped"
    suite.summarise()
    summary = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["summary"]
    assert summary["official"]["fp16"] is None and summary["ours"] == []
