"""``soco-det viz predictions``: a fine-tuned detector's boxes and masks drawn on images, beside the
ground truth when a COCO file is given, checked pixel by pixel against the model's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_finetune import scenes, tiny_finetune_argv  # noqa: F401 - scenes is a fixture

from soco_det.commands.main import main
from soco_det.synth.viz import PALETTE
from soco_det.transfer.evaluation import detect, load_detector
from soco_det.transfer.viz import CAPTION, GAP, panel_scale

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_run(scenes, tmp_path_factory):  # noqa: F811 - the imported fixture
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("viz") / "ft"
    argv = tiny_finetune_argv(
        scenes, out, "solver.iterations=4", "solver.steps=[3]", "solver.warmup_iters=1", "model.precise_bn_images=2"
    )
    assert main(argv) == 0
    return out


def _enlarged(path: Path) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    k = panel_scale(image.size)
    return np.asarray(image.resize((image.width * k, image.height * k), Image.NEAREST)).astype(int)


def _outlined(panel: np.ndarray, box, k: int, category: int) -> float:
    """Share of the pixels on a box's left edge that have its category's colour."""
    x1, y1, _, y2 = (int(v * k) for v in box)
    edge = panel[y1 : max(y1 + 1, y2 - 1), min(x1, panel.shape[1] - 1)]
    return float((edge == np.array(PALETTE[(category - 1) % len(PALETTE)])).all(-1).mean())


def test_predictions_are_drawn_beside_the_ground_truth(tiny_run, scenes, tmp_path):  # noqa: F811
    out = tmp_path / "pictures"
    argv = ["viz", "predictions", str(tiny_run), "--images", str(scenes["images"]), "--json", str(scenes["val"])]
    assert main([*argv, "-o", str(out), "--score-thresh", "0", "--device", "cpu"]) == 0
    coco = json.loads(Path(scenes["val"]).read_text())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        Path(im["file_name"]).with_suffix(".png").as_posix() for im in coco["images"]
    )
    info = coco["images"][0]
    source = Path(scenes["images"]) / info["file_name"]
    plain = _enlarged(source)
    h, w, _ = plain.shape
    k = w // info["width"]
    picture = np.asarray(Image.open(out / Path(info["file_name"]).with_suffix(".png")).convert("RGB")).astype(int)
    assert picture.shape == (h + CAPTION, 2 * w + GAP, 3)
    truth, found = picture[CAPTION:, :w], picture[CAPTION:, w + GAP :]
    ann = next(a for a in coco["annotations"] if a["image_id"] == info["id"])
    x, y, bw, bh = ann["bbox"]
    assert _outlined(truth, (x, y, x + bw, y + bh), k, ann["category_id"]) > 0.8
    model, cat_ids, _ = load_detector(tiny_run, torch.device("cpu"))
    (output,) = detect(model, [Image.open(source).convert("RGB")], torch.device("cpu"))
    assert len(output["scores"]) > 0
    best = int(output["scores"].argmax())  # drawn last, on top of every other detection
    assert _outlined(found, output["boxes"][best].tolist(), k, cat_ids[int(output["labels"][best]) - 1]) > 0.8

    # Above every score nothing is drawn: the predictions panel is the image itself.
    high = float(output["scores"].max()) + 1e-3
    assert main([*argv, "-o", str(tmp_path / "none"), "--score-thresh", f"{min(high, 1.0)}", "--device", "cpu"]) == 0
    empty = np.asarray(Image.open(tmp_path / "none" / Path(info["file_name"]).with_suffix(".png")).convert("RGB"))
    assert np.array_equal(empty[CAPTION:, w + GAP :].astype(int), plain)


def test_a_folder_of_images_without_labels(tiny_run, scenes, tmp_path, capsys):  # noqa: F811
    folder = Path(scenes["images"]) / "val"
    out = tmp_path / "pictures"
    assert main(["viz", "predictions", str(tiny_run), "--images", str(folder), "-o", str(out), "-n", "1"]) == 0
    (picture,) = out.glob("*.png")
    first = sorted(folder.iterdir())[0]
    assert picture.name == first.with_suffix(".png").name
    assert np.asarray(Image.open(picture)).shape[:2] == (_enlarged(first).shape[0] + CAPTION, _enlarged(first).shape[1])
    assert main(["viz", "predictions", str(tmp_path), "--images", str(folder), "-o", str(out)]) == 2
    assert "no checkpoints" in capsys.readouterr().err
