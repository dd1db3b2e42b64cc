"""Training metrics: one JSON object per line in ``RUN/metrics.jsonl``, mirrored to TensorBoard.

Only the main process writes. A line looks like
``{"step": 120, "epoch": 3, "loss": -5.91, "loss/1-2": -1.48, ..., "lr": 0.42, "momentum": 0.9903,
"img_per_s": 53.1, "gpu_mem_mib": 7123.0, "time": 1700000000.0}``. On resume, lines with a step
beyond the checkpoint's are dropped first, so the file describes one consistent history.
Fine-tuning (:mod:`soco_det.transfer.finetuning`) writes the same file with ``iter`` as the step key
and ``time`` as the seconds since its start.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from soco_det.atomic import atomic_write_text
from soco_det.logs import get_logger

log = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metric records to ``run_dir/metrics.jsonl`` and (optionally) TensorBoard scalars."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        step_key: str = "step",
    ) -> None:
        """``step_key``: the name of the step in the records; ``resume_step``: drop the records
        past it first."""
        self.enabled = enabled
        self.step_key = step_key
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step, step_key)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError as exc:  # tensorboard is a dependency, but do not die for a log sink
                log.warning("TensorBoard disabled: %s", exc)

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Append ``{step_key: step, **values, "time": now}`` (a ``time`` in ``values`` is kept)."""
        if not self.enabled:
            return
        record = {self.step_key: step, **{k: _plain(v) for k, v in values.items()}}
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in (self.step_key, "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
