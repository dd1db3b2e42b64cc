"""Training metrics: one JSON object per line in ``RUN/metrics.jsonl``, and the same records to the
run's logging back-ends (TensorBoard, W&B, MLflow: :mod:`soco_det.engine.tracking`).

Only the main process writes. A line looks like
``{"step": 120, "epoch": 3, "loss": -5.91, "loss/1-2": -1.48, ..., "lr": 0.42, "momentum": 0.9903,
"img_per_s": 53.1, "time/data_wait": 0.004, "time/step": 0.31, "gpu_mem_mib": 7123.0, "time": 1700000000.0}``.
On resume, lines with a step beyond the checkpoint's are dropped first, so the file describes one
consistent history. Fine-tuning (:mod:`soco_det.transfer.finetuning`) writes the same file with
``iter`` as the step key, and its evaluations as ``{"iter": 500, "bbox": {"AP": ...}, ...}`` (the
back-ends get ``bbox/AP``, ...).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from soco_det.atomic import atomic_write_text
from soco_det.engine.tracking import Image, Rows, Tracker
from soco_det.logs import get_logger

log = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metric records to ``run_dir/metrics.jsonl`` and hands them, and the run's text,
    pictures and tables, to ``tracker`` (:func:`soco_det.engine.tracking.open_tracker`; ``None``:
    the file alone). With ``enabled=False`` (the other processes) every call does nothing."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tracker: Tracker | None = None,
        resume_step: int | None = None,
        step_key: str = "step",
    ) -> None:
        """``step_key``: the name of the step in the records; ``resume_step``: drop the records
        past it first."""
        self.enabled = enabled
        self.step_key = step_key
        self.path = Path(run_dir) / METRICS_FILE
        self.tracker = tracker if tracker is not None and enabled else Tracker()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step, step_key)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Append ``{step_key: step, **values, "time": now}`` (a ``time`` in ``values`` is kept);
        the back-ends get its numbers (``time`` aside)."""
        if not self.enabled:
            return
        record = {self.step_key: step, **{k: _plain(v) for k, v in values.items()}}
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.tracker.scalars(step, {k: v for k, v in record.items() if k not in (self.step_key, "time")})

    def text(self, name: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.tracker.text(name, text, step)

    def image(self, name: str, image: Image, step: int = 0) -> None:
        if self.enabled:
            self.tracker.image(name, image, step)

    def table(self, name: str, rows: Rows, step: int) -> None:
        if self.enabled:
            self.tracker.table(name, rows, step)

    @property
    def backends(self) -> Sequence[str]:
        """The names of the back-ends still written to."""
        return self.tracker.names

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self.tracker.close()


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, step: int, step_key: str = "step") -> None:
    """Drop records with ``step_key`` greater than ``step`` (they belong to an abandoned future)."""
    if not path.exists():
        return
    kept = [json.dumps(r) + "\n" for r in read_metrics(path.parent) if r.get(step_key, 0) <= step]
    atomic_write_text(path, "".join(kept))
