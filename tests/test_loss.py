"""The SoCo loss against a slow reference and against values worked out by hand (docs/method.md 4)."""

from __future__ import annotations

import math

import pytest
import torch

from soco_det.losses import SoCoLoss, byol_loss, directional_loss, pair_name

EPS = 1e-6


def reference_directional(pred, target, corr, eps=EPS):
    """Slow, obvious l(a->b): loops over images and (i, j), float64 Python arithmetic."""
    total = 0.0
    n_img, m, _ = pred.shape
    for n in range(n_img):
        num, den = 0.0, 0.0
        for i in range(m):
            p = pred[n, i].double()
            p = p / max(p.norm().item(), 1e-12)
            for j in range(target.shape[1]):
                z = target[n, j].double()
                z = z / max(z.norm().item(), 1e-12)
                c = float(corr[n, i, j])
                num += c * float(p @ z)
                den += c
        total += num / (den + eps)
    return -2.0 * total / n_img


def random_case(seed, b=3, m=8, n=8, d=5):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, m, d, generator=g)
    target = torch.randn(b, n, d, generator=g)
    corr = (torch.rand(b, m, n, generator=g) < 0.2).float()
    corr[-1] = 0.0  # an image without any match
    return pred, target, corr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_directional_matches_slow_reference(seed):
    pred, target, corr = random_case(seed, m=8, n=12)
    got = directional_loss(pred, target, corr)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(reference_directional(pred, target, corr), abs=1e-5)


def test_identical_features_give_minus_two_per_term():
    x = torch.randn(2, 4, 7)
    corr = torch.eye(4).repeat(2, 1, 1)
    # Per image: 4 matches with cos 1 -> 4 / (4 + eps).
    expected = -2.0 * 4 / (4 + EPS)
    assert directional_loss(x, x.clone() * 3.0, corr).item() == pytest.approx(expected, abs=1e-6)


def test_orthogonal_features_give_zero():
    pred = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 0.0, -1.0]]])
    corr = torch.ones(1, 2, 2)
    assert directional_loss(pred, target, corr).item() == pytest.approx(0.0, abs=1e-7)


def test_hand_computed_value_with_partial_matches():
    # rows: p0 = e_x, p1 = e_y; columns: z0 = e_x, z1 = (e_x + e_y)/sqrt(2), z2 = -e_x.
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    corr = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
    # matched cosines: <p0,z0> = 1, <p1,z1> = 1/sqrt2, <p1,z2> = 0 -> mean over 3 matches.
    expected = -2.0 * (1.0 + 1.0 / math.sqrt(2.0) + 0.0) / (3.0 + EPS)
    assert directional_loss(pred, target, corr).item() == pytest.approx(expected, abs=1e-6)


def test_image_without_matches_contributes_zero_but_counts():
    x = torch.randn(2, 3, 4)
    corr = torch.zeros(2, 3, 3)
    corr[0] = torch.eye(3)  # image 0: perfect matches; image 1: none
    expected = -2.0 * (3 / (3 + EPS) + 0.0) / 2  # the batch mean divides by 2 images, not 1
    assert directional_loss(x, x, corr).item() == pytest.approx(expected, abs=1e-6)


def test_symmetrised_sum_over_pairs_uses_transposed_corr():
    g = torch.Generator().manual_seed(5)
    pairs = [(0, 1), (0, 2)]
    preds, targets, corrs = [], [], []
    for _ in pairs:
        preds.append(tuple(torch.randn(2, 6, 4, generator=g) for _ in range(2)))
        targets.append(tuple(torch.randn(2, 6, 4, generator=g) for _ in range(2)))
        corrs.append((torch.rand(2, 6, 6, generator=g) < 0.3).float())  # not symmetric
    out = SoCoLoss()(pairs, preds, targets, corrs)
    assert list(out["pair_losses"]) == ["1-2", "2-1", "1-3", "3-1"]
    for k, (a, b) in enumerate(pairs):
        (p_a, p_b), (z_a, z_b) = preds[k], targets[k]
        fwd = reference_directional(p_a, z_b, corrs[k])
        rev = reference_directional(p_b, z_a, corrs[k].transpose(1, 2))
        assert out["pair_losses"][pair_name(a, b)].item() == pytest.approx(fwd, abs=1e-5)
        assert out["pair_losses"][pair_name(b, a)].item() == pytest.approx(rev, abs=1e-5)
    total = sum(v.item() for v in out["pair_losses"].values())
    assert out["loss"].item() == pytest.approx(total, abs=1e-6)


def test_loss_is_fp32_under_autocast_and_gradient_reaches_predictions_only():
    pred = torch.randn(2, 4, 8, requires_grad=True)
    target = torch.randn(2, 4, 8)
    corr = torch.eye(4).repeat(2, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = directional_loss(pred.bfloat16(), target.bfloat16(), corr)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        reference_directional(pred.detach().bfloat16().float(), target.bfloat16().float(), corr), abs=1e-5
    )
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_bad_arguments_raise_clear_errors():
    pred, target, corr = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match="corr must be"):
        directional_loss(pred, target, torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match="target"):
        directional_loss(pred, torch.randn(2, 4, 6), corr)
    with pytest.raises(ValueError, match="pred must be a 3-d"):
        directional_loss(pred[0], target, corr)
    with pytest.raises(ValueError, match="eps"):
        SoCoLoss(eps=0.0)
    with pytest.raises(ValueError, match="one entry per pair"):
        SoCoLoss()([(0, 1)], [], [], [])
    with pytest.raises(ValueError, match="distinct"):
        SoCoLoss()([(0, 1), (1, 0)], [(pred, pred)] * 2, [(target, target)] * 2, [corr] * 2)


def test_byol_loss_values():
    x = torch.randn(5, 8)
    assert byol_loss(x, 2 * x).item() == pytest.approx(-2.0, abs=1e-6)
    assert byol_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    e = torch.eye(2)
    assert byol_loss(e, e.flip(0)).item() == pytest.approx(0.0, abs=1e-7)
