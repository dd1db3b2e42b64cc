"""``auto`` worker counts (soco_det/cpus.py): ``soco-det proposals --workers auto`` (the default) and
``data.num_workers: auto`` of pretraining and fine-tuning."""

from __future__ import annotations

import os

import pytest

from soco_det import cpus
from soco_det.commands.main import build_parser, normalize_argv
from soco_det.config import ConfigError, build_config
from soco_det.engine.config import PretrainConfig
from soco_det.errors import UserError
from soco_det.transfer import FinetuneConfig


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_available_cpus_is_the_affinity_mask_not_the_machine():
    assert cpus.available_cpus() == len(os.sched_getaffinity(0))


def test_auto_is_the_cores_available(eight_cores):
    assert cpus.parse_workers("auto", "--workers") == 8
    assert cpus.parse_workers("3", "--workers") == 3 and cpus.parse_workers(-3, "--workers") == -3
    with pytest.raises(UserError, match=r"--workers 'lots': must be a whole number or auto \(the 8 cores available\)"):
        cpus.parse_workers("lots", "--workers")


def test_loader_workers_share_the_node_and_leave_a_core_per_process(eight_cores, monkeypatch):
    assert cpus.loader_workers("auto") == 7 and cpus.loader_workers(2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this node
    assert cpus.loader_workers("auto") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpus.loader_workers("auto") == 0


def test_proposals_workers_default_to_auto_and_take_a_number(capsys):
    parse = lambda *words: build_parser().parse_args(normalize_argv(["proposals", "imgs", "-o", "s", *words]))
    assert parse().workers == "auto" and parse("--workers", "3").workers == 3
    with pytest.raises(SystemExit) as exc:
        parse("--workers", "lots")
    assert exc.value.code == 2 and "neither a whole number nor auto" in capsys.readouterr().err


def test_the_api_resolves_auto_before_the_job(eight_cores, monkeypatch, tmp_path):
    from soco_det import api
    from soco_det.proposals import runner

    given = {}
    monkeypatch.setattr(runner, "compute_store", lambda images, out, **kw: given.update(kw) or out)
    api.proposals(tmp_path, tmp_path / "store")
    assert given["workers"] == 8


@pytest.mark.parametrize("schema, recipe", [(PretrainConfig, "tiny_cpu"), (FinetuneConfig, "finetune_tiny_cpu")])
def test_data_num_workers_takes_auto_or_a_count(schema, recipe):
    assert build_config(schema, recipe, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert build_config(schema, recipe, ["data.num_workers=3"]).data.num_workers == 3
    with pytest.raises(ConfigError, match="data.num_workers"):
        build_config(schema, recipe, ["data.num_workers=many"])


def test_a_training_loader_resolves_auto(eight_cores):
    import torch

    from soco_det.engine.build import build_loader

    data = list(range(4))
    loader = build_loader(
        data,
        batch_size=2,
        sampler=torch.utils.data.SequentialSampler(data),
        collate_fn=list,
        num_workers="auto",
        device=torch.device("cpu"),
    )
    assert loader.num_workers == 7
