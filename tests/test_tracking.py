"""The logging back-ends behind one interface (engine/tracking.py): TensorBoard, W&B offline, an MLflow
file store; what a run writes to them (pretraining and fine-tuning), a missing package, a failing sink,
and the cadence of checkpoints (train.loop.ckpt_epoch_end)."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import read_tensorboard, sample_data, tiny_config  # noqa: F401
from soco_det.config import ConfigError, build_config
from soco_det.engine import tracking
from soco_det.engine.config import LoggingConfig, PretrainConfig
from soco_det.engine.metrics import MetricsWriter, read_metrics
from soco_det.engine.tracking import Tracker, open_tracker
from soco_det.engine.trainer import pretrain
from soco_det.errors import UserError
from soco_det.transfer import FinetuneConfig, finetune

CONFIG = {"train": {"loop": {"epochs": 4}}, "seed": 3}
AP_ROWS = [{"type": "bbox", "AP": 41.2, "AP50": 60.0}, {"type": "segm", "AP": 37.5, "AP50": 58.1}]


def _eventually(check, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _write_everything(writer: MetricsWriter) -> None:
    """What a fine-tuning run hands its writer: records, the config, a picture and an AP table."""
    writer.text("config", "train:\n  loop:\n    epochs: 4\n")
    writer.image("data/views", np.full((8, 12, 3), 200, np.uint8), 0)
    for step in (5, 10):
        writer.write(step, {"loss": 1.0 / step, "lr": 0.1, "time/data_wait": 0.01})
    writer.write(10, {"bbox": {"AP": 0.412, "AP50": 0.6}, "segm": {"AP": 0.375, "AP50": None}})
    writer.table("eval/AP", AP_ROWS, 10)
    writer.close()


def test_tensorboard_gets_scalars_nested_eval_metrics_text_pictures_and_tables(tmp_path):
    tracker = open_tracker(tmp_path, LoggingConfig(), ["tensorboard"], config=CONFIG)
    _write_everything(MetricsWriter(tmp_path, tracker=tracker, step_key="iter"))
    events = read_tensorboard(tmp_path / "tensorboard")
    assert {"loss", "lr", "time/data_wait", "bbox/AP", "bbox/AP50", "segm/AP"} <= set(events["scalars"])
    assert "segm/AP50" not in events["scalars"]  # None: no value
    assert events["scalars"]["bbox/AP"] == [(10, pytest.approx(0.412))]
    assert [s for s, _ in events["scalars"]["loss"]] == [5, 10]
    assert "epochs: 4" in events["text"]["config"] and "| bbox | 41.2 | 60 |" in events["text"]["eval/AP"]
    assert events["images"] == ["data/views"]
    assert not (tmp_path / tracking.IDS_FILE).exists()  # TensorBoard has no run id to keep


def test_wandb_offline_writes_its_run_files_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    settings = LoggingConfig(backends=["wandb"], project="soco-test", wandb_mode="offline")
    _write_everything(MetricsWriter(tmp_path, tracker=open_tracker(tmp_path, settings, ["wandb"], config=CONFIG)))
    run_id = json.loads((tmp_path / tracking.IDS_FILE).read_text())["wandb"]
    (run,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert run.name.endswith(run_id) and (run / f"run-{run_id}.wandb").stat().st_size > 0
    # the config is in the run's record file, which W&B's service finishes writing on its own time
    assert _eventually(lambda: b"epochs" in (run / f"run-{run_id}.wandb").read_bytes())
    assert list((run / "files" / "media" / "html").glob("config_0_*.html"))
    assert list((run / "files" / "media" / "images").glob("data/views_0_*.png"))
    assert list((run / "files" / "media" / "table").glob("eval/AP_10_*.table.json"))
    # a resumed run (step > 0) logs into the same W&B run; a fresh one (step 0) gets a new id
    tracker = open_tracker(tmp_path, settings, ["wandb"], resume_step=10, config=CONFIG)
    tracker.scalars(11, {"loss": 0.05})
    tracker.close()
    assert json.loads((tmp_path / tracking.IDS_FILE).read_text())["wandb"] == run_id
    # W&B names a second folder of the same run and second "-1" (offline-run-DATE_TIME-ID-1): read the ids
    # from the record files inside, not from the folder names
    records = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert {f.stem.removeprefix("run-") for f in records} == {run_id}


def test_mlflow_file_store_in_the_run_folder_holds_metrics_params_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    settings = LoggingConfig(backends=["mlflow"], project="soco-test", run_name="tiny")
    _write_everything(MetricsWriter(tmp_path, tracker=open_tracker(tmp_path, settings, ["mlflow"], config=CONFIG)))
    run_id = json.loads((tmp_path / tracking.IDS_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params == {"train.loop.epochs": "4", "seed": "3"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(5, 0.2), (10, 0.1)]
    assert run.data.metrics["bbox/AP"] == pytest.approx(0.412)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.txt", "data", "eval"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run_id, "eval/AP/step_00000010.json", str(tmp_path))).read_text())
    assert table["columns"] == ["type", "AP", "AP50"] and table["data"][1] == ["segm", 37.5, 58.1]
    assert [a.path for a in client.list_artifacts(run_id, "data/views")] == ["data/views/step_00000000.png"]


def test_a_missing_backend_package_is_one_error_naming_the_pip_install_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"wandb needs the wandb package.*pip install wandb"):
        tracking.check_backends(["tensorboard", "wandb"])
    cfg = build_config(
        FinetuneConfig,
        "finetune_tiny_cpu",
        ["logging.backends=[tensorboard,wandb]", *(f"data.{k}=x" for k in ("train_json", "train_images"))],
        extra={"data": {"val_json": "v", "val_images": "v"}},
    )
    with pytest.raises(UserError, match="pip install wandb"):
        finetune(cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_unknown_or_repeated_backends_are_refused_by_key():
    with pytest.raises(ConfigError, match="logging: backends: 'comet' is not one of tensorboard, wandb, mlflow"):
        build_config(PretrainConfig, "tiny_cpu", ["logging.backends=[tensorboard,comet]"])
    with pytest.raises(ConfigError, match="each at most once"):
        build_config(FinetuneConfig, "finetune_tiny_cpu", ["logging.backends=[mlflow,mlflow]"])


class _Broken:
    name = "broken"

    def scalars(self, step, values):
        raise ConnectionError("server went away")

    def close(self):
        raise AssertionError("a back-end that failed is not called again")


class _Kept:
    name = "kept"

    def __init__(self):
        self.steps = []
        self.closed = False

    def scalars(self, step, values):
        self.steps.append(step)

    def close(self):
        self.closed = True


def test_a_failing_backend_is_switched_off_with_one_warning_and_the_others_go_on(caplog):
    kept = _Kept()
    tracker = Tracker([_Broken(), kept])
    with caplog.at_level(logging.WARNING, logger="soco_det"):
        for step in (1, 2, 3):
            tracker.scalars(step, {"loss": 1.0, "note": "text is not a scalar", "bad": float("nan")})
    tracker.close()
    assert kept.steps == [1, 2, 3] and kept.closed and tracker.names == []
    warnings = [r.getMessage() for r in caplog.records if "broken failed" in r.getMessage()]
    assert len(warnings) == 1 and "ConnectionError: server went away" in warnings[0]


# ------------------------------------------------------------------------------ pretraining runs
def test_pretraining_tensorboard_has_the_config_the_views_and_the_data_wait(sample_data, tmp_path):
    run = pretrain(
        tiny_config(sample_data, "train.loop.max_steps=2", "train.loop.tensorboard=true", "train.loop.log_every=1"),
        tmp_path / "run",
    )
    events = read_tensorboard(run / "tensorboard")
    assert {"loss", "lr", "time/data_wait", "time/step", "img_per_s"} <= set(events["scalars"])
    assert "seed: 3" in events["text"]["config"] and events["images"] == ["data/views"]
    assert (run / "views.png").stat().st_size > 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # seconds per step: waiting for batches is part of the step
        assert 0 < r["time/data_wait"] < r["time/step"]


@pytest.mark.parametrize(
    "epoch_end, saved", [(False, ["step_00000005.pt"]), (True, ["step_00000004.pt", "step_00000005.pt"])]
)
def test_epoch_end_checkpoints_only_when_asked(sample_data, tmp_path, epoch_end, saved):
    """8 images, batch 2: epoch 1 ends at step 4. By default only ckpt_every and the end of the run
    save (a 74-image folder used to write a checkpoint every 4 steps)."""
    cfg = tiny_config(
        sample_data,
        "train.loop.max_steps=5",
        "train.loop.keep_last=5",
        f"train.loop.ckpt_epoch_end={str(epoch_end).lower()}",
    )
    run = pretrain(cfg, tmp_path / "run")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == saved
