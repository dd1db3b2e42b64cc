"""How long must the frozen detection probe's heads train? Box AP of the *untrained* start per schedule.

The AP presets of ``benchmarks/transfer.py`` rank inits with the frozen-backbone detection probe
(:mod:`soco_det.transfer.frozen`); its head schedule decides whether AP is off the floor. This script
chooses that schedule on the untrained network alone (the start SoCo's run begins from: same init
scheme and seed), so no pretrained init takes part in the choice: for the preset's scenes (or
``--dataset nuclei``) and each ``--runs`` entry (overrides of the preset's probe settings, e.g.
``iterations=800`` or ``lr=0.002,batch_size=2``) it prints box AP / AP50 per fine-tuning seed, on
every train image, and the minutes per run::

    python benchmarks/frozen_schedule.py --preset cpu_ap --runs iterations=500 iterations=800 \\
        iterations=1000 lr=0.002 iterations=1000,batch_size=2 --seeds 0 1 [--json out.json]

Each run of the cpu_ap scenes takes 1.5-3 minutes on one core; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transfer as bench  # noqa: E402  (benchmarks/transfer.py: the presets and their data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=[k for k, v in bench.PRESETS.items() if "ap" in v], default="cpu_ap")
    parser.add_argument("--dataset", choices=["scenes", "nuclei"], default="scenes")
    parser.add_argument("--runs", nargs="+", default=["iterations=500", "iterations=800"], metavar="KEY=VALUE,...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--out", default="frozen_schedule_out", help="working folder (data, the untrained network)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one per process on a shared machine)")
    args = parser.parse_args(argv)

    import torch

    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig
    from soco_det.export.untrained import save_untrained
    from soco_det.transfer.frozen import FrozenSettings, frozen_detection_probe
    from soco_det.transfer.model import read_weights

    torch.set_num_threads(args.threads)
    preset = bench.PRESETS[args.preset]
    out = Path(args.out)
    paths = bench.dataset_images(args.dataset, preset, out / "data", workers=1)
    cfg = build_config(PretrainConfig, preset["recipe"], preset["pretrain"])
    seed = preset["pretrain_seeds"][0]
    untrained = read_weights(save_untrained(cfg, out / f"untrained{seed}.pt", seed))
    rows = []
    for text in args.runs:
        settings = bench.dataset_preset(preset, args.dataset, bench.parse_settings(text.split(",")))["ap"]["settings"]
        t = time.perf_counter()
        report = frozen_detection_probe(
            {"random": untrained},
            paths["train"],
            paths["val"],
            paths["images"],
            FrozenSettings(**settings),
            seeds=args.seeds,
            fractions=[1.0],
        )
        per_seed = report["results"]["random"]["1"]
        rows.append(
            {
                "run": text,
                "settings": report["settings"],
                "box_ap": [100 * (per_seed[str(s)]["bbox"]["AP"] or 0.0) for s in args.seeds],
                "box_ap50": [100 * (per_seed[str(s)]["bbox"]["AP50"] or 0.0) for s in args.seeds],
                "minutes_per_run": [per_seed[str(s)]["train"]["minutes"] for s in args.seeds],
                "minutes": (time.perf_counter() - t) / 60,
            }
        )
        print_row(rows[-1])
    if args.json:
        from soco_det.atomic import atomic_write_json

        atomic_write_json(Path(args.json), {"preset": args.preset, "dataset": args.dataset, "runs": rows}, indent=2)
        print(f"wrote {args.json}")
    return 0


def print_row(row: dict[str, Any]) -> None:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(
        f"{row['run']:<32} box AP {mean(row['box_ap']):5.2f} ({' / '.join(f'{x:.1f}' for x in row['box_ap'])})  "
        f"AP50 {mean(row['box_ap50']):5.2f} ({' / '.join(f'{x:.1f}' for x in row['box_ap50'])})  "
        f"{mean(row['minutes_per_run']):.1f} min per run",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
