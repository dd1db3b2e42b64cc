"""How many CPU cores a job may use, and the ``auto`` choice of worker counts built on it.

``available_cpus()`` counts the cores this process may run on (its affinity mask: what a batch
scheduler, ``taskset`` or a container granted), not the machine's. ``--workers auto`` of
``soco-det proposals`` is that number; ``data.num_workers: auto`` of a training run divides it
among the processes torchrun started on this node and keeps one core per process for the step.
"""

from __future__ import annotations

import os
from typing import Union

from soco_det.errors import UserError

WorkerCount = Union[int, str]  # a count >= 0, or "auto"


def available_cpus() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def parse_workers(value: WorkerCount, option: str) -> int:
    """``"auto"`` -> :func:`available_cpus`; a whole number (or its text) as it is, for the caller's
    own range check; anything else a :class:`UserError` naming ``option``."""
    if value == "auto":
        return available_cpus()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise UserError(
            f"{option} {value!r}: must be a whole number or auto (the {available_cpus()} cores available)"
        ) from None


def loader_workers(value: WorkerCount) -> int:
    """Data-loader workers of one training process: a count as it is; ``"auto"``: the available cores
    shared by the processes of this node (torchrun's ``LOCAL_WORLD_SIZE``), less one core each for the
    training step itself."""
    if value != "auto":
        return int(value)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, available_cpus() // local - 1)
