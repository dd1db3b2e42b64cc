"""Sample data and tiny configs for the engine tests (imported by tests/test_*.py of the engine).

The data (generated scenes + their selective-search proposal store) is made once per test session
and per pytest process in a shared temporary folder; generation is idempotent, so several test
modules importing the fixture reuse the same files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from soco_det.config import build_config
from soco_det.engine.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]

# Tiny but real: resnet18, 64/64/32 views, small FPN/head/MLPs; 2 images per process-batch.
TINY_OVERRIDES = [
    "model.depth=18",
    "model.fpn_channels=16",
    "model.head_conv_dim=16",
    "model.head_fc_dim=32",
    "model.proj_hidden_dim=32",
    "model.proj_dim=16",
    "data.views.geometry.view_sizes=[64,64,32]",
    "data.views.levels.level_thresholds=[12,24,48,64]",
    "data.batch_size=2",
    "data.num_workers=0",
    "train.loop.epochs=4",
    "train.optim.warmup_epochs=1",
    "train.loop.log_every=1",
    "train.loop.ckpt_every=1000",
    "train.loop.tensorboard=false",
    "train.loop.progress=false",
    "train.loop.device=cpu",
    "seed=3",
    # The engine tests check the engine (resume, DDP == one process, ...) with the paper's optimiser and
    # loss: the small-budget rule of tiny_cpu is tested in test_dynamics / test_training_trains (its
    # decorrelation term, like BN, is computed over each process's rows).
    "train.optim.budget=paper",
    "model.head_decorrelation=0",
]


def make_sample_data(root: Path, n_images: int = 8) -> dict[str, Path]:
    """``{"images": DIR, "proposals": STORE}`` for ``n_images`` generated scenes (idempotent)."""
    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    done = root / "DONE"
    paths = {"images": root / "images" / "unlabeled", "proposals": root / "proposals"}
    if not done.exists():
        generate(root, n_unlabeled=n_images, n_train=0, n_val=0, short_side=96, seed=0)
        compute_store(paths["images"], paths["proposals"])
        done.write_text("ok")
    return paths


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> dict[str, Path]:
    return make_sample_data(tmp_path_factory.getbasetemp() / "engine_sample_data")


def tiny_config(data: dict[str, Path], *overrides: str) -> PretrainConfig:
    extra = {"data": {"images": str(data["images"]), "proposals": str(data["proposals"])}}
    return build_config(PretrainConfig, "tiny_cpu", [*TINY_OVERRIDES, *overrides], extra=extra)


def pretrain_cli_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``soco-det pretrain`` arguments for the tiny config on ``data`` into ``out``, then ``extra``."""
    return [
        "pretrain",
        "--recipe",
        "tiny_cpu",
        "--images",
        str(data["images"]),
        "--proposals",
        str(data["proposals"]),
        "-o",
        str(out),
        "--device",
        "cpu",
        *TINY_OVERRIDES,
        *extra,
    ]


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m soco_det ARGS`` (optionally behind a launcher such as torch.distributed.run)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, *(launcher or []), "-m", "soco_det", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def model_state(run_dir: Path, name: str = "last.pt") -> dict:
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=True)


def read_tensorboard(folder: Path) -> dict:
    """What a run's ``tensorboard/`` holds: ``{"scalars": {tag: [(step, value), ...]}, "text": {tag:
    the last text}, "images": [tags]}`` (the events of every file in the folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    text = {}
    for tag in tags["tensors"]:
        if tag.endswith("/text_summary"):
            last = events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
            text[tag[: -len("/text_summary")]] = last
    return {"scalars": scalars, "text": text, "images": sorted(tags["images"])}
