"""Where the boxes land in each view: paper settings against ``data.views.geometry.fit_objects``.

For the sample scenes (``soco_det.synth``), scikit-image's bundled photographs and the real nuclei
tiles of ``soco-det prepare nuclei`` (fluorescence microscopy, nuclei of ~20 px in 128-px tiles), with
their selective-search proposals under the paper settings (``--object-size paper``: filter
``ratio3size0308post``), with every rect kept (``raw``: the small boxes of a domain full of small
objects) and fitted to the objects (``--object-size auto``), this prints per view the share of
the kept boxes on each FPN level, their median side in view pixels and the share under 8 px
(``soco_det.data.view_report``: the real sampler's geometry, the training samples' seeds), for the
paper's views (224/224/112), ``tiny_cpu``'s (64/64/32, thresholds scaled by 64/224) and both with
the fit rule, beside the paper's reference (the official sampler on photographs)::

    python benchmarks/view_levels.py [--scenes 30] [--epochs 4] [--json out.json]

Nothing is downloaded; about half a minute on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soco_det import api  # noqa: E402
from soco_det.data.config import DataConfig, ViewGeometry, ViewLevels, ViewsConfig  # noqa: E402
from soco_det.data.dataset import build_pretrain_dataset  # noqa: E402
from soco_det.data.view_report import PAPER_LEVELS, dataset_view_report  # noqa: E402
from soco_det.datasets import prepare  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
# proposals: name -> api.proposals keywords
PROPOSALS = {
    "paper": dict(object_size="paper"),
    "raw": dict(object_size="paper", filter="raw"),
    "auto": dict(object_size="auto"),
}
DATASETS = {"sample scenes": ("paper", "raw", "auto"), "photographs": ("paper", "raw"), "nuclei": ("paper", "auto")}
# name -> (view sizes, level thresholds, fit_objects)
SETTINGS = {
    "paper 224/224/112": ([224, 224, 112], [48.0, 96.0, 192.0, 224.0], False),
    "paper + fit": ([224, 224, 112], [48.0, 96.0, 192.0, 224.0], True),
    "tiny_cpu 64/64/32": ([64, 64, 32], [14.0, 27.0, 55.0, 64.0], False),
    "tiny_cpu + fit": ([64, 64, 32], [14.0, 27.0, 55.0, 64.0], True),
}


def save_photos(folder: Path, side: int = 400) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True)
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BILINEAR)
        img.save(folder / f"{name}.jpg", quality=90)
    return folder


def report_rows(images: Path, store: Path, epochs: int) -> dict[str, object]:
    out = {}
    for name, (sizes, thresholds, fit) in SETTINGS.items():
        views = ViewsConfig(
            geometry=ViewGeometry(view_sizes=sizes, fit_objects=fit), levels=ViewLevels(level_thresholds=thresholds)
        )
        dataset = build_pretrain_dataset(DataConfig(images=str(images), proposals=str(store), views=views), seed=0)
        out[name] = dataset_view_report(dataset, num_images=len(dataset), epochs=epochs)
    return out


def print_table(title: str, reports: dict[str, object]) -> None:
    print(f"\n{title}")
    print("| views | view | P2 % | P3 % | P4 % | P5 % | median side (px) | < 8 px |")
    print("|---|---|---|---|---|---|---|---|")
    for name, report in reports.items():
        for s in report.views:
            p = s.percent
            print(
                f"| {name} | V{s.view + 1} ({s.size}) | {p[0]:.0f} | {p[1]:.0f} | {p[2]:.0f} | {p[3]:.0f} "
                f"| {s.median_side:.1f} | {100 * s.tiny_share:.0f} % |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=30, help="sample scenes (256 px)")
    parser.add_argument("--epochs", type=int, default=4, help="samples per image (one per epoch)")
    parser.add_argument("--json", default=None, help="write every report as JSON")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="view_levels_") as tmp:
        root = Path(tmp)
        scenes = api.synth(root / "scenes", unlabeled=args.scenes, train=0, val=0, size=256).images / "unlabeled"
        nuclei = prepare("nuclei", root / "nuclei", stride=32)["images"] / "unlabeled"
        data = {"sample scenes": scenes, "photographs": save_photos(root / "photos"), "nuclei": nuclei}
        for data_name, images in data.items():
            for name in DATASETS[data_name]:
                out = root / f"{data_name}-{name}".replace(" ", "_")
                store = api.proposals(images, out, workers=1, **PROPOSALS[name])
                reports = report_rows(images, store.path, args.epochs)
                side = next(iter(reports.values())).proposal_side
                title = f"{data_name}, proposals {name} ({reports[next(iter(reports))].samples} samples, kept median side {side:.0f} px):"
                print_table(title, reports)
                results[f"{data_name}/{name}"] = {k: r.to_dict() for k, r in reports.items()}
    print("\npaper (official sampler on photographs, soco_fpn 224/224/112), % per level:")
    for view, levels in PAPER_LEVELS.items():
        print(f"  {view}: " + ", ".join(f"{k} {v:g}" for k, v in levels.items()))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "paper": PAPER_LEVELS}, indent=2) + "\n")


if __name__ == "__main__":
    main()
