"""The proposal job: parallel == serial, shards + merge == one run, resume after kills, no-op rerun."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.proposals import ProposalStore, compute_store, merge_stores
from soco_det.proposals.methods import run_method, upscale_rects

PHOTOS = [data.astronaut, data.coffee, data.chelsea, data.rocket, data.immunohistochemistry]

# A slow, deterministic method for the kill tests: the delay leaves time to kill the run mid-way.
# It lives in a script so that spawn-started workers (which re-import the main script) know it.
SLOW_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from soco_det.proposals.methods import register_method

    def slow_boxes(image, params):
        time.sleep(float(os.environ.get("SLOW_TEST_DELAY", "0")))  # not a param: it must not change the store
        h, w = image.shape[:2]
        s = int(image[::7, ::7].sum())
        return np.array([[s % 11, s % 5, 40 + s % 17, 40 + s % 13], [0, 0, w - 1, h - 1], [3, 4, 60, 45]], np.int32)

    register_method("slow_test", slow_boxes, {})

    if __name__ == "__main__":
        from soco_det.logs import setup_logging
        from soco_det.proposals import compute_store
        setup_logging("INFO")
        compute_store(sys.argv[1], sys.argv[2], method="slow_test", workers=2, chunk_size=1)
""")


def write_photos(root: Path, n: int, size=(96, 72)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = PHOTOS[i % len(PHOTOS)]()
        img = np.roll(img, 37 * i, axis=1)  # distinct images even when the photo repeats
        Image.fromarray(img).resize(size).save(root / f"img_{i:03d}.png")
    return root


def same_store(a: Path, b: Path) -> None:
    sa, sb = ProposalStore.open(a), ProposalStore.open(b)
    assert list(sa.paths) == list(sb.paths)
    for i in range(len(sa)):
        np.testing.assert_array_equal(sa.boxes(i), sb.boxes(i))
        assert sa.size(i) == sb.size(i) and sa.stage(i) == sb.stage(i) and sa.raw_count(i) == sb.raw_count(i)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"), 4)


@pytest.fixture(scope="module")
def serial(photos, tmp_path_factory):
    return compute_store(photos, tmp_path_factory.mktemp("serial") / "store", workers=1, chunk_size=3)


def test_workers_equal_serial_and_rerun_is_noop(photos, serial, tmp_path, caplog):
    store = ProposalStore.open(serial)
    assert len(store) == 4 and store.summary["computed"] == 4 and not (serial / "parts").exists()
    assert sum(len(store.boxes(i)) for i in range(4)) > 0
    par = compute_store(photos, tmp_path / "par", workers=2, chunk_size=1)
    same_store(serial, par)
    before = {p.name: p.stat().st_mtime_ns for p in par.iterdir()}
    compute_store(photos, par, workers=2)
    assert {p.name: p.stat().st_mtime_ns for p in par.iterdir()} == before  # nothing rewritten
    with pytest.raises(UserError, match="other settings"):
        compute_store(photos, par, filter="ratio3size0308")


def test_shards_and_merge_equal_single_run(photos, serial, tmp_path):
    shards = [compute_store(photos, tmp_path / f"s{k}", shard=f"{k}/3") for k in range(3)]
    assert [len(ProposalStore.open(s)) for s in shards] == [2, 1, 1]  # every 3rd image of the sorted list
    with pytest.raises(UserError, match="missing shard"):
        merge_stores(shards[:2], tmp_path / "partial")
    assert main(["proposals", "merge", *map(str, shards), "-o", str(tmp_path / "merged")]) == 0
    same_store(serial, tmp_path / "merged")
    with pytest.raises(UserError, match="K must be"):
        compute_store(photos, tmp_path / "x", shard="3/3")


def test_new_images_are_added_incrementally(tmp_path):
    root = write_photos(tmp_path / "imgs", 3)
    out = compute_store(root, tmp_path / "store", method="random")
    Image.fromarray(data.camera()).resize((80, 80)).save(root / "zz_new.png")
    compute_store(root, out, method="random")
    s = ProposalStore.open(out)
    assert len(s) == 4 and s.summary["computed"] == 1 and s.summary["reused"] == 3
    same_store(out, compute_store(root, tmp_path / "fresh", method="random"))


def test_max_side_maps_rects_back_to_full_resolution(photos):
    img = np.asarray(Image.open(photos / "img_000.png").convert("RGB"))
    full = np.asarray(Image.fromarray(img).resize((192, 144)))
    rects = run_method("selective_search", full, {"scale": 300.0, "sigma": 0.9, "min_size": 100}, max_side=96)
    assert len(rects) > 0 and rects.dtype == np.int32
    assert (
        (rects[:, 0] >= 0).all()
        and (rects[:, 0] + rects[:, 2] <= 191).all()
        and (rects[:, 1] + rects[:, 3] <= 143).all()
    )
    # Factor 2: the pixel span x..x+w becomes 2x..2x+2w+1.
    np.testing.assert_array_equal(upscale_rects(np.array([[10, 5, 19, 0]]), 2.0, 2.0, 100, 100), [[20, 10, 39, 1]])


def test_opencv_and_random_methods(photos, tmp_path, monkeypatch):
    img = np.asarray(Image.open(photos / "img_001.png").convert("RGB"))
    rects = run_method("opencv-fast", img, {"strategy": "fast", "base_k": 150, "inc_k": 150, "sigma": 0.8})
    assert len(rects) > 0 and (rects[:, 0] + rects[:, 2] <= img.shape[1] - 1).all()
    params = {"n": 50, "min_size": 0.1, "max_size": 0.9, "ratio": 3.0, "seed": 0}
    a, b = run_method("random", img, params), run_method("random", img, params)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run_method("random", img, {**params, "seed": 1}))
    assert (a[:, 0] + a[:, 2] <= img.shape[1] - 1).all() and (a[:, 1] + a[:, 3] <= img.shape[0] - 1).all()
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(UserError, match=r"pip install soco-det\[opencv\]"):
        compute_store(photos, tmp_path / "cv", method="opencv-fast")


def _start_slow_run(tmp_path: Path, images: Path, out: Path, delay: float) -> subprocess.Popen:
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(images), str(out)],
        env={**os.environ, "SLOW_TEST_DELAY": str(delay)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_chunks(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunks = sorted((out / "parts").glob("chunk_*.npz"))
        if len(chunks) >= n:
            return chunks
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    raise AssertionError("the run made no progress")


def _reference_store(tmp_path: Path, images: Path) -> Path:
    spec = importlib.util.spec_from_file_location("slow_run_module", tmp_path / "slow_run.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers slow_test here
    return compute_store(images, tmp_path / "reference", method="slow_test", workers=1)


def _children(pid: int) -> list[int]:
    """Worker processes of ``pid`` (spawned multiprocessing children, not the resource tracker)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_resume_after_the_whole_run_is_killed(tmp_path):
    images = write_photos(tmp_path / "imgs", 10, size=(48, 40))
    out = tmp_path / "store"
    proc = _start_slow_run(tmp_path, images, out, delay=0.4)
    _wait_for_chunks(out, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, no clean-up at all
    proc.wait()
    done = {p for c in (out / "parts").glob("chunk_*.npz") for p in np.load(c)["paths"].tolist()}
    assert 3 <= len(done) < 10 and not (out / "meta.json").exists()
    with pytest.raises(UserError, match="not finished"):
        ProposalStore.open(out)

    proc = _start_slow_run(tmp_path, images, out, delay=0.0)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert f"resuming: {len(done)} of 10 images already done" in log
    summary = ProposalStore.open(out).summary
    assert summary["computed"] == 10 - len(done) and summary["reused"] == len(done)  # finished chunks kept
    same_store(out, _reference_store(tmp_path, images))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_a_killed_worker_does_not_stop_the_run(tmp_path):
    images = write_photos(tmp_path / "imgs", 8, size=(48, 40))
    out = tmp_path / "store"
    proc = _start_slow_run(tmp_path, images, out, delay=0.3)
    _wait_for_chunks(out, 2, proc)
    workers = _children(proc.pid)
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert "a worker process died" in log
    same_store(out, _reference_store(tmp_path, images))
    assert json.loads((out / "summary.json").read_text())["failed"] == 0
