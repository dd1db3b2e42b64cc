"""Hostile and careless input on the newer surfaces (issue 19): archives, evaluate / export / probe
outputs, merges, weight files, stores, proposal coverage. One test (or a few) per point of the
issue, numbered as there; each asserts that nothing is lost and that the message is one clear line,
or that the bad parts are counted and the rest succeeds.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import REPO, TINY_OVERRIDES, pretrain_cli_args, sample_data, tiny_config  # noqa: F401
from PIL import Image
from test_faults import _tmpfs

from soco_det.commands.main import main
from soco_det.engine.trainer import pretrain
from soco_det.errors import UserError
from soco_det.proposals import ProposalStore

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """cli.main attaches its stderr handler once; drop it so it writes to this test's stderr."""
    import logging

    logger = logging.getLogger("soco_det")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_soco_det", False)]
    propagate, logger.propagate = logger.propagate, True  # caplog sees the records
    yield
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_soco_det", False)]
    logger.propagate = propagate


def error_line(err: str) -> str:
    """The one error line of a command's stderr (log lines may precede it; no traceback)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if line.startswith("soco-det ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """One step of the tiny pretraining config (a run folder with checkpoints and config.yaml)."""
    from engine_fixtures import make_sample_data

    data = make_sample_data(tmp_path_factory.getbasetemp() / "engine_sample_data")
    run = tmp_path_factory.mktemp("pre") / "run"
    pretrain(tiny_config(data, "train.max_steps=1", "train.ckpt_every=1"), run)
    return run


# ------------------------------------------------------------------ 1. evaluate never writes into a run


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    import soco_det.synth as synth
    from test_finetune import tiny_finetune_argv

    torch.set_num_threads(1)
    scenes = synth.generate(tmp_path_factory.mktemp("scenes"), n_unlabeled=0, n_train=2, n_val=1, short_side=96, seed=3)
    out = tmp_path_factory.mktemp("ft") / "run"
    argv = tiny_finetune_argv(
        scenes, out, "solver.iterations=2", "solver.steps=[1]", "solver.warmup_iters=1", "checkpoint_period=2"
    )
    assert main(argv) == 0
    return out, scenes


def test_evaluate_refuses_a_run_folder_and_earlier_results_and_locks_its_folder(finetune_run, tmp_path, capsys):
    from soco_det.runlock import FolderLock

    run, scenes = finetune_run
    data = ["--json", str(scenes["val"]), "--images", str(scenes["images"]), "--device", "cpu"]
    before = _files(run)
    for out, flags in (
        (run, []),
        (run, ["--overwrite"]),
        (run / "eval" / "step_00000002", []),
        (run / "checkpoints", []),
    ):
        assert main(["evaluate", str(run), *data, "-o", str(out), *flags]) == 2
        err = error_line(capsys.readouterr().err)
        assert str(run) in err and "run folder" in err
    assert _files(run) == before  # the run's own metrics.json (its final AP) is untouched

    ev = tmp_path / "eval"
    assert main(["evaluate", str(run), *data, "-o", str(ev)]) == 0
    first = _files(ev)
    assert "metrics.json" in first
    assert main(["evaluate", str(run), *data, "-o", str(ev)]) == 2
    assert "--overwrite" in error_line(capsys.readouterr().err)
    with FolderLock(ev, "evaluation folder"):  # another evaluation writing there
        assert main(["evaluate", str(run), *data, "-o", str(ev), "--overwrite"]) == 2
        assert "in use by another process" in error_line(capsys.readouterr().err)
    assert {k: v for k, v in _files(ev).items() if k != ".lock"} == {k: v for k, v in first.items() if k != ".lock"}
    # A failing evaluation with --overwrite puts the old results back.
    assert main(["evaluate", str(tmp_path / "nope"), *data, "-o", str(ev), "--overwrite"]) == 2
    capsys.readouterr()
    assert _files(ev)["metrics.json"] == first["metrics.json"] and not list(tmp_path.glob("eval.old-*/metrics.json"))
    assert main(["evaluate", str(run), *data, "-o", str(ev), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("eval.old-*")
    assert (aside / "metrics.json").read_bytes() == first["metrics.json"]


# ------------------------------------------------------------------ 2. export / probe never replace a file


def test_export_and_probe_refuse_existing_files_and_a_runs_own_checkpoint(pretrain_run, tmp_path, capsys):
    last = pretrain_run / "checkpoints" / "last.pt"
    kept = last.read_bytes()
    for argv in (
        ["export", str(pretrain_run), "--to", "timm", "-o", str(last)],
        ["export", str(pretrain_run), "--to", "timm", "-o", str(last), "--overwrite"],
        ["probe", str(pretrain_run), "-o", str(pretrain_run / "config.yaml"), "--overwrite"],
    ):
        assert main(argv) == 2, argv
        err = error_line(capsys.readouterr().err)
        assert "files of the run folder" in err and str(pretrain_run) in err
    assert last.read_bytes() == kept

    out = tmp_path / "r18.pth"
    assert main(["export", str(pretrain_run), "--to", "timm", "-o", str(out)]) == 0
    first = out.read_bytes()
    assert main(["export", str(pretrain_run), "--to", "timm", "-o", str(out)]) == 2
    assert "file exists; pass --overwrite" in error_line(capsys.readouterr().err)
    results = tmp_path / "probe.json"
    results.write_text('{"earlier": "results"}')
    assert main(["probe", str(pretrain_run), "-o", str(results)]) == 2  # refused before any work
    assert "file exists; pass --overwrite" in error_line(capsys.readouterr().err)
    assert out.read_bytes() == first and results.read_text() == '{"earlier": "results"}'
    assert (
        main(["export", str(pretrain_run), "--to", "timm", "--network", "target", "-o", str(out), "--overwrite"]) == 0
    )
    (aside,) = tmp_path.glob("r18.pth.old-*")
    assert aside.read_bytes() == first and out.is_file()


# ------------------------------------------------------------------ 3. archive bombs


def _count(store: ProposalStore) -> dict[str, str]:
    return {p: store.reason(i) for i, p in enumerate(store.paths) if store.status(i) != "ok"}


def test_oversized_sparse_and_lying_archive_members_fail_as_counted_bad_images(tmp_path, monkeypatch):
    from soco_det import archives
    from soco_det.errors import ImageError
    from soco_det.imageio import load_rgb
    from soco_det.proposals import compute_store

    root = tmp_path / "images"
    root.mkdir()
    with zipfile.ZipFile(root / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ok.jpg", _jpeg(0))
        with zf.open("bomb.jpg", "w", force_zip64=True) as member:  # 257 MiB of zeros in ~250 KB
            block = bytes(1 << 20)
            for _ in range(257):
                member.write(block)
    assert (root / "bomb.zip").stat().st_size < 2 * 2**20
    with tarfile.open(root / "sparse.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "ok.jpg", _jpeg(1))
        info = tarfile.TarInfo("sparse.jpg")  # a few KB declaring 16 GiB of (sparse) data
        info.pax_headers = {
            "GNU.sparse.size": str(16 * 2**30),
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.offset": str(16 * 2**30),
            "GNU.sparse.numbytes": "0",
        }
        tar.addfile(info, io.BytesIO(b""))
    assert (root / "sparse.tar").stat().st_size < 64 * 1024
    # A zip whose member inflates to more than its table of contents declares (a lying header).
    with zipfile.ZipFile(root / "liar.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar.jpg", _jpeg(2) + bytes(100_000))
    data = bytearray((root / "liar.zip").read_bytes())
    info = zipfile.ZipFile(root / "liar.zip").getinfo("liar.jpg")
    declared = info.file_size.to_bytes(4, "little")
    at = data.rindex(declared)  # the central directory's uncompressed size
    data[at : at + 4] = (1000).to_bytes(4, "little")
    (root / "liar.zip").write_bytes(bytes(data))

    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb.jpg.*is 269484032 bytes, above the limit of 268435456"):
        load_rgb(f"{root}/bomb.zip::bomb.jpg")
    with pytest.raises(ImageError, match="sparse tar member declaring 17179869184 bytes"):
        load_rgb(f"{root}/sparse.tar::sparse.jpg")
    with pytest.raises(ImageError, match="inflates to other than its declared 1000 bytes"):
        load_rgb(f"{root}/liar.zip::liar.jpg")
    assert time.perf_counter() - t0 < 5  # refused from the headers, never inflated

    store = ProposalStore.open(compute_store(root, tmp_path / "store", method="random"))
    failed = _count(store)
    assert sorted(failed) == ["bomb.zip::bomb.jpg", "liar.zip::liar.jpg", "sparse.tar::sparse.jpg"]
    assert [store.status(store.index(k)) for k in ("bomb.zip::ok.jpg", "sparse.tar::ok.jpg")] == ["ok", "ok"]
    assert store.summary["failed"] == 3 and store.summary["ok"] == 2

    # The limit is configurable: below a normal image's size, that image fails too.
    monkeypatch.setenv(archives.MAX_MEMBER_ENV, "1000")
    with pytest.raises(ImageError, match="above the limit of 1000 bytes"):
        load_rgb(f"{root}/sparse.tar::ok.jpg")


# ------------------------------------------------------------------ 4. probe validates COCO as fine-tuning


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c["images"][0].update(file_name="../../outside.jpg"), "not a relative path inside the images root"),
        (lambda c: c["annotations"][0].update(bbox="oops"), "'bbox' must be [x, y, width, height] numbers"),
        (lambda c: c["annotations"][0].update(category_id=999), "category_id 999 is not in 'categories'"),
    ],
)
def test_probe_refuses_coco_files_that_fine_tuning_refuses(tmp_path, change, words):
    import soco_det.synth as synth
    from soco_det.probe.objects import read_objects

    scenes = synth.generate(tmp_path / "s", n_unlabeled=0, n_train=2, n_val=0, short_side=64, seed=1)
    coco = json.loads(scenes["train"].read_text())
    (tmp_path / "outside.jpg").write_bytes(_jpeg(0))
    change(coco)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}: .*{re.escape(words)}"):
        read_objects(bad, scenes["images"])


def test_probe_command_names_the_coco_problem_in_one_line(pretrain_run, tmp_path, capsys):
    import soco_det.synth as synth

    scenes = synth.generate(tmp_path / "s", n_unlabeled=0, n_train=2, n_val=1, short_side=64, seed=1)
    coco = json.loads(scenes["val"].read_text())
    coco["annotations"][0]["bbox"] = "oops"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    argv = ["probe", str(pretrain_run), "--train-json", str(scenes["train"]), "--val-json", str(bad)]
    assert main([*argv, "--images", str(scenes["images"]), "--device", "cpu", "-o", str(tmp_path / "p.json")]) == 2
    err = error_line(capsys.readouterr().err)
    assert str(bad) in err and "'bbox' must be" in err and not (tmp_path / "p.json").exists()


# ------------------------------------------------------------------ 5 and 10. archive member names, truncation


@pytest.fixture
def messy_archives(tmp_path):
    """A folder with: a shard holding ``../../x.jpg``, ``/abs.jpg``, ``./dup.jpg`` beside ``dup.jpg``
    and two good images; a truncated shard (its last member cut off); a zip cut off at its end;
    a loose image."""
    root = tmp_path / "images"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tar:
        for name, seed in (("../../x.jpg", 0), ("/abs.jpg", 1), ("./dup.jpg", 2), ("dup.jpg", 3)):
            _add(tar, name, _jpeg(seed))
        _add(tar, "good1.jpg", _jpeg(4))
        _add(tar, "./good2.jpg", _jpeg(5))
    with tarfile.open(root / "b.tar", "w") as tar:
        _add(tar, "whole.jpg", _jpeg(6))
        _add(tar, "cut.jpg", _jpeg(7, size=128))
    data = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(data[: len(data) // 2])  # inside cut.jpg
    with zipfile.ZipFile(root / "c.zip", "w") as zf:
        zf.writestr("z.jpg", _jpeg(8))
    data = (root / "c.zip").read_bytes()
    (root / "c.zip").write_bytes(data[:-30])  # the table of contents is gone
    (root / "loose.jpg").write_bytes(_jpeg(9))
    return root


def test_unsafe_and_shared_member_names_are_refused_at_listing_and_never_stored(messy_archives, tmp_path, capsys):
    from soco_det.data import build_pretrain_dataset
    from soco_det.data.config import DataConfig
    from soco_det.imageio import list_sources

    listing = list_sources(messy_archives)
    assert listing.keys == ["loose.jpg", "a.tar::good1.jpg", "a.tar::good2.jpg", "b.tar::cut.jpg", "b.tar::whole.jpg"]
    assert sorted(listing.refused) == ["a.tar::../../x.jpg", "a.tar::/abs.jpg", "a.tar::dup.jpg", "c.zip"]
    assert "'..' component" in listing.refused["a.tar::../../x.jpg"]
    assert "2 members are named 'dup.jpg'" in listing.refused["a.tar::dup.jpg"]

    store_dir = tmp_path / "store"
    assert main(["proposals", str(messy_archives), "-o", str(store_dir), "--method", "random"]) == 0
    assert "left out when listing: 4" in capsys.readouterr().err
    store = ProposalStore.open(store_dir)  # the whole store is usable: no unsafe key in it
    assert list(store.paths) == listing.keys and sorted(store.summary["refused"]) == sorted(listing.refused)
    assert _count(store) == {"b.tar::cut.jpg": store.reason(store.index("b.tar::cut.jpg"))}
    assert "truncated archive" in store.reason(store.index("b.tar::cut.jpg"))
    assert main(["proposals", "export", str(store_dir), "--format", "coco", "-o", str(tmp_path / "p.json")]) == 0
    cfg = DataConfig(images=str(messy_archives), proposals=str(store_dir), num_workers=0, min_side=16)
    cfg.views.view_sizes = [32, 32, 16]
    dataset = build_pretrain_dataset(cfg, seed=0)
    assert [item.key for item in dataset.items] == listing.keys and (dataset.store_indices >= 0).all()


# ------------------------------------------------------------------ 6. an interrupted merge, two merges at once


SLOW_MERGE = """
import sys, time
import soco_det.proposals.store as store
real = store.write_store
def slow(out, *args, **kwargs):
    real(out, *args, **kwargs)  # every file of the partial store written, then the process is killed
    print("written", flush=True)
    time.sleep(120)
store.write_store = slow
from soco_det.proposals.runner import merge_stores
merge_stores([sys.argv[1]], sys.argv[2])
"""


def test_a_killed_merge_is_redone_and_a_concurrent_one_is_told_in_use(sample_data, tmp_path, capsys):
    out = tmp_path / "merged"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(sample_data["proposals"]), str(out)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "written"
        assert not out.exists()  # nothing half-written where the store goes
        assert main(["proposals", "merge", str(sample_data["proposals"]), "-o", str(out)]) == 2
        err = error_line(capsys.readouterr().err)
        assert f"in use by another process (pid {child.pid} on " in err
    finally:
        child.kill()
        child.wait()
    assert not out.exists()
    assert main(["proposals", "merge", str(sample_data["proposals"]), "-o", str(out)]) == 0
    merged = ProposalStore.open(out)
    assert list(merged.paths) == list(ProposalStore.open(sample_data["proposals"]).paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial folder, no lock file left


# ------------------------------------------------------------------ 7. export onto a full disk


def test_export_onto_a_full_disk_is_one_line_naming_the_file(pretrain_run, tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "size=1m") as full:
        out = full / "tv.pth"
        assert main(["export", str(pretrain_run), "--to", "torchvision", "-o", str(out)]) == 1
        err = error_line(capsys.readouterr().err)
        assert f"{out}: No space left on device" in err and "unexpected pos" not in err
        assert list(full.iterdir()) == []  # the temporary file is gone


def test_a_failing_torch_save_is_an_oserror_naming_the_file(pretrain_run, tmp_path, monkeypatch):
    """The same without a tmpfs: the file under torch.save fails with ENOSPC after a few KB."""
    import contextlib
    import errno

    from soco_det import atomic
    from soco_det.export import export_checkpoint

    real_open = atomic.atomic_open

    class Full:
        def __init__(self, handle):
            self.handle, self.n = handle, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 4000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    @contextlib.contextmanager
    def full_open(path, mode="wb"):
        with real_open(path, mode) as handle:
            yield Full(handle)

    monkeypatch.setattr(atomic, "atomic_open", full_open)
    for to in ("torchvision", "detectron2"):
        with pytest.raises(OSError) as info:
            export_checkpoint(pretrain_run, to, tmp_path / f"out_{to}")
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / f"out_{to}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 8. stores: old ones, boxes out of range


def _without_checksums(store: Path) -> dict:
    meta = json.loads((store / "meta.json").read_text())
    del meta["checksums"]
    (store / "meta.json").write_text(json.dumps(meta))
    return meta


def test_a_store_without_checksums_is_checked_and_checksummed_on_first_open(sample_data, tmp_path, caplog):
    store = Path(shutil.copytree(sample_data["proposals"], tmp_path / "old"))
    _without_checksums(store)
    ProposalStore.open(store)
    assert "store written without checksums" in caplog.text
    meta = json.loads((store / "meta.json").read_text())
    assert set(meta["checksums"]) >= {"boxes.npy", "paths.npy", "failures.json", "summary.json"}
    boxes = store / "boxes.npy"  # from now on a damaged file is found
    data = bytearray(boxes.read_bytes())
    data[-3] ^= 0xFF
    boxes.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"damaged \(boxes.npy differs"):
        ProposalStore.open(store)


def test_a_read_only_store_without_checksums_is_refused_with_the_command_that_upgrades_it(
    sample_data, tmp_path, capsys
):
    with _tmpfs(tmp_path / "ro", "size=4m") as mnt:
        store = Path(shutil.copytree(sample_data["proposals"], mnt / "old"))
        _without_checksums(store)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(UserError, match=r"no checksums .* `soco-det proposals merge .*old -o NEW_STORE`"):
            ProposalStore.open(store)
        copy = tmp_path / "checked"
        assert main(["proposals", "merge", str(store), "-o", str(copy)]) == 0
        assert ProposalStore.open(copy).meta["checksums"]


def test_boxes_outside_their_image_are_a_damaged_store(sample_data, tmp_path):
    from soco_det.proposals.store import write_store

    table = ProposalStore.open(sample_data["proposals"]).table()
    w, h = table.sizes[2]
    table.boxes[2] = np.array([[0, 0, 10, 10], [-1_000_000, 5, 1_000_000, 8]], np.int32)
    store = write_store(tmp_path / "wild", table, {"root": str(sample_data["images"]), "method": "x"})
    with pytest.raises(UserError, match=rf"box \[-1000000, 5, 1000000, 8\] \(x, y, w, h\) lies outside its {w}x{h}"):
        ProposalStore.open(store)
    cfg = tiny_config({"images": sample_data["images"], "proposals": store}, "train.max_steps=1")
    with pytest.raises(UserError, match="proposal store is damaged"):
        pretrain(cfg, tmp_path / "run")
    table.boxes[2] = np.array([[0, 0, w - 1, h]], np.int32)  # one pixel too tall
    with pytest.raises(UserError, match="lies outside"):
        ProposalStore.open(write_store(tmp_path / "tall", table, {"root": "x", "method": "x"}))


# ------------------------------------------------------------------ 9. weight files


@pytest.fixture(scope="module")
def exports(pretrain_run, tmp_path_factory):
    from soco_det.export import export_checkpoint

    out = tmp_path_factory.mktemp("exports")
    return {to: export_checkpoint(pretrain_run, to, out / f"x_{to}") for to in ("detectron2", "mmdet", "timm")}


def _init(path: Path):
    from soco_det.config import build_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.export.init_weights import init_from_weights
    from soco_det.models import build_model

    cfg = build_config(PretrainConfig, "tiny_cpu", TINY_OVERRIDES).model
    return init_from_weights(build_model(cfg), path, cfg)


def test_benign_detectron2_and_mmdet_files_with_numpy_values_load(exports, tmp_path):
    with open(exports["detectron2"], "rb") as f:
        d2 = pickle.load(f)
    d2["__meta__"] = {"step": np.int64(7), "lr": np.float64(0.1), "dtype": np.dtype("float32")}
    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump(d2, f, protocol=protocol)
        report = _init(path)
        assert report.kind == "detectron2" and any(k.startswith("online.neck.") for k in report.loaded)
    mm = torch.load(exports["mmdet"], weights_only=True)
    mm["meta"].update(epoch=np.int64(12), hook_msgs={"best_score": np.float64(0.4)}, arr=np.arange(3))
    torch.save(mm, tmp_path / "mm.pth")
    assert _init(tmp_path / "mm.pth").kind == "mmdetection"


def test_weight_files_that_hold_code_are_refused_in_our_words(sample_data, tmp_path, capsys):
    from soco_det.torch_io import torch_load

    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Path("/")}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "x": os.system}, f, protocol=2)
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(UserError) as info:
            torch_load(tmp_path / name)
        msg = str(info.value)
        assert "which is not weights data; refused without running it" in msg, msg
        assert "weights_only" not in msg and "\x1b" not in msg and len(msg) < 300, msg
    argv = pretrain_cli_args(sample_data, tmp_path / "run", f"model.init={tmp_path / 'evil.pth'}", "train.max_steps=1")
    assert main(argv) == 2
    assert "not weights data" in error_line(capsys.readouterr().err)


def test_non_finite_weights_in_model_init_are_refused_naming_the_tensor(exports, tmp_path):
    state = torch.load(exports["timm"], weights_only=True)
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(UserError, match=r"nan.pth: tensor 'layer2.0.conv1.weight' has 1 non-finite value"):
        _init(tmp_path / "nan.pth")


# ------------------------------------------------------------------ 11. a store that covers few images


def test_pretraining_refuses_a_store_that_covers_few_images(sample_data, tmp_path):
    from soco_det.proposals import compute_store

    one = tmp_path / "one"
    one.mkdir()
    first = sorted(sample_data["images"].glob("*.jpg"))[0]
    shutil.copy(first, one / first.name)
    store = compute_store(one, tmp_path / "store", method="random")
    n = len(list(sample_data["images"].glob("*.jpg")))
    cfg = tiny_config({"images": sample_data["images"], "proposals": store}, "train.max_steps=1")
    with pytest.raises(UserError, match=rf"only 1 of the {n} images have proposals .*`soco-det proposals "):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    lenient = tiny_config(
        {"images": sample_data["images"], "proposals": store}, "train.max_steps=1", "data.min_proposal_coverage=0"
    )
    pretrain(lenient, tmp_path / "run")
    with pytest.raises(UserError, match="min_proposal_coverage: a share in"):
        tiny_config(sample_data, "data.min_proposal_coverage=1.5")


# ------------------------------------------------------------------ 12. --max-pixels 0 means no limit


def test_max_pixels_zero_lifts_pillows_own_limit_too(tmp_path, monkeypatch):
    from soco_det.errors import ImageError
    from soco_det.imageio import load_rgb
    from soco_det.proposals import compute_store

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((120, 100, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # Pillow refuses above 8000 pixels (12000 here)
    assert load_rgb(images / "a.png", max_pixels=None).size == (100, 120)
    with pytest.raises(ImageError, match="above the limit of 5000"):
        load_rgb(images / "a.png", max_pixels=5000)
    assert main(["proposals", str(images), "-o", str(tmp_path / "s"), "--method", "random", "--max-pixels", "0"]) == 0
    assert ProposalStore.open(tmp_path / "s").status(0) == "ok"
    assert Image.MAX_IMAGE_PIXELS == 4000  # restored
    compute_store(images, tmp_path / "s2", method="random")  # the default limit (64 Mpx) allows it too
