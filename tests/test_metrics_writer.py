"""The one metrics.jsonl writer (engine/metrics.py), as pretraining and fine-tuning use it."""

from __future__ import annotations

import json

from soco_det.engine.metrics import MetricsWriter, read_metrics


def test_finetuning_records_keep_their_iter_key_and_elapsed_time(tmp_path):
    writer = MetricsWriter(tmp_path, step_key="iter")
    for it in (5, 10, 15):
        writer.write(it, {"lr": 0.1, "loss": 1.0 / it, "time": float(it)})
    writer.write(15, {"bbox": {"AP": 0.5}})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"iter": 20, "lo')  # torn line of a killed run
    records = read_metrics(tmp_path)
    assert [r["iter"] for r in records] == [5, 10, 15, 15]
    assert [r["time"] for r in records[:3]] == [5.0, 10.0, 15.0]  # the caller's time is kept
    assert records[3]["bbox"] == {"AP": 0.5} and "step" not in records[0]
    # resuming at iteration 10 drops the later records (and the torn line)
    MetricsWriter(tmp_path, resume_step=10, step_key="iter").close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [5, 10]


def test_pretraining_records_are_stamped_with_the_wall_clock(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": float("nan")})
    writer.close()
    (record,) = read_metrics(tmp_path)
    assert record["step"] == 1 and record["loss"] == "nan" and record["time"] > 1e9
