"""``scenes``: the seeded sample scenes of :func:`soco_det.synth.generate`, at the sizes of the CPU
transfer benchmark (``benchmarks/transfer.py --preset cpu``: 600 unlabeled, 300 train and 200 val
scenes of short side 128 px)."""

from __future__ import annotations

from pathlib import Path

DEFAULTS = {"n_unlabeled": 600, "n_train": 300, "n_val": 200, "short_side": 128, "seed": 0}


def prepare_scenes(
    out: str | Path,
    n_unlabeled: int = DEFAULTS["n_unlabeled"],
    n_train: int = DEFAULTS["n_train"],
    n_val: int = DEFAULTS["n_val"],
    short_side: int = DEFAULTS["short_side"],
    seed: int = DEFAULTS["seed"],
    workers: int = 1,
) -> dict[str, Path]:
    """:func:`soco_det.synth.generate` with these defaults; returns its paths."""
    from soco_det.synth import generate

    return generate(
        out, n_unlabeled=n_unlabeled, n_train=n_train, n_val=n_val, short_side=short_side, seed=seed, workers=workers
    )
