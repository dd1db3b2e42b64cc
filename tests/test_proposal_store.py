"""The proposal store: read API, memory mapping, atomic completion, official JSON and COCO export."""

import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from skimage import data

from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.proposals import ProposalStore, compute_store
from soco_det.proposals.filters import STAGE_EMPTY, STAGE_MAIN, STAGE_NONE
from soco_det.proposals.interchange import export_coco, export_official_json, import_official_json
from soco_det.proposals.store import STATUS_FAILED, STATUS_OK, ProposalTable, write_store

META = {
    "method": "test",
    "params": {},
    "filter": "ratio3size0308post",
    "max_side": None,
    "exif_transpose": True,
    "keep_raw": False,
    "max_pixels": None,
    "root": "/data/images",
    "shard": None,
}


def small_table():
    t = ProposalTable()
    t.append("a/one.jpg", (200, 100), STATUS_OK, "", STAGE_MAIN, 7, np.array([[1, 2, 40, 50], [0, 0, 99, 60]]))
    t.append("a/two.jpg", (64, 64), STATUS_OK, "", STAGE_EMPTY, 3, np.zeros((0, 4)))
    t.append("b/bad.jpg", (0, 0), STATUS_FAILED, "not an image file", STAGE_NONE, 0, np.zeros((0, 4)))
    t.append("b/ünïcode.png", (300, 300), STATUS_OK, "", STAGE_MAIN, 9, np.array([[5, 6, 100, 120]]))
    return t


def test_read_api(tmp_path):
    path = write_store(tmp_path / "store", small_table(), META)
    store = ProposalStore.open(path)
    assert len(store) == 4 and store.root == "/data/images" and store.exif_transpose is True
    assert list(store.paths) == ["a/one.jpg", "a/two.jpg", "b/bad.jpg", "b/ünïcode.png"]
    assert store.index("b/ünïcode.png") == 3 and store.index("nope.jpg") is None
    assert store.size(0) == (200, 100) and store.size(2) == (0, 0)
    boxes = store.boxes(0)
    assert boxes.dtype == np.int32 and boxes.tolist() == [[1, 2, 40, 50], [0, 0, 99, 60]]
    assert store.boxes(1).shape == (0, 4) and store.boxes(3).tolist() == [[5, 6, 100, 120]]
    assert (store.status(2), store.reason(2), store.stage(1), store.raw_count(0)) == (
        "failed",
        "not an image file",
        "empty",
        7,
    )
    assert store.ok_indices().tolist() == [0, 1, 3]
    # Memory-mapped: the arrays are views of the files, not copies.
    assert isinstance(store._a["boxes"], np.memmap)
    # Pickled for a spawn-started loader worker: only the location travels, the copy re-opens.
    assert len(pickle.dumps(store)) < 500
    clone = pickle.loads(pickle.dumps(store))
    assert clone.boxes(0).tolist() == boxes.tolist() and clone.index("a/two.jpg") == 1
    s = store.summary
    assert s["images"] == 4 and s["failed"] == 1 and s["boxes_per_image"]["mean"] == 1.0
    assert s["failures"] == {"b/bad.jpg": "not an image file"} and s["bytes_per_image"] > 0


def test_unfinished_store_is_refused(tmp_path):
    path = write_store(tmp_path / "store", small_table(), META)
    (path / "meta.json").unlink()
    (path / "parts").mkdir()
    with pytest.raises(UserError, match="not finished"):
        ProposalStore.open(path)
    with pytest.raises(UserError, match="not a proposal store"):
        ProposalStore.open(tmp_path)


def test_rewrite_replaces_old_arrays(tmp_path):
    write_store(tmp_path / "s", small_table(), {**META, "keep_raw": True})
    t = ProposalTable()
    t.append("x.jpg", (10, 10), STATUS_OK, "", STAGE_EMPTY, 0, np.zeros((0, 4)))
    store = ProposalStore.open(write_store(tmp_path / "s", t, META))
    assert len(store) == 1 and not (tmp_path / "s" / "raw_boxes.npy").exists()


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """A real store: selective search on three small photos."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for name, img in [
        ("astronaut.jpg", data.astronaut()),
        ("sub/coffee.png", data.coffee()),
        ("chelsea.jpg", data.chelsea()),
    ]:
        Image.fromarray(img).resize((128, 96)).save(root / name)
    return root, compute_store(root, tmp_path_factory.mktemp("out") / "store")


def test_official_json_round_trip(computed, tmp_path):
    root, path = computed
    store = ProposalStore.open(path)
    assert sum(len(store.boxes(i)) for i in range(len(store))) > 0
    exported = export_official_json(store, tmp_path / "props.json")
    raw = json.loads(exported.read_text())
    assert set(raw) == {"astronaut", "chelsea", "coffee"}
    assert raw["coffee"] == store.boxes(store.index("sub/coffee.png")).tolist()

    back = ProposalStore.open(import_official_json(exported, root, tmp_path / "imported"))
    assert list(back.paths) == list(store.paths)
    for i in range(len(store)):
        np.testing.assert_array_equal(back.boxes(i), store.boxes(i))
        assert back.size(i) == store.size(i)
    # And exporting the import gives the same bytes.
    assert export_official_json(back, tmp_path / "again.json").read_bytes() == exported.read_bytes()


def test_import_reports_unmatched(computed, tmp_path, caplog):
    root, _ = computed
    props = {"astronaut": [[0, 0, 40, 40]], "not_here": [[1, 1, 50, 50]]}
    (tmp_path / "p.json").write_text(json.dumps(props))
    logger = logging.getLogger("soco_det")  # may not propagate to the root logger (setup_logging)
    logger.addHandler(caplog.handler)
    try:
        store = ProposalStore.open(import_official_json(tmp_path / "p.json", root, tmp_path / "imp"))
    finally:
        logger.removeHandler(caplog.handler)
    assert store.summary["unmatched_entries"] == 1 and store.summary["unmatched_examples"] == ["not_here"]
    assert store.status(store.index("chelsea.jpg")) == "missing"
    assert store.boxes(store.index("astronaut.jpg")).tolist() == [[0, 0, 40, 40]]
    assert "match no image" in caplog.text


def test_coco_export_loads_with_pycocotools(computed, tmp_path):
    _, path = computed
    store = ProposalStore.open(path)
    coco = COCO(str(export_coco(store, tmp_path / "coco.json")))
    assert len(coco.getImgIds()) == len(store)
    for i, relpath in enumerate(store.paths):
        (img,) = [im for im in coco.dataset["images"] if im["file_name"] == relpath]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        expected = [[x, y, w + 1, h + 1] for x, y, w, h in store.boxes(i).tolist()]
        assert [a["bbox"] for a in sorted(anns, key=lambda a: a["proposal_index"])] == expected
        assert (img["width"], img["height"]) == store.size(i)


def test_cli_export_import_info(computed, tmp_path, capsys):
    root, path = computed
    assert main(["proposals", "info", str(path)]) == 0
    assert "images: 3 (ok 3, failed 0)" in capsys.readouterr().out
    assert main(["proposals", "export", str(path), "--format", "official-json", "-o", str(tmp_path / "o.json")]) == 0
    assert (
        main(["proposals", "import", str(tmp_path / "o.json"), "--images", str(root), "-o", str(tmp_path / "i")]) == 0
    )
    a, b = ProposalStore.open(path), ProposalStore.open(tmp_path / "i")
    assert all(np.array_equal(a.boxes(i), b.boxes(i)) for i in range(len(a)))
    assert main(["proposals", "export", str(path), "--format", "coco", "-o", str(tmp_path / "c.json")]) == 0
    # Wrong usage is argparse's error for that sub-command (usage + one line, exit 2), not a traceback.
    with pytest.raises(SystemExit) as exc:
        main(["proposals", "import", str(tmp_path / "o.json"), "-o", str(tmp_path / "j")])
    assert exc.value.code == 2
    assert "soco-det proposals import: error: the following arguments are required: --images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["proposals", "merge", "--help"])
    assert "Combine the partial stores" in capsys.readouterr().out


def test_viz_proposals_draws_the_boxes(computed, tmp_path):
    root, path = computed
    store = ProposalStore.open(path)
    i = store.index("astronaut.jpg")
    assert len(store.boxes(i)) > 0
    assert main(["viz", "proposals", str(path), "--image", "astronaut", "-o", str(tmp_path / "p.png")]) == 0
    drawn = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
    plain = np.asarray(Image.open(root / "astronaut.jpg").convert("RGB")).astype(int)
    assert drawn.shape == plain.shape
    x, y, w, h = store.boxes(i)[0]
    changed = np.abs(drawn - plain).sum(-1) > 0
    assert changed[y, x : x + w + 1].all() and changed.mean() < 0.9  # outlines, not filled boxes
    assert main(["viz", "proposals", str(path), "--image", "nope", "-o", str(tmp_path / "q.png")]) == 2


def test_viz_proposals_takes_the_image_path_as_the_readme_shows(computed, tmp_path, monkeypatch, capsys):
    """``--image`` accepts the image file itself, absolute or relative to the working folder, as well as
    the store's key; a file outside the store's images root is a one-line error."""
    from soco_det.proposals.viz import find_image

    root, path = computed
    store = ProposalStore.open(path)
    coffee = store.index("sub/coffee.png")
    assert find_image(store, str(root / "sub" / "coffee.png")) == coffee
    monkeypatch.chdir(root.parent)
    assert find_image(store, f"{root.name}/sub/coffee.png") == coffee
    assert (
        main(["viz", "proposals", str(path), "--image", f"{root.name}/sub/coffee.png", "-o", str(tmp_path / "c.png")])
        == 0
    )
    assert Image.open(tmp_path / "c.png").size == (128, 96)
    outside = tmp_path / "other.jpg"
    Image.fromarray(data.chelsea()).save(outside)
    assert main(["viz", "proposals", str(path), "--image", str(outside), "-o", str(tmp_path / "o.png")]) == 2
    assert f"--image {outside}: not under the store's images root" in capsys.readouterr().err
