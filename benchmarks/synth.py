"""Speed of the sample-scene generator: scenes per second for ``soco_det.synth.generate``.

Usage: ``.venv/bin/python benchmarks/synth.py [--scenes 1000] [--size 256] [--workers 1 2]``

For each worker count it times one ``generate`` call making ``--scenes`` labeled scenes (drawing,
JPEG encoding, RLE annotations, JSON), after the texture bank is loaded; it prints wall-clock rates
and, for one process, the rate by CPU time too, which a busy shared machine disturbs less. The
baseline, measured right before each call, is the part no generator can skip: JPEG-encoding and
writing as many images of the same size; the ratio says what drawing and annotating cost on top.
Target: 1000 scenes of 256 px well under a minute on one process (aim: under 20 s).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from soco_det.synth import generate
from soco_det.synth.coco import encode_jpeg
from soco_det.synth.scenes import make_scene
from soco_det.synth.textures import texture_bank


def _jpeg_baseline(out: Path, scenes: int, size: int) -> float:
    """Wall seconds to encode and write ``scenes`` JPEGs of one pre-drawn scene."""
    image = make_scene(0, "train", 0, size).image
    out.mkdir(parents=True)
    start = time.perf_counter()
    for i in range(scenes):
        (out / f"{i:06d}.jpg").write_bytes(encode_jpeg(image))
    took = time.perf_counter() - start
    shutil.rmtree(out)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    texture_bank()  # load once, as every worker process does at its start
    root = Path(tempfile.mkdtemp(prefix="soco_synth_bench_"))
    try:
        for run, workers in enumerate(args.workers):
            base = _jpeg_baseline(root / "baseline", args.scenes, args.size)
            start, cpu = time.perf_counter(), time.process_time()
            generate(
                root / f"run{run}",
                n_unlabeled=0,
                n_train=args.scenes,
                n_val=0,
                short_side=args.size,
                seed=0,
                workers=workers,
            )
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
            by_cpu = f", {args.scenes / cpu:.1f} scenes per CPU-second" if workers == 1 else ""
            print(
                f"generate workers={workers}: {args.scenes / took:7.1f} scenes/s ({took:.2f} s wall for "
                f"{args.scenes} scenes of {args.size} px{by_cpu}); JPEG-only baseline "
                f"{args.scenes / base:.1f} images/s -> ratio {took / base:.1f}x"
            )
            shutil.rmtree(root / f"run{run}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
