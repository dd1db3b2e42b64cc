"""Atomic writes never leave a partial file; progress reports rate and ETA."""

from __future__ import annotations

import logging
import os
import stat
import sys

import pytest

from soco_det.atomic import atomic_open, atomic_write_json, atomic_write_text
from soco_det import logs as logs_module
from soco_det.logs import Progress, format_duration, progress, setup_logging


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "store.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("half of the new cont")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.json"]


def test_atomic_write_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(target, {"k": [1, 2]})
    assert target.read_text() == '{"k": [1, 2]}'


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_finished_file_gets_the_permissions_of_the_umask_at_write_time(tmp_path, umask):
    # The umask is changed after soco_det.atomic was imported: the write must follow the current one.
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "x.txt", "data")
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("data")
        assert os.umask(umask) == umask  # the write left the umask as it was
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "x.txt").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_progress_logs_rate_and_eta_when_not_a_tty(caplog):
    setup_logging("INFO")
    logging.getLogger("soco_det").propagate = True
    try:
        bar = Progress(total=10, desc="images", unit="img", log_every_s=0.0)
        with caplog.at_level(logging.INFO, logger="soco_det"):
            for _ in range(4):
                bar.update()
        bar.close()
    finally:
        logging.getLogger("soco_det").propagate = False
    lines = [r.getMessage() for r in caplog.records if r.name == "soco_det.progress"]
    assert lines and lines[-1].startswith("images: 4/10 (")
    assert "img/s" in lines[-1] and "ETA" in lines[-1]


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (42.4, "42s"), (60, "1m00s"), (1522, "25m22s"), (3600 + 5 * 60 + 22, "1h05m22s")]
)
def test_durations_cannot_be_read_as_a_time_of_day(seconds, text):
    assert format_duration(seconds) == text


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_progress_lines_come_every_10_s_with_the_value_of_the_moment(monkeypatch):
    """Off a terminal: a line every ~10 s by default (not 30), 'ETA 25m22s' (not 25:22 after the
    clock time), and a postfix function read when a line is written (the current loss, not the
    last record's)."""
    clock = [1000.0]
    monkeypatch.setattr(logs_module.time, "perf_counter", lambda: clock[0])
    setup_logging("INFO")
    got = _Lines()
    progress_logger = logging.getLogger("soco_det.progress")
    progress_logger.addHandler(got)
    current = {"loss": 9.0}
    try:
        bar = Progress(total=1000, desc="train", unit="step")
        bar.set_postfix(lambda: f"loss {current['loss']:.2f}")
        for step in range(1, 41):
            clock[0] += 1.0  # one step a second
            current["loss"] = 10.0 - step / 10
            bar.update()
        bar.close()
    finally:
        progress_logger.removeHandler(got)
    lines = got.lines
    assert len(lines) == 4  # after 10, 20, 30 and 40 s
    assert lines[0] == "train: 10/1000 (1.00 step/s, ETA 16m30s) loss 9.00"
    assert lines[-1] == "train: 40/1000 (1.00 step/s, ETA 16m00s) loss 6.00"


def test_progress_wrapper_yields_everything():
    assert list(progress(range(5), desc="x", disable=True)) == [0, 1, 2, 3, 4]


def test_finished_file_gets_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "x.txt"
    atomic_write_text(target, "x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
