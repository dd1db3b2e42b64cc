"""The DetCon baseline (variant ``detcon``): box masks and mask pooling, its NT-Xent loss, real
training steps through the engine, and its place in benchmarks/transfer.py."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from soco_det.losses import nt_xent_loss
from soco_det.models.detcon import matched_rows
from soco_det.models.mask_pool import box_masks, mask_pool

REPO = Path(__file__).resolve().parents[1]


def test_box_on_cell_edges_is_a_binary_mask_and_pools_to_the_mean_over_it():
    feats = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[0.25, 0.0, 0.75, 0.5]], [[0.0, 0.5, 0.25, 1.0]]])  # x1, y1, x2, y2
    masks = box_masks(boxes, 4, 4)
    expected = torch.zeros(2, 1, 4, 4)
    expected[0, 0, 0:2, 1:3] = 1
    expected[1, 0, 2:4, 0:1] = 1
    assert torch.equal(masks, expected)
    pooled = mask_pool(feats, masks)
    assert pooled.shape == (2, 1, 3)
    torch.testing.assert_close(pooled[0, 0], feats[0, :, 0:2, 1:3].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[1, 0], feats[1, :, 2:4, 0:1].mean(dim=(1, 2)))


def test_a_box_covering_part_of_a_cell_weighs_it_by_the_covered_fraction():
    feats = torch.randn(1, 2, 2, 4, generator=torch.Generator().manual_seed(1))
    masks = box_masks(torch.tensor([[[0.125, 0.0, 0.5, 0.5]]]), 2, 4)  # half of column 0, all of column 1
    assert masks[0, 0].tolist() == [[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    by_hand = (0.5 * feats[0, :, 0, 0] + feats[0, :, 0, 1]) / 1.5
    torch.testing.assert_close(mask_pool(feats, masks)[0, 0], by_hand)


def test_matched_rows_pair_each_shared_proposal_once():
    ids_a = torch.tensor([[3, 5, 3, 9]])  # 3 duplicated by padding, 9 not in view b
    ids_b = torch.tensor([[5, 3, 5, 7]])
    n, i, j = matched_rows(ids_a, ids_b)
    assert n.tolist() == [0, 0] and i.tolist() == [0, 1] and j.tolist() == [1, 0]


def _batch(b: int = 4, k: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(b, 3, s, s, generator=g) for s in (64, 64, 32)]
    boxes, ids = [], []
    for _ in range(2):  # pairs (0, 1) and (0, 2)
        xy = torch.rand(2, b, k, 2, generator=g) * 0.5
        boxes.append(tuple(torch.cat([xy[s], xy[s] + 0.5], dim=-1) for s in range(2)))
        ids.append((torch.arange(1, k + 1).repeat(b, 1), torch.arange(k, 0, -1).repeat(b, 1)))
    return {"images": images, "pairs": [(0, 1), (0, 2)], "boxes": boxes, "ids": ids}


def test_detcon_forward_backward_trains_the_online_encoder_and_projector_only():
    from soco_det.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="detcon", depth=18, proj_hidden_dim=32, proj_dim=16))
    assert set(model.online) == {"encoder", "projector"} and not list(model.predictor.parameters())
    out = model(_batch())
    assert set(out["pair_losses"]) == {"1-2", "2-1", "1-3", "3-1"}
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in out["pair_losses"].values()), rel=1e-6)
    assert all(v.item() > 0 for v in out["pair_losses"].values())  # cross-entropies
    out["loss"].backward()
    assert model.online["encoder"].conv1.weight.grad.abs().sum() > 0
    assert model.online["projector"].linear1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target.parameters())
    with pytest.raises(ValueError, match="ids"):
        model({k: v for k, v in _batch().items() if k != "ids"})


def _nt_xent_by_hand(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1).tolist()
    m, total = len(a), 0.0
    for r in range(2 * m):
        sims = [sum(x * y for x, y in zip(z[r], z[c])) / t for c in range(2 * m) if c != r]
        pos = sum(x * y for x, y in zip(z[r], z[(r + m) % (2 * m)])) / t
        total += -pos + math.log(sum(math.exp(s) for s in sims))
    return total / (2 * m)


def test_nt_xent_matches_the_formula_and_is_lowest_when_positives_match():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 8, generator=g)
    b = a + 0.05 * torch.randn(6, 8, generator=g)
    l_a, l_b = nt_xent_loss(a, b, 0.5)
    assert abs(float(l_a + l_b) / 2 - _nt_xent_by_hand(a, b, 0.5)) < 1e-5
    matched = float(sum(nt_xent_loss(a, b, 0.1)))
    for shift in range(1, 6):  # every positive replaced by another object's view
        assert matched < float(sum(nt_xent_loss(a, b.roll(shift, dims=0), 0.1))) - 1.0
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(a, b, 0.0)


def test_nt_xent_equals_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    ours = sum(nt_xent_loss(a, b, 0.1)) / 2
    torch.testing.assert_close(ours, lightly_loss.NTXentLoss(temperature=0.1)(a, b))


def test_detcon_trains_through_the_engine_and_exports(tmp_path):
    from soco_det.config import build_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.engine.metrics import read_metrics
    from soco_det.engine.trainer import pretrain
    from soco_det.export import export_checkpoint
    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    generate(tmp_path / "scenes", n_unlabeled=16, n_train=0, n_val=0, short_side=64, seed=1)
    images = tmp_path / "scenes" / "images" / "unlabeled"
    store = compute_store(images, tmp_path / "proposals")
    overrides = [
        "model.variant=detcon",
        "model.proj_hidden_dim=64",
        "model.proj_dim=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.loop.epochs=8",
        "train.optim.warmup_epochs=1",
        "train.loop.log_every=1",
        "train.loop.ckpt_every=1000",
        "train.loop.tensorboard=false",
        "train.loop.progress=false",
        "train.loop.device=cpu",
    ]
    extra = {"data": {"images": str(images), "proposals": str(store)}}
    run = pretrain(build_config(PretrainConfig, "tiny_cpu", overrides, extra=extra), tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 2.0, (first, last, losses)  # NT-Xent: 4 directional cross-entropies
    assert read_metrics(run)[-1]["move/encoder"] > 0.01
    out = export_checkpoint(run, "torchvision", tmp_path / "detcon_tv.pth")
    weights = torch.load(out, map_location="cpu", weights_only=True)
    assert any(k.startswith("backbone.body.layer4.") for k in weights)


def _transfer_module():
    spec = importlib.util.spec_from_file_location("transfer_bench", REPO / "benchmarks" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_benchmark_runs_detcon_in_the_gpu_preset_and_on_request():
    bench = _transfer_module()

    def methods(*argv):
        args = bench.parse_args(list(argv))
        return bench.selected_methods(args, bench.PRESETS[args.preset])

    gpu, gpu_pairs = methods("--preset", "gpu")
    assert "detcon" in gpu and ("detcon", "random") in gpu_pairs and ("soco", "detcon") in gpu_pairs
    cpu, cpu_pairs = methods("--preset", "cpu")
    assert cpu == ["soco", "byol"] and all("detcon" not in p for p in cpu_pairs)
    assert methods("--preset", "smoke", "--detcon")[0] == ["soco", "byol", "detcon"]
    assert bench.METHODS["detcon"] == "detcon"
