"""The fused colour kernels reproduce the PIL / torchvision-v1 colour operations on real photos (the PIL
reference pipeline is tests/_photometric_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageEnhance

import _photometric_reference as pil_ref
from soco_det.data import colour_kernels as ck
from soco_det.data import photometric as ph

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(skimage.data.coffee()).resize((150, 100), Image.Resampling.BILINEAR)


@pytest.mark.parametrize(
    "op,factor", [(0, 1.3), (0, 0.7), (1, 1.35), (1, 0.6), (2, 1.2), (2, 0.8), (3, 0.08), (3, -0.1)]
)
def test_single_ops_match_pil(photo, op, factor):
    pil_ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    ref = pil_ops[op](photo).enhance(factor) if op < 3 else pil_ref._adjust_hue(photo, factor)
    factors = np.ones(4)
    factors[op] = factor
    enabled = np.zeros(4, bool)
    enabled[op] = True
    out = ck.colour_jitter_gray(
        np.asarray(photo), np.array([op] + [o for o in range(4) if o != op], np.int64), factors, enabled, False
    )
    diff = np.abs(out.astype(int) - np.asarray(ref).astype(int))
    assert diff.max() <= (2 if op == 3 else 0), diff.max()  # hue: float rounding of the HSV round trip
    assert (diff > 0).mean() < 0.01


def test_grayscale_and_solarize_normalise_match_pil(photo):
    gray = ck.colour_jitter_gray(np.asarray(photo), np.arange(4), np.ones(4), np.zeros(4, bool), True)
    np.testing.assert_array_equal(gray, np.asarray(photo.convert("L").convert("RGB")))
    scale = np.array([1 / (255 * s) for s in STD], np.float32)
    offset = np.array([m / s for m, s in zip(MEAN, STD)], np.float32)
    from PIL import ImageOps

    out = ck.solarize_normalise(np.asarray(photo), 128, True, scale, offset)
    ref = pil_ref.to_normalised_tensor(ImageOps.solarize(photo, 128), MEAN, STD)
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_fused_pipeline_matches_pil_pipeline(photo, seed):
    kw = dict(
        jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_prob=0.5,
        blur_sigma=(0.1, 2.0),
        solarize_prob=0.5,
        solarize_threshold=128,
    )
    ref = pil_ref.to_normalised_tensor(pil_ref.augment(photo, np.random.default_rng(seed), **kw), MEAN, STD)
    out = pil_ref.augment_tensor(photo, np.random.default_rng(seed), mean=MEAN, std=STD, **kw)
    diff = (out - ref).abs() * torch.tensor(STD).view(3, 1, 1) * 255  # in uint8 levels
    assert diff.max() <= 2.01 and (diff > 0.5).float().mean() < 0.01


def _unfused(arr, p, mean, std):
    """The colour pipeline as separate passes (jitter+gray, PIL-exact blur, solarize+normalise)."""
    from soco_det.data import box_blur

    if p[0] or p[13]:
        arr = ck.colour_jitter_gray(
            np.ascontiguousarray(arr), p[5:9].astype(np.int64), p[1:5], p[9:13] > 0, bool(p[13])
        )
    if p[14]:
        arr = box_blur.pil_gaussian_blur(np.ascontiguousarray(arr), float(p[15]))
    scale, offset = ph.normalise_constants(mean, std)
    return torch.from_numpy(ck.solarize_normalise(np.ascontiguousarray(arr), int(p[17]), bool(p[16]), scale, offset))


@pytest.mark.parametrize("flipped", [False, True])
def test_apply_params_equals_separate_passes_bit_for_bit(photo, flipped):
    """apply_params (table-lookup solarize + normalisation into the output buffer) gives exactly the
    floats of the separate kernels, for every op order, with and without blur/grayscale/solarize."""
    arr = np.asarray(photo)[:, ::-1] if flipped else np.asarray(photo)  # flipped: negative strides
    rng = np.random.default_rng(11)
    kw = dict(
        jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_prob=0.9,
        grayscale_prob=0.3,
        blur_prob=0.4,
        blur_sigma=(0.1, 2.0),
        solarize_prob=0.4,
        solarize_threshold=128,
    )
    seen = set()
    for _ in range(40):
        p = ph.draw_params(rng, **kw)
        seen.add((bool(p[0]), bool(p[13]), bool(p[14]), bool(p[16]), tuple(p[5:9].astype(int))[:2]))
        out = ph.apply_params(arr, p, MEAN, STD)
        assert out.dtype == torch.float32 and out.shape == (3, *arr.shape[:2])
        assert torch.equal(out, _unfused(arr, p, MEAN, STD)), p
    assert len({s[:4] for s in seen}) >= 8  # many combinations of jitter/gray/blur/solarize were exercised
