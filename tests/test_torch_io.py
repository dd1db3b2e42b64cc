"""The shared device choice and checked ``torch.load`` (soco_det.torch_io)."""

from __future__ import annotations

import argparse

import pytest
import torch

from soco_det.errors import UserError
from soco_det.torch_io import resolve_device, torch_load


def test_resolve_device_refuses_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"
    assert resolve_device(torch.device("cpu")) == "cpu"
    for choice in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(UserError, match="train.loop.device=cuda.* no CUDA device"):
            resolve_device(choice, "train.loop.device")


def test_every_user_of_the_device_choice_refuses_missing_cuda(monkeypatch, tmp_path):
    from soco_det.transfer.config import FinetuneConfig
    from soco_det.transfer.evaluation import evaluate
    from soco_det.transfer.finetuning import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = FinetuneConfig()
    cfg.device = "cuda"
    with pytest.raises(UserError, match="no CUDA device"):
        _device(cfg)
    with pytest.raises(UserError, match="no CUDA device"):
        evaluate(tmp_path / "run", tmp_path / "x.json", tmp_path, device="cuda")


def test_torch_load_allows_the_official_namespace_and_translates_errors(tmp_path):
    good = tmp_path / "ok.pth"
    torch.save({"opt": argparse.Namespace(a=1), "w": torch.ones(2)}, good)
    for mmap in (False, True):
        obj = torch_load(good, mmap=mmap)
        assert obj["opt"].a == 1 and torch.equal(obj["w"], torch.ones(2))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(UserError, match="bad.pth: cannot read weights"):
        torch_load(bad, what="cannot read weights")
