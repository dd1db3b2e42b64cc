"""Fault injection: run folders, checkpoints and stores under kills, signals, full disks, concurrent
runs and damaged files. Each test asserts that nothing is lost and that the message is one clear line.
"""

from __future__ import annotations

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

from engine_fixtures import REPO, TINY_OVERRIDES, model_state, run_cli, sample_data, tiny_config  # noqa: F401
from soco_det.cli import main
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
    yield
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_soco_det", False)]


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
    data[at:at + n] = bytes((b + 1) % 256 for b in data[at:at + n])
    path.write_bytes(bytes(data))


def _cli_args(data, out, *extra):
    return ["pretrain", "--recipe", "tiny_cpu", "--images", str(data["images"]), "--proposals",
            str(data["proposals"]), "-o", str(out), "--device", "cpu", *TINY_OVERRIDES, *extra]


# ------------------------------------------------------------------ 1. a finished run is never run over


def test_rerun_without_resume_refuses_and_keeps_the_old_run(sample_data, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.max_steps=4", "train.ckpt_every=2"), run)
    before = {p: p.read_bytes() for p in [run / "config.yaml", run / "metrics.jsonl", *sorted((run / "checkpoints").iterdir())]}

    # The same command with other steps and without --resume: refused, nothing touched.
    assert main(_cli_args(sample_data, run, "train.max_steps=2", "train.ckpt_every=2")) == 2
    err = error_line(capsys.readouterr().err)
    assert "--resume auto" in err and "--overwrite" in err and str(run) in err
    assert {p: p.read_bytes() for p in before} == before
    assert ckpt_io.load_checkpoint(run)["step"] == 4

    # --overwrite: the old run is moved aside whole, the new one is alone in the folder.
    pretrain(tiny_config(sample_data, "train.max_steps=2", "train.ckpt_every=2"), run, overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert _steps(aside) == ["step_00000002.pt", "step_00000004.pt"] and ckpt_io.load_checkpoint(aside)["step"] == 4
    assert [r["step"] for r in read_metrics(aside)] == [1, 2, 3, 4]
    assert _steps(run) == ["step_00000002.pt"] and ckpt_io.load_checkpoint(run)["step"] == 2
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


# ------------------------------------------------------------------ 2. one run per folder


def test_a_second_process_on_a_locked_run_folder_gets_a_clear_error(sample_data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from soco_det.runlock import FolderLock; "
         "FolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(run)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid} on "):
            pretrain(tiny_config(sample_data, "train.max_steps=1"), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the second run written
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock of a killed holder: the folder is usable again at once.
    from soco_det.runlock import FolderLock

    with FolderLock(run):
        pass


def test_two_pretrain_processes_on_one_folder(sample_data, tmp_path):
    run = tmp_path / "run"
    args = _cli_args(sample_data, run, "train.max_steps=3", "train.ckpt_every=1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "soco_det", *args], env=env, cwd=REPO, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
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
    pretrain(tiny_config(sample_data, "train.max_steps=1"), run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(_cli_args(sample_data, run, "train.max_steps=2", "model.fpn_channels=32", "--resume", "auto")) == 2
    err = error_line(capsys.readouterr().err)
    assert "shape" in err and "last.pt" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files


# ------------------------------------------------------------------ 6. SIGINT / SIGTERM save a checkpoint


class SendSignal(Hook):
    def __init__(self, at_step: int, signum: int, times: int = 1) -> None:
        self.at_step, self.signum, self.times = at_step, signum, times

    def after_step(self, trainer, out) -> None:
        if trainer.step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_and_saves_a_checkpoint(sample_data, tmp_path, signum):
    from soco_det.engine.signals import Interrupted

    run = tmp_path / "run"
    cfg = tiny_config(sample_data, "train.max_steps=6", "train.ckpt_every=1000")
    with pytest.raises(Interrupted, match=rf"stopped by {signal.Signals(signum).name} after step 2") as info:
        pretrain(cfg, run, hooks=[SendSignal(2, signum)])
    assert info.value.exit_code == 128 + signum
    assert _steps(run) == ["step_00000002.pt"] and model_state(run)["step"] == 2
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    # The saved state resumes like any other checkpoint.
    pretrain(tiny_config(sample_data, "train.max_steps=3", "train.ckpt_every=1000"), run, resume="auto")
    assert model_state(run)["step"] == 3 and [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_second_signal_exits_at_once(sample_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(sample_data, "train.max_steps=6"), run, hooks=[SendSignal(1, signal.SIGINT, times=2)])
    assert not list((run / "checkpoints").glob("step_*.pt")) if (run / "checkpoints").exists() else True


@pytest.mark.slow
def test_sigterm_to_the_pretrain_command(sample_data, tmp_path):
    """The real thing: SIGTERM to `soco-det pretrain` (data-loader workers running) saves and exits 143."""
    run = tmp_path / "run"
    args = _cli_args(sample_data, run, "train.max_steps=200", "train.ckpt_every=1000", "data.num_workers=1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "soco_det", *args], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
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


def test_kill_during_a_checkpoint_write_loses_nothing_and_the_temp_file_is_cleaned(sample_data, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.max_steps=1"), run)
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
    assert _steps(run) == ["step_00000001.pt"]
    # The next start cleans the temporary file and continues from the last complete checkpoint.
    pretrain(tiny_config(sample_data, "train.max_steps=2"), run, resume="auto")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert model_state(run)["step"] == 2


def test_resume_auto_skips_damaged_checkpoints(sample_data, tmp_path, caplog):
    run = tmp_path / "run"
    pretrain(tiny_config(sample_data, "train.max_steps=2", "train.ckpt_every=1"), run)
    _corrupt(run / "checkpoints" / "last.pt")
    _corrupt(run / "checkpoints" / "step_00000002.pt")
    pretrain(tiny_config(sample_data, "train.max_steps=3", "train.ckpt_every=1"), run, resume="auto")
    assert "step_00000001.pt" in caplog.text and "damaged" in caplog.text
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert model_state(run)["step"] == 3 and _steps(run)[-2:] == ["step_00000002.pt", "step_00000003.pt"]
    assert ckpt_io.damage(run / "checkpoints" / "step_00000002.pt") is None  # rewritten by the resumed run


# ------------------------------------------------------------------ 12. I/O errors are one line


def test_disk_full_during_a_checkpoint_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt_io.save_checkpoint(run, _tiny_state(1))
    real_open = ckpt_io.atomic_open

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

    monkeypatch.setattr(ckpt_io, "atomic_open", full_open)
    with pytest.raises(OSError) as info:
        ckpt_io.save_checkpoint(run, _tiny_state(2))
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("step_00000002.pt")
    from soco_det.cli import describe_os_error

    assert describe_os_error(info.value).startswith(f"{run / 'checkpoints' / 'step_00000002.pt'}: No space left")
    assert ckpt_io.load_checkpoint(run)["step"] == 1 and _steps(run) == ["step_00000001.pt"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_in_pretrain_is_one_line_and_keeps_the_previous_checkpoint(sample_data, small_tmpfs, capsys):
    run = small_tmpfs / "run"
    # tiny checkpoints are ~1.5 MB: the first fits, the second (and last.pt) do not.
    assert main(_cli_args(sample_data, run, "train.max_steps=3", "train.ckpt_every=1")) == 1
    err = error_line(capsys.readouterr().err)
    assert "No space left on device" in err and str(run / "checkpoints") in err
    assert "unexpected pos" not in err


def test_output_paths_that_cannot_be_written_are_one_line(sample_data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(_cli_args(sample_data, a_file, "train.max_steps=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert "not a folder" in err and str(a_file) in err
    assert main(_cli_args(sample_data, a_file / "run", "train.max_steps=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert "is a file" in err


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_sigterm_during_finetuning_saves_a_checkpoint(tmp_path, monkeypatch):
    import soco_det.synth as synth
    from soco_det.config import build_config
    from soco_det.engine.signals import Interrupted
    from soco_det.transfer import FinetuneConfig, finetune
    from soco_det.transfer import finetuning

    from test_finetune import TINY

    scenes = synth.generate(tmp_path / "scenes", n_unlabeled=0, n_train=4, n_val=1, short_side=96, seed=3)
    extra = {"data": {"train_json": str(scenes["train"]), "train_images": str(scenes["images"]),
                      "val_json": str(scenes["val"]), "val_images": str(scenes["images"])},
             "model": {"init": "random"}, "device": "cpu"}
    cfg = build_config(FinetuneConfig, "finetune_tiny_cpu", [*TINY, "checkpoint_period=100", "log_period=1"], extra=extra)
    real_step, calls = finetuning.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        out = real_step(*args, **kwargs)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(finetuning, "train_step", step_then_signal)
    run = tmp_path / "ft"
    with pytest.raises(Interrupted, match="stopped by SIGTERM after iteration 3"):
        finetune(cfg, run)
    assert len(calls) == 3 and ckpt_io.load_checkpoint(run)["step"] == 3
    assert _steps(run) == ["step_00000003.pt"]
