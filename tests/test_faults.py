"""Fault injection: run folders, checkpoints and stores under kills, signals, full disks, concurrent
runs and damaged files. Each test asserts that nothing is lost and that the message is one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_fixtures import REPO, TINY_OVERRIDES, model_state, pretrain_cli_args, run_cli, sample_data, tiny_config  # noqa: F401

from soco_det.commands.main import main
from soco_det.engine import checkpoint as ckpt_io
from soco_det.engine.metrics import read_metrics
from soco_det.engine.trainer import Hook, pretrain
from soco_det.errors import UserError


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


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))


def _corrupt(path: Path, offset: int | None = None, n: int = 64) -> None:
    """Overwrite ``n`` bytes in the middle of a file (tensor data of a checkpoint) with other bytes."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at : at + n] = bytes((b + 1) % 256 for b in data[at : at + n])
    path.write_bytes(bytes(data))


_cli_args = pretrain_cli_args


# ------------------------------------------------------------------ 1. a finished run is never run over


def test_rerun_without_resume_refuses_and_keeps_the_old_run(sample_data, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.loop.max_steps=2", "train.loop.ckpt_every=1"), run)
    before = {
        p: p.read_bytes()
        for p in [run / "config.yaml", run / "metrics.jsonl", *sorted((run / "checkpoints").iterdir())]
    }

    # The same command with fewer steps and without --resume: refused, nothing touched (before, it
    # truncated the metrics and left last.pt at the new step 1 next to the old step 2).
    assert main(_cli_args(sample_data, run, "train.loop.max_steps=1", "train.loop.ckpt_every=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert "--resume auto" in err and "--overwrite" in err and str(run) in err
    assert {p: p.read_bytes() for p in before} == before
    assert ckpt_io.load_checkpoint(run)["step"] == 2

    # --overwrite: the old run is moved aside whole, the new one is alone in the folder.
    pretrain(tiny_config(sample_data, "train.loop.max_steps=1", "train.loop.ckpt_every=1"), run, overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert _steps(aside) == ["step_00000001.pt", "step_00000002.pt"] and ckpt_io.load_checkpoint(aside)["step"] == 2
    assert [r["step"] for r in read_metrics(aside)] == [1, 2]
    assert _steps(run) == ["step_00000001.pt"] and ckpt_io.load_checkpoint(run)["step"] == 1
    assert [r["step"] for r in read_metrics(run)] == [1]


# ------------------------------------------------------------------ 2. one run per folder


def test_a_second_process_on_a_locked_run_folder_gets_a_clear_error(sample_data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from soco_det.runlock import FolderLock; "
            "FolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
            str(run),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid} on "):
            pretrain(tiny_config(sample_data, "train.loop.max_steps=1"), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the second run written
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock of a killed holder: the folder is usable again at once.
    from soco_det.runlock import FolderLock

    with FolderLock(run):
        pass


@pytest.mark.slow
def test_two_pretrain_processes_on_one_folder(sample_data, tmp_path):
    run = tmp_path / "run"
    args = _cli_args(sample_data, run, "train.loop.max_steps=3", "train.loop.ckpt_every=1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "soco_det", *args], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another process (pid" in loser
    # One consistent run: config, metrics and checkpoints all of the winner.
    assert ckpt_io.load_checkpoint(run)["step"] == 3 and [r["step"] for r in read_metrics(run)] == [1, 2, 3]


# ------------------------------------------------------------------ 3. a rejected resume writes nothing


def test_rejected_resume_leaves_the_run_folder_as_it_was(sample_data, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.loop.max_steps=1"), run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(_cli_args(sample_data, run, "train.loop.max_steps=2", "model.fpn_channels=32", "--resume", "auto")) == 2
    err = error_line(capsys.readouterr().err)
    assert "shape" in err and "last.pt" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files


# ------------------------------------------------------------------ 6. SIGINT / SIGTERM save a checkpoint


class SendSignal(Hook):
    def __init__(self, at_step: int, signum: int, times: int = 1) -> None:
        self.at_step, self.signum, self.times = at_step, signum, times
        self.returned = False  # the hook came back from sending its signals

    def after_step(self, trainer, out) -> None:
        if trainer.step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
            self.returned = True


class SeenSteps(Hook):
    """The steps that started (``before``) and those whose hooks ran to this one (``after``)."""

    def __init__(self) -> None:
        self.before: list[int] = []
        self.after: list[int] = []

    def before_step(self, trainer) -> None:
        self.before.append(trainer.step + 1)

    def after_step(self, trainer, out) -> None:
        self.after.append(trainer.step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_and_saves_a_checkpoint(sample_data, tmp_path, signum):
    from soco_det.errors import Interrupted

    run = tmp_path / "run"
    cfg = tiny_config(sample_data, "train.loop.max_steps=6", "train.loop.ckpt_every=1000")
    with pytest.raises(Interrupted, match=rf"stopped by {signal.Signals(signum).name} after step 1") as info:
        pretrain(cfg, run, hooks=[SendSignal(1, signum)])
    assert info.value.exit_code == 128 + signum
    assert _steps(run) == ["step_00000001.pt"] and model_state(run)["step"] == 1
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    if signum == signal.SIGTERM:  # the saved state resumes like any other checkpoint
        pretrain(tiny_config(sample_data, "train.loop.max_steps=2", "train.loop.ckpt_every=1000"), run, resume="auto")
        assert model_state(run)["step"] == 2 and [r["step"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("signum, exits", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_second_signal_exits_at_once(sample_data, tmp_path, signum, exits):
    run = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sender, seen = SendSignal(1, signum, times=2), SeenSteps()
    with pytest.raises(exits) as info:
        pretrain(tiny_config(sample_data, "train.loop.max_steps=6"), run, hooks=[sender, seen])
    if exits is SystemExit:
        assert info.value.code == 128 + signum
    # at once: raised inside the second signal's handler, so neither the hook that sent it nor the
    # hooks after it finished step 1, and no step 2 started
    assert not sender.returned and seen.after == [] and seen.before == [1]
    # nothing saved: no checkpoint file of any kind (the stop request of the first signal is void)
    assert sorted(p.name for p in run.rglob("*") if "checkpoints" in p.relative_to(run).parts) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the previous handlers are back


@pytest.mark.slow
def test_sigterm_to_the_pretrain_command(sample_data, tmp_path):
    """The real thing: SIGTERM to `soco-det pretrain` (data-loader workers running) saves and exits 143."""
    run = tmp_path / "run"
    args = _cli_args(sample_data, run, "train.loop.max_steps=200", "train.loop.ckpt_every=1000", "data.num_workers=1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "soco_det", *args], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not read_metrics(run):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    steps = [r["step"] for r in read_metrics(run)]
    assert steps and model_state(run)["step"] == steps[-1]


# ------------------------------------------------------------------ 8. checkpoint redundancy


def _tiny_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((4096,), float(step))}}


def test_last_is_a_real_copy_and_resume_falls_back_to_the_newest_intact_step(tmp_path, caplog):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt_io.save_checkpoint(run, _tiny_state(step), keep_last=3)
    ckpt_dir = run / "checkpoints"
    last, newest = ckpt_dir / "last.pt", ckpt_dir / "step_00000003.pt"
    assert last.stat().st_nlink == 1 and last.stat().st_ino != newest.stat().st_ino

    _corrupt(last)  # damage to last.pt stays in last.pt
    assert ckpt_io.load_checkpoint(newest)["step"] == 3
    with pytest.raises(UserError, match="last.pt: checkpoint is damaged"):
        ckpt_io.load_checkpoint(last)
    assert ckpt_io.load_checkpoint(run)["step"] == 3
    _corrupt(newest)
    ckpt = ckpt_io.load_checkpoint(run)
    assert ckpt["step"] == 2 and ckpt["path"].endswith("step_00000002.pt")
    assert torch.equal(ckpt["model"]["w"], torch.full((4096,), 2.0))
    assert "damaged" in caplog.text and "step_00000003.pt" in caplog.text


def test_prune_keeps_the_newest_intact_files(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt_io.save_checkpoint(run, _tiny_state(step), keep_last=2)
    assert _steps(run) == ["step_00000002.pt", "step_00000003.pt"]
    _corrupt(run / "checkpoints" / "step_00000003.pt")
    ckpt_io.save_checkpoint(run, _tiny_state(4), keep_last=2)
    # The damaged step 3 goes, the intact step 2 stays.
    assert _steps(run) == ["step_00000002.pt", "step_00000004.pt"]


def test_kill_during_a_checkpoint_write_loses_nothing_and_the_temp_file_is_cleaned(tmp_path):
    run = tmp_path / "run"
    ckpt_io.save_checkpoint(run, _tiny_state(1))
    good = (run / "checkpoints" / "last.pt").read_bytes()
    # A process killed (SIGKILL) half-way through torch.save of the next checkpoint.
    code = f"""
import os, signal, torch
from soco_det.engine import checkpoint as ckpt_io
real_save = torch.save
def dying_save(obj, f):
    f.write(b"PK" + os.urandom(100000))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
ckpt_io.save_checkpoint({str(run)!r}, {{"step": 2, "model": {{}}}})
"""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -signal.SIGKILL
    tmps = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert tmps and (run / "checkpoints" / "last.pt").read_bytes() == good
    assert _steps(run) == ["step_00000001.pt"] and ckpt_io.load_checkpoint(run)["step"] == 1
    # What a start does (pretrain and finetune, holding the lock): the temporary file goes.
    assert ckpt_io.clean_temporary_files(run) == tmps
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_resume_auto_skips_damaged_checkpoints(sample_data, tmp_path, caplog):
    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.loop.max_steps=2", "train.loop.ckpt_every=1"), run)
    _corrupt(run / "checkpoints" / "last.pt")
    _corrupt(run / "checkpoints" / "step_00000002.pt")
    leftover = run / "checkpoints" / ".step_00000003.pt.k1ll3d.tmp"  # a write killed half-way
    leftover.write_bytes(b"PK\x03\x04" + bytes(1000))
    pretrain(tiny_config(sample_data, "train.loop.max_steps=3", "train.loop.ckpt_every=1"), run, resume="auto")
    assert not leftover.exists()
    assert "step_00000001.pt" in caplog.text and "damaged" in caplog.text
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert model_state(run)["step"] == 3 and _steps(run)[-2:] == ["step_00000002.pt", "step_00000003.pt"]
    assert ckpt_io.damage(run / "checkpoints" / "step_00000002.pt") is None  # rewritten by the resumed run


# ------------------------------------------------------------------ 12. I/O errors are one line


def test_disk_full_during_a_checkpoint_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt_io.save_checkpoint(run, _tiny_state(1))
    from soco_det import atomic

    real_open = atomic.atomic_open

    class Full:
        def __init__(self, handle):
            self.handle, self.n = handle, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    import contextlib

    @contextlib.contextmanager
    def full_open(path, mode="wb"):
        with real_open(path, mode) as handle:
            yield Full(handle)

    monkeypatch.setattr(atomic, "atomic_open", full_open)
    with pytest.raises(OSError) as info:
        ckpt_io.save_checkpoint(run, _tiny_state(2))
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("step_00000002.pt")
    from soco_det.commands.main import describe_os_error

    assert describe_os_error(info.value).startswith(f"{run / 'checkpoints' / 'step_00000002.pt'}: No space left")
    assert ckpt_io.load_checkpoint(run)["step"] == 1 and _steps(run) == ["step_00000001.pt"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    """A tmpfs mounted on the new ``folder`` with ``options`` (needs root; the test is skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 300 MiB tmpfs."""
    with _tmpfs(tmp_path / "small", "size=300m") as mnt:
        yield mnt


def test_full_disk_in_pretrain_is_one_line_and_keeps_the_previous_checkpoint(sample_data, small_tmpfs, capsys):
    run = small_tmpfs / "run"
    # A tiny-config checkpoint is about 135 MB: step 1 and its last.pt copy fit, step 2 does not.
    assert main(_cli_args(sample_data, run, "train.loop.max_steps=3", "train.loop.ckpt_every=1")) == 1
    err = error_line(capsys.readouterr().err)
    assert "No space left on device" in err and str(run / "checkpoints") in err
    assert "unexpected pos" not in err
    # What was saved before the disk filled up is intact, and no temporary file takes the space.
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert _steps(run) and all(ckpt_io.damage(p) is None for p in (run / "checkpoints").glob("step_*.pt"))
    assert ckpt_io.load_checkpoint(run)["step"] >= 1


def test_output_paths_that_cannot_be_written_are_one_line(sample_data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(_cli_args(sample_data, a_file, "train.loop.max_steps=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert "not a folder" in err and str(a_file) in err
    assert main(_cli_args(sample_data, a_file / "run", "train.loop.max_steps=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert "is a file" in err


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_sigterm_during_finetuning_saves_a_checkpoint(tmp_path, monkeypatch):
    from test_finetune import tiny_finetune_config

    import soco_det.synth as synth
    from soco_det.errors import Interrupted
    from soco_det.transfer import finetune, finetuning

    scenes = synth.generate(tmp_path / "scenes", n_unlabeled=0, n_train=4, n_val=1, short_side=96, seed=3)
    cfg = tiny_finetune_config(scenes, "checkpoint_period=100", "log_period=1")
    real_step, calls = finetuning.FinetuneTrainer.run_step, []

    def step_then_signal(self, batch):
        calls.append(1)
        out = real_step(self, batch)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(finetuning.FinetuneTrainer, "run_step", step_then_signal)
    run = tmp_path / "ft"
    with pytest.raises(
        Interrupted,
        match=r"stopped by SIGTERM after step 3; checkpoint .*last\.pt saved; continue with --resume",
    ):
        finetune(cfg, run)
    assert len(calls) == 3 and ckpt_io.load_checkpoint(run)["step"] == 3
    assert _steps(run) == ["step_00000003.pt"]


# ------------------------------------------------------------------ stores: 4, 5, 7, 9, 10, 13

STORE_FILES = [
    "paths.npy",
    "path_offsets.npy",
    "sizes.npy",
    "offsets.npy",
    "boxes.npy",
    "status.npy",
    "stage.npy",
    "raw_counts.npy",
    "failures.json",
    "summary.json",
]


@pytest.fixture
def store_copy(sample_data, tmp_path):
    import shutil

    return Path(shutil.copytree(sample_data["proposals"], tmp_path / "store"))


def _npy_data_offset(path: Path) -> int:
    import numpy as np

    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


@pytest.mark.parametrize("name", STORE_FILES)
def test_a_damaged_store_file_is_never_read(store_copy, name, capsys):
    from soco_det.proposals import ProposalStore

    path = store_copy / name
    size = path.stat().st_size
    offset = _npy_data_offset(path) if name.endswith(".npy") else 0
    assert size > offset, "nothing to damage"
    _corrupt(path, offset=offset + (size - offset) // 2, n=min(4, size - offset))
    with pytest.raises(UserError, match=rf"{store_copy}: proposal store is damaged \({name} differs"):
        ProposalStore.open(store_copy)
    assert main(["proposals", "info", str(store_copy)]) == 2
    assert "recompute it" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("what", ["npy_header", "meta", "summary_unchecked", "offsets_unchecked"])
def test_damaged_headers_and_metadata_are_one_line(store_copy, what, capsys):
    """Without checksums (a store of an older version) the structure is still checked."""
    import numpy as np

    from soco_det.proposals import ProposalStore

    meta = json.loads((store_copy / "meta.json").read_text())
    if what == "npy_header":
        data = bytearray((store_copy / "boxes.npy").read_bytes())
        data[10:40] = b"{'descr': <i4', 'fortran_o!!!!"
        (store_copy / "boxes.npy").write_bytes(bytes(data))
    elif what == "meta":
        (store_copy / "meta.json").write_text('{"format": "soco-det-proposals/1", "root": ')
    else:
        del meta["checksums"]
        (store_copy / "meta.json").write_text(json.dumps(meta))
        if what == "summary_unchecked":
            (store_copy / "summary.json").write_text("{not json")
            with pytest.raises(UserError, match="damaged .summary.json"):
                ProposalStore.open(store_copy).summary
        else:
            offsets = np.load(store_copy / "offsets.npy")
            offsets[-1] += 1000  # points past the end of boxes
            np.save(store_copy / "offsets.npy", offsets)
    assert main(["proposals", "info", str(store_copy)]) == 2
    assert "proposal store is damaged" in error_line(capsys.readouterr().err)


def test_pretraining_refuses_a_damaged_store(sample_data, store_copy):
    _corrupt(store_copy / "boxes.npy", offset=_npy_data_offset(store_copy / "boxes.npy") + 8, n=8)
    cfg = tiny_config({"images": sample_data["images"], "proposals": store_copy}, "train.loop.max_steps=1")
    with pytest.raises(UserError, match="proposal store is damaged"):
        pretrain(cfg, store_copy.parent / "run")


def test_store_paths_outside_the_images_root_are_refused(tmp_path):
    from soco_det.proposals import ProposalStore
    from soco_det.proposals.store import ProposalTable, write_store

    table = ProposalTable()
    table.append("../outside.jpg", (10, 10), 0, "", 0, 1, [[0, 0, 5, 5]])
    write_store(tmp_path / "store", table, {"root": str(tmp_path / "images"), "method": "x"})
    with pytest.raises(UserError, match=r"'../outside.jpg' is not a relative path inside the images root"):
        ProposalStore.open(tmp_path / "store")


def test_merge_import_and_export_never_replace_an_output_silently(sample_data, store_copy, tmp_path, capsys):
    from soco_det.proposals import ProposalStore

    images = str(sample_data["images"])
    exported = tmp_path / "props.json"
    assert main(["proposals", "export", str(store_copy), "-o", str(exported)]) == 0
    first = exported.read_bytes()
    other = tmp_path / "other_store"
    assert main(["proposals", "import", str(exported), "--images", images, "-o", str(other)]) == 0
    meta_before = (other / "meta.json").read_bytes()

    cases = [  # (argv, expected words in the error)
        (["proposals", "import", str(exported), "--images", images, "-o", str(other)], "--overwrite"),
        (["proposals", "merge", str(store_copy), "-o", str(other)], "--overwrite"),
        (["proposals", "export", str(store_copy), "-o", str(exported)], "--overwrite"),
        (["proposals", "export", str(store_copy), "-o", str(tmp_path)], "is a folder"),
        (["proposals", "import", str(exported), "--images", images, "-o", str(exported)], "not a folder"),
        (["proposals", "merge", str(store_copy), "-o", str(exported / "x")], "is a file"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert words in error_line(capsys.readouterr().err), argv
    assert exported.read_bytes() == first and (other / "meta.json").read_bytes() == meta_before

    assert main(["proposals", "merge", str(store_copy), "-o", str(other), "--overwrite"]) == 0
    assert ProposalStore.open(other).meta["method"] == "selective_search"
    assert main(["proposals", "export", str(store_copy), "--format", "coco", "-o", str(exported), "--overwrite"]) == 0
    assert "annotations" in json.loads(exported.read_text())


def test_proposal_settings_file_cannot_get_a_job_stuck(sample_data, tmp_path, caplog):
    from soco_det.proposals import ProposalStore, compute_store

    out = tmp_path / "store"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "settings.json").write_bytes(b"")  # what a full disk left behind before
    compute_store(sample_data["images"], out, method="random")
    assert len(ProposalStore.open(out)) == 8 and "rewriting it" in caplog.text
    # With partial results the settings cannot be checked: a clear error that says what to do.
    out2 = tmp_path / "store2"
    (out2 / "parts").mkdir(parents=True)
    (out2 / "parts" / "settings.json").write_bytes(b"")
    (out2 / "parts" / "chunk_000000.npz").write_bytes(b"x")
    with pytest.raises(UserError, match=r"settings.json: unreadable .* delete .*parts to start again"):
        compute_store(sample_data["images"], out2, method="random")


def test_settings_file_is_written_atomically(sample_data, tmp_path, monkeypatch):
    """A write that fails (full disk) leaves no settings.json at all, never a torn one."""
    import soco_det.atomic as atomic
    from soco_det.proposals import compute_store

    out = tmp_path / "store"
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError):
        compute_store(sample_data["images"], out, method="random")
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert not (out / "parts" / "settings.json").exists()
    compute_store(sample_data["images"], out, method="random")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-side", "-5"], "--max-side -5: must be a whole number >= 1"),
        (["--workers", "-3"], "--workers -3: must be"),
        (["--chunk-size", "0"], "--chunk-size 0: must be"),
        (["--chunk-size", "-1"], "--chunk-size -1: must be"),
        (["--max-pixels", "-1"], "--max-pixels -1"),
        (["--param", "scale=abc"], "scale='abc' must be a number"),
        (["--param", "min_size=2.5"], "min_size=2.5 must be a whole number"),
    ],
)
def test_bad_proposal_options_are_refused(sample_data, tmp_path, capsys, argv, words):
    out = tmp_path / "store"
    assert main(["proposals", str(sample_data["images"]), "-o", str(out), *argv]) == 2
    assert words in error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(
    "entry, words",
    [
        ([0, 0, 10, 10, 5, 5, 20, 20], "is not a list of [x, y, w, h] rects"),
        ([[0, 0, 1e30, 10]], "outside int32"),
        ([[0, 0, 10.5, 10]], "not a whole number"),
        ([[0, 0, "10", 10]], "not a number"),
        ("oops", "is not a list"),
    ],
)
def test_imported_rects_that_cannot_be_right_are_errors(sample_data, tmp_path, entry, words):
    from soco_det.proposals.interchange import import_official_json

    stem = Path(sorted(p.name for p in sample_data["images"].iterdir())[0]).stem
    (tmp_path / "p.json").write_text(json.dumps({stem: entry}))
    with pytest.raises(UserError, match=rf"p.json: entry '{stem}' .*{__import__('re').escape(words)}"):
        import_official_json(tmp_path / "p.json", sample_data["images"], tmp_path / "store")


def test_imported_rects_are_clipped_or_dropped_and_counted(sample_data, tmp_path):
    from PIL import Image

    from soco_det.proposals import ProposalStore
    from soco_det.proposals.interchange import import_official_json

    name = sorted(p.name for p in sample_data["images"].iterdir())[0]
    w, h = Image.open(sample_data["images"] / name).size
    rects = [[0, 0, 10, 10], [-5, 2, 20, 10], [w - 5, h - 5, 20, 20], [3, 3, -4, 5], [w + 10, 0, 5, 5], [2, 2, 0, 0]]
    (tmp_path / "p.json").write_text(json.dumps({Path(name).stem: rects}))
    store = ProposalStore.open(import_official_json(tmp_path / "p.json", sample_data["images"], tmp_path / "store"))
    boxes = store.boxes(store.index(name)).tolist()
    assert boxes == [[0, 0, 10, 10], [0, 2, 15, 10], [w - 5, h - 5, 4, 4], [2, 2, 0, 0]]
    assert store.summary["import_clipped"] == 2 and store.summary["import_dropped"] == 2


ORPHAN_SCRIPT = """
import os, sys, time
import numpy as np
from soco_det.proposals.methods import register_method

def slow_boxes(image, params):
    time.sleep(0.7)
    return np.array([[0, 0, 40, 40]], np.int32)

register_method("slow_orphan", slow_boxes, {})

if __name__ == "__main__":
    from soco_det.proposals import compute_store
    compute_store(sys.argv[1], sys.argv[2], method="slow_orphan", workers=2, chunk_size=1, filter="raw")
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_killing_the_parent_of_a_worker_pool_stops_the_workers(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        Image.new("RGB", (64, 64), (i * 5, 0, 0)).save(images / f"{i:03d}.png")
    script = tmp_path / "job.py"
    script.write_text(ORPHAN_SCRIPT)
    out = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(images), str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "parts").glob("chunk_*.npz")):
        time.sleep(0.1)
    workers = [c for c in _children(proc.pid) if "multiprocessing" in Path(f"/proc/{c}/cmdline").read_text()]
    assert workers, "no pool workers found"
    proc.kill()
    proc.wait()
    time.sleep(3)

    def alive() -> list[int]:
        found = []
        for w in workers:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(w)
        return found

    try:
        survivors = alive()
        n_chunks = len(list((out / "parts").glob("chunk_*.npz")))
        time.sleep(2)
        assert not survivors, f"workers {survivors} outlived their parent"
        assert len(list((out / "parts").glob("chunk_*.npz"))) == n_chunks  # nobody writes any more
    finally:
        for w in alive():  # do not leave them running when the test fails
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)


# ------------------------------------------------------------------ 11, 13. COCO annotations


@pytest.fixture(scope="module")
def coco_scenes(tmp_path_factory):
    import soco_det.synth as synth

    return synth.generate(
        tmp_path_factory.mktemp("coco_scenes"), n_unlabeled=0, n_train=3, n_val=0, short_side=64, seed=5
    )


def _edited(scenes, tmp_path, edit) -> Path:
    data = json.loads(Path(scenes["train"]).read_text())
    edit(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return out


COCO_ERRORS = {
    "unknown category": (
        lambda d: d["annotations"][0].update(category_id=999),
        "category_id 999 is not in 'categories'",
    ),
    "bbox not numbers": (
        lambda d: d["annotations"][0].update(bbox="oops"),
        "'bbox' must be [x, y, width, height] numbers",
    ),
    "bbox with NaN": (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), "'bbox' must be"),
    "duplicate image id": (
        lambda d: d["images"][1].update(id=d["images"][0]["id"]),
        "is listed twice (one image would be lost)",
    ),
    "duplicate category id": (lambda d: d["categories"].append(dict(d["categories"][0])), "is listed twice"),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]), "is used twice"),
    "negative image size": (lambda d: d["images"][0].update(width=-5), "width/height must be positive"),
    "file_name outside root": (
        lambda d: d["images"][0].update(file_name="../../etc/passwd"),
        "is not a relative path inside",
    ),
    "absolute file_name": (lambda d: d["images"][0].update(file_name="/etc/passwd"), "is not a relative path inside"),
}


@pytest.mark.parametrize("case", sorted(COCO_ERRORS))
def test_coco_annotations_that_cannot_be_right_are_one_line_errors(coco_scenes, tmp_path, case):
    from torch import nn

    from soco_det.transfer.coco_data import CocoInstances
    from soco_det.transfer.evaluation import evaluate

    edit, words = COCO_ERRORS[case]
    bad = _edited(coco_scenes, tmp_path, edit)
    with pytest.raises(UserError, match=__import__("re").escape(words)) as info:
        CocoInstances(bad, coco_scenes["images"], train=True)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    with pytest.raises(UserError, match=__import__("re").escape(words)):  # evaluation checks its ground truth too
        evaluate(nn.Linear(1, 1), bad, coco_scenes["images"])


def test_coco_boxes_that_are_dropped_or_clipped_are_counted_and_never_trained_on(coco_scenes, tmp_path, caplog):
    from soco_det.transfer.coco_data import CocoInstances

    def edit(data):
        img = data["images"][0]
        w, h = img["width"], img["height"]
        base = dict(data["annotations"][0], image_id=img["id"], iscrowd=0)
        base.pop("segmentation", None)
        extra = [
            dict(base, id=9001, image_id=123456),  # image not listed
            dict(base, id=9002, bbox=[5, 5, -3, 10]),  # negative width
            dict(base, id=9003, bbox=[w + 10, 0, 20, 20]),  # wholly outside
            dict(base, id=9004, bbox=[w - 10, h - 10, 30, 30]),  # reaches outside: clipped
        ]
        for a in data["annotations"]:
            a.pop("segmentation", None)
        data["annotations"] += extra

    path = _edited(coco_scenes, tmp_path, edit)
    dataset = CocoInstances(path, coco_scenes["images"], train=False)
    assert dataset.coco.validation == {"orphans": 1, "degenerate": 1, "outside": 1, "clipped": 1}
    assert "dropped 1 annotation(s) of images that are not listed" in caplog.text
    index = dataset.ids.index(json.loads(path.read_text())["images"][0]["id"])
    image, target = dataset[index]
    boxes = target["boxes"]
    h, w = image.shape[1:]
    assert len(boxes) >= 1 and (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
    assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
    assert [w - 10, h - 10, w, h] in boxes.tolist()


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only tmpfs."""
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        yield mnt


def test_read_only_outputs_are_one_line_in_every_command(sample_data, readonly_dir, tmp_path, capsys):
    exported = tmp_path / "props.json"
    assert main(["proposals", "export", str(sample_data["proposals"]), "-o", str(exported)]) == 0
    cases = [
        _cli_args(sample_data, readonly_dir / "run", "train.loop.max_steps=1"),
        ["proposals", str(sample_data["images"]), "-o", str(readonly_dir / "store"), "--method", "random"],
        ["proposals", "export", str(sample_data["proposals"]), "-o", str(readonly_dir / "p.json")],
        ["proposals", "import", str(exported), "--images", str(sample_data["images"]), "-o", str(readonly_dir / "s")],
        ["synth", "-o", str(readonly_dir / "synth"), "--unlabeled", "1", "--train", "0", "--val", "0"],
    ]
    for argv in cases:
        assert main(argv) == 1, argv
        err = error_line(capsys.readouterr().err)
        assert str(readonly_dir) in err and "Read-only file system" in err, argv


def test_export_of_a_run_skips_a_damaged_last_checkpoint(sample_data, tmp_path, caplog):
    from soco_det.export.source import resolve_checkpoint_path

    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.loop.max_steps=2", "train.loop.ckpt_every=1"), run)
    assert resolve_checkpoint_path(run) == run / "checkpoints" / "last.pt"
    _corrupt(run / "checkpoints" / "last.pt")
    assert resolve_checkpoint_path(run) == run / "checkpoints" / "step_00000002.pt"
    assert "damaged" in caplog.text
    with pytest.raises(UserError, match="last.pt: checkpoint is damaged"):
        resolve_checkpoint_path(run / "checkpoints" / "last.pt")
