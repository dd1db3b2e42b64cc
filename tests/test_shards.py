"""Tar shards at scale and the forms of the image inputs (issue 20, item 1).

1,100 WebDataset-style shards (ImageNet as shards is ~1,282 of them) go through ``proposals`` and
``pretrain`` under ``ulimit -n 256``: each process keeps a bounded pool of open archives. The inputs
may be several paths, brace ranges (``shard-{000..009}.tar``), globs and ``.txt`` list files, and
give the keys the folder gives.
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import REPO, TINY_OVERRIDES
from PIL import Image

from soco_det import archives
from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.imageio import list_sources
from soco_det.proposals import ProposalStore

N_SHARDS = 1100


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def _write_shards(folder: Path, n: int) -> Path:
    """``shard-0000.tar`` ... with one image (``./KEY.jpg``) and its label (``./KEY.cls``) each."""
    folder.mkdir(parents=True)
    for i in range(n):
        with tarfile.open(folder / f"shard-{i:04d}.tar", "w") as tar:
            for name, data in ((f"./{i:06d}.jpg", _jpeg(i)), (f"./{i:06d}.cls", b"%d" % (i % 10))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    return _write_shards(tmp_path_factory.mktemp("shards") / "shards", N_SHARDS)


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _run_limited(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != archives.MAX_OPEN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "soco_det", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_open_files,
    )


def test_1100_shards_under_ulimit_256_go_through_proposals_and_pretrain(many_shards, tmp_path):
    store = tmp_path / "store"
    proposals = ["proposals", str(many_shards), "-o", str(store), "--method", "random"]
    done = _run_limited([*proposals, "--workers", "2", "--chunk-size", "100"])
    assert done.returncode == 0, done.stderr[-3000:]
    opened = ProposalStore.open(store)
    assert len(opened) == N_SHARDS and len(opened.ok_indices()) == N_SHARDS
    assert list(opened.paths) == list_sources(many_shards).keys
    assert opened.paths[0] == "shard-0000.tar::000000.jpg"

    run = tmp_path / "run"
    pattern = str(many_shards / f"shard-{{0000..{N_SHARDS - 1}}}.tar")  # the shell would not expand it: quoted
    overrides = [*TINY_OVERRIDES, "data.batch_size=4", "train.max_steps=3", "data.views.view_sizes=[32,32,16]"]
    pretrain = ["pretrain", "--recipe", "tiny_cpu", "--images", pattern, "--proposals", str(store), "-o", str(run)]
    done = _run_limited([*pretrain, *overrides])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "last.pt").is_file()
    assert "no entry in the proposal store" not in done.stderr  # every image joined with its proposals


def test_the_pool_of_open_archives_is_bounded_and_reopens_what_it_closed(many_shards, monkeypatch):
    monkeypatch.setenv(archives.MAX_OPEN_ENV, "8")
    archives.close_all()
    keys = list_sources(many_shards).keys[:40]
    for key in keys + keys[::-1]:
        assert archives.read_bytes(many_shards / key)[:2] == b"\xff\xd8"  # a JPEG
        assert archives.open_count() <= 8
    assert archives.open_count() == 8
    archives.close_all()


@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> Path:
    return _write_shards(tmp_path_factory.mktemp("ten") / "data", 10)


def test_brace_ranges_globs_list_files_and_several_inputs_give_the_folders_keys(ten, tmp_path, monkeypatch):
    folder = list_sources(ten)
    assert folder.root == ten.resolve() and len(folder.keys) == 10
    listed = ten / "shards.txt"
    listed.write_text("# the shards\n" + "".join(f"shard-{i:04d}.tar\t{i}\n" for i in range(10)))
    for inputs in (
        str(ten / "shard-{0000..0009}.tar"),
        str(ten / "shard-*.tar"),
        str(listed),
        [str(ten / "shard-{0000..0004}.tar"), str(ten / "shard-000[5-9].tar")],
    ):
        got = list_sources(inputs)
        assert (got.root, got.keys) == (folder.root, folder.keys), inputs
    # Inputs in different folders: keyed relative to the folder that holds them all.
    other = tmp_path / "more"
    other.mkdir()
    (other / "extra.jpg").write_bytes(_jpeg(99))
    both = list_sources([ten / "shard-0000.tar", other / "extra.jpg"])
    root = Path(os.path.commonpath([ten.resolve(), other.resolve()]))
    rel = {p: p.resolve().relative_to(root).as_posix() for p in (ten, other)}
    assert both.root == root and both.keys == [f"{rel[other]}/extra.jpg", f"{rel[ten]}/shard-0000.tar::000000.jpg"]
    for bad, words in (
        (str(ten / "shard-{0010..0011}.tar"), "shard-0010.tar, one of the paths of"),
        (str(ten / "nothing-*.tar"), "matches no file or folder"),
        (str(ten / "shard-{0..99999999}.tar"), "a range of more than"),
    ):
        with pytest.raises(UserError, match=words):
            list_sources(bad)

    monkeypatch.chdir(ten)
    assert main(["proposals", "shard-{0000..0009}.tar", "-o", str(tmp_path / "X"), "--method", "random"]) == 0
    assert list(ProposalStore.open(tmp_path / "X").paths) == folder.keys
    assert main(["proposals", "shards.txt", "-o", str(tmp_path / "X"), "--method", "random"]) == 0  # nothing to do


def test_pretraining_takes_the_same_input_forms(ten, tmp_path):
    from soco_det.config import build_config
    from soco_det.data import build_pretrain_dataset
    from soco_det.engine.config import PretrainConfig
    from soco_det.proposals import compute_store

    store = compute_store(ten, tmp_path / "store", method="random")
    forms = [str(ten / "shard-{0000..0009}.tar"), [str(ten / "shard-000[0-4].tar"), str(ten / "shard-000[5-9].tar")]]
    for images in forms:
        data = {"images": images, "proposals": str(store), "num_workers": 0, "min_side": 16}
        cfg = build_config(PretrainConfig, "tiny_cpu", TINY_OVERRIDES, extra={"data": data})
        dataset = build_pretrain_dataset(cfg.data, seed=0)
        assert [item.key for item in dataset.items] == list(ProposalStore.open(store).paths)
        assert (dataset.store_indices >= 0).all()
        assert dataset.views(3, epoch=0)[2] == 0  # read from its shard, nothing skipped
