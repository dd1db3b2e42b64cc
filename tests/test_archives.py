"""Tar shards and zip archives as input to `proposals` and `pretrain` (``ARCHIVE::MEMBER`` keys).

Fixtures are made here: sample scenes packed into a WebDataset-style tar (``./key.jpg`` plus a
``key.cls`` label member), a zip, a corrupt member, and the same images as loose files to compare.
"""

from __future__ import annotations

import io
import multiprocessing
import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from soco_det import archives, imageio
from soco_det.data.config import DataConfig
from soco_det.errors import ImageError
from soco_det.imageio import load_rgb
from soco_det.proposals import ProposalStore, compute_store


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from soco_det.synth import generate

    base = tmp_path_factory.mktemp("archives")
    generate(base / "synth", n_unlabeled=6, n_train=0, n_val=0, short_side=96, seed=2)
    loose = sorted((base / "synth" / "images" / "unlabeled").glob("*.jpg"))
    root = base / "root"
    (root / "shards").mkdir(parents=True)
    with tarfile.open(root / "shards" / "shard-000.tar", "w") as tar:
        for p in loose[:3]:
            tar.add(p, arcname=f"./{p.name}")  # WebDataset-style members, with a leading ./
            info = tarfile.TarInfo(f"./{p.stem}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"3"))
        jpeg = loose[0].read_bytes()
        info = tarfile.TarInfo("./broken.jpg")
        info.size = len(jpeg) // 3
        tar.addfile(info, io.BytesIO(jpeg[: info.size]))  # a truncated member
    with zipfile.ZipFile(root / "train.zip", "w") as zf:
        for p in loose[3:5]:
            zf.write(p, arcname=f"imgs/{p.name}")
        zf.writestr("imgs/", "")  # a folder entry
    shutil.copy(loose[5], root / "loose.jpg")
    # The same six images as loose files, to compare proposals and pixels with.
    plain = base / "plain"
    plain.mkdir()
    for p in loose:
        shutil.copy(p, plain / p.name)
    return {"root": root, "loose": loose, "plain": plain}


def _expected_keys(loose):
    return (
        ["loose.jpg"]
        + [f"shards/shard-000.tar::{p.name}" for p in loose[:3]]
        + ["shards/shard-000.tar::broken.jpg"]
        + [f"train.zip::imgs/{p.name}" for p in loose[3:5]]
    )


def test_listing_covers_loose_files_and_the_image_members_of_every_archive(packed):
    listing = imageio.list_sources(packed["root"])
    assert listing.root == packed["root"].resolve() and not listing.refused
    assert sorted(listing.keys) == sorted(_expected_keys(packed["loose"]))  # no .cls, no folder entry
    one = imageio.list_sources(packed["root"] / "train.zip")  # one archive as the images
    assert one.root == packed["root"].resolve() and one.keys == [
        f"train.zip::imgs/{p.name}" for p in packed["loose"][3:5]
    ]


def test_members_decode_to_the_loose_files_pixels_and_each_archive_opens_once(packed):
    archives._INDEXES.clear()
    archives.close_all()
    before = archives.OPEN_COUNT["n"]
    root = packed["root"]
    for p in packed["loose"][:3]:
        for _ in range(2):
            img = load_rgb(root / f"shards/shard-000.tar::{p.name}")
            assert np.array_equal(np.asarray(img), np.asarray(load_rgb(p)))
    for p in packed["loose"][3:5]:
        assert np.array_equal(np.asarray(load_rgb(f"{root}/train.zip::imgs/{p.name}")), np.asarray(load_rgb(p)))
    assert archives.OPEN_COUNT["n"] - before == 2  # one tar, one zip: each indexed once in this process
    assert archives.open_count() == 2


def test_bad_members_are_image_errors(packed):
    root = packed["root"]
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(root / "shards/shard-000.tar::broken.jpg")
    with pytest.raises(ImageError, match="no such file.*no member 'nope.jpg'"):
        load_rgb(root / "shards/shard-000.tar::nope.jpg")
    with pytest.raises(ImageError, match="no such file.*archive"):
        load_rgb(root / "missing.tar::a.jpg")
    (root.parent / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ImageError, match="unreadable archive"):
        load_rgb(root.parent / "junk.zip::a.jpg")


def _read_in_child(path: str) -> tuple[bytes, int, int, int]:
    inherited = len(archives._FDS)
    data = archives.read_bytes(path)
    return data, inherited, archives.open_count(), archives.OPEN_COUNT["n"]


def test_a_forked_worker_opens_its_own_descriptor_and_reuses_the_index(packed):
    key = f"{packed['root']}/shards/shard-000.tar::{packed['loose'][1].name}"
    want = packed["loose"][1].read_bytes()
    assert archives.read_bytes(key) == want  # indexed and opened in the parent before the fork
    n_parent = archives.OPEN_COUNT["n"]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        data, inherited, held, n_child = pool.apply(_read_in_child, (key,))
    assert data == want and inherited >= 1
    assert held == 1  # the parent's descriptors were dropped in the child, which opened its own
    assert n_child == n_parent  # the member index came with the fork
    assert archives.read_bytes(key) == want  # the parent's descriptor still works


@pytest.fixture(scope="module")
def stores(packed, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores")
    return (
        ProposalStore.open(compute_store(packed["root"], out / "archives", workers=2, chunk_size=2)),
        ProposalStore.open(compute_store(packed["plain"], out / "plain")),
    )


def test_proposals_from_archives_equal_the_loose_files_and_count_the_bad_member(packed, stores):
    store, plain = stores
    assert sorted(store.paths) == sorted(_expected_keys(packed["loose"]))
    bad = store.index("shards/shard-000.tar::broken.jpg")
    assert store.status(bad) == "failed"
    assert [store.status(i) for i in range(len(store))].count("failed") == 1
    summary = ProposalStore.open(store.path).meta
    keys = _expected_keys(packed["loose"])
    for p, key in zip(packed["loose"], keys[1:4] + keys[5:] + keys[:1]):
        i, j = store.index(key), plain.index(p.name)
        assert store.size(i) == plain.size(j)
        assert np.array_equal(store.boxes(i), plain.boxes(j)), key
    assert summary["root"] == str(packed["root"].resolve())


def test_pretraining_data_joins_every_archive_member_with_its_proposals(packed, stores):
    from soco_det.data import build_pretrain_dataset

    store, _ = stores
    for images in (str(packed["root"]), None):  # the folder, or the store's own list
        cfg = DataConfig(images=images, proposals=str(store.path), batch_size=2, num_workers=0, min_side=16)
        cfg.views.geometry.view_sizes = [64, 64, 32]
        dataset = build_pretrain_dataset(cfg, seed=0)
        assert len(dataset) == 7 and (dataset.store_indices >= 0).all()
        keys = [item.key for item in dataset.items]
        assert keys == list(store.paths) if images is None else sorted(keys) == sorted(store.paths)
    # The truncated member is skipped and counted, like a truncated loose file.
    bad = keys.index("shards/shard-000.tar::broken.jpg")
    sample_views, used, skipped = dataset.views(bad, epoch=0)
    assert used != bad and skipped == 1
    good = keys.index(next(k for k in keys if k.startswith("train.zip::")))
    _, used, skipped = dataset.views(good, epoch=0)
    assert used == good and skipped == 0
