"""Small matplotlib pictures for reports: metric curves (records from ``engine.metrics.read_metrics``)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from soco_det.atomic import atomic_open


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_png: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
) -> Path:
    """One line per ``name -> (x, y)`` in one axes, written atomically to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, (x, y) in curves.items():
        ax.plot(list(x), list(y), label=name, linewidth=1.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_open(out_png, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return out_png


def metric_curve(records: Sequence[Mapping], key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    """``(x, y)`` of ``key`` over the records that have it."""
    rows = [r for r in records if key in r and x_key in r]
    return [r[x_key] for r in rows], [r[key] for r in rows]
