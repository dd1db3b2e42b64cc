"""Bad and unusual images: recorded with a reason and skipped, or handled; the run always finishes."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from soco_det.commands.main import main
from soco_det.proposals import ProposalStore, compute_store

EXIF_ORIENTATION = 0x0112


def photo(w=120, h=80):
    return Image.fromarray(data.astronaut()).resize((w, h))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    buf = io.BytesIO()
    photo().save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    (root / "garbage.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("these are not pixels\n")
    photo().convert("L").save(root / "gray.png")
    photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(root / "palette.png")
    photo().convert("RGBA").save(root / "rgba.png")
    photo().convert("CMYK").save(root / "cmyk.jpg")
    gray16 = np.asarray(photo().convert("L"), np.uint16) * 257
    Image.fromarray(gray16).save(root / "gray16.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 CW to display": the displayed image is 80 x 120
    photo().save(root / "rotated.jpg", exif=exif.tobytes())
    photo(10, 10).save(root / "tiny.png")
    photo(300, 300).save(root / "huge.png")  # above the test's max_pixels
    return root


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    return ProposalStore.open(compute_store(images, out, max_pixels=60_000))


def test_file_formats_are_checked(images):
    assert Image.open(images / "gray16.png").mode.startswith("I")
    assert Image.open(images / "cmyk.jpg").mode == "CMYK" and Image.open(images / "palette.png").mode == "P"


@pytest.mark.parametrize(
    "name,reason",
    [
        ("garbage.jpg", "not an image"),
        ("zero.jpg", "not an image"),
        ("notes.jpg", "not an image"),
        ("truncated.jpg", "truncated"),
        ("huge.png", "above the limit of 60000"),
    ],
)
def test_unusable_files_are_recorded_and_skipped(store, name, reason):
    i = store.index(name)
    assert store.status(i) == "failed" and reason in store.reason(i)
    assert store.boxes(i).shape == (0, 4)
    assert reason in store.summary["failures"][name]


@pytest.mark.parametrize("name", ["gray.png", "palette.png", "rgba.png", "cmyk.jpg", "gray16.png", "rotated.jpg"])
def test_unusual_modes_are_decoded(store, name):
    i = store.index(name)
    assert store.status(i) == "ok" and store.size(i) == (120, 80)  # default: no EXIF transpose (official)
    assert store.raw_count(i) > 0


def test_tiny_image_gets_no_proposals_and_no_error(store):
    i = store.index("tiny.png")
    assert store.status(i) == "ok" and store.size(i) == (10, 10)
    assert store.boxes(i).shape == (0, 4) and store.stage(i) == "empty"


def test_summary_counts(store):
    s = store.summary
    assert (s["images"], s["ok"], s["failed"]) == (12, 7, 5)


def test_exif_transpose_is_applied_and_recorded(images, tmp_path):
    rotated = tmp_path / "rot"
    rotated.mkdir()
    (rotated / "rotated.jpg").write_bytes((images / "rotated.jpg").read_bytes())
    plain = ProposalStore.open(compute_store(rotated, tmp_path / "plain"))
    assert main(["proposals", str(rotated), "-o", str(tmp_path / "exif"), "--exif-transpose"]) == 0
    turned = ProposalStore.open(tmp_path / "exif")
    assert plain.exif_transpose is False and turned.exif_transpose is True
    assert plain.size(0) == (120, 80) and turned.size(0) == (80, 120)
    w, h = turned.size(0)
    boxes = turned.boxes(0)
    assert ((boxes[:, 0] + boxes[:, 2] <= w - 1) & (boxes[:, 1] + boxes[:, 3] <= h - 1)).all()


def test_cli_max_pixels_option(images, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "huge.png").write_bytes((images / "huge.png").read_bytes())
    assert main(["proposals", str(one), "-o", str(tmp_path / "s"), "--max-pixels", "1000", "--method", "random"]) == 0
    s = ProposalStore.open(tmp_path / "s")
    assert s.status(0) == "failed" and "decompression bomb" in s.reason(0)
    assert main(["proposals", str(one), "-o", str(tmp_path / "s2"), "--method", "random"]) == 0
    assert ProposalStore.open(tmp_path / "s2").status(0) == "ok"
