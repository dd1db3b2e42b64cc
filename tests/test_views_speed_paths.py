"""The speed paths of the view sampler keep its semantics: the numba Gaussian blur equals PIL's bit
for bit, the device photometric path (run here on CPU tensors) matches the CPU path with identical
geometry, and the approximate-resize option is off by default and close when on."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter

from _views_data import photo_store
from soco_det.data import box_blur
from soco_det.data import device_photometric as dp
from soco_det.data.config import DataConfig, PixelOptions, ViewPhotometric, ViewsConfig
from soco_det.data.dataset import build_pretrain_dataset, collate_views

STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photos():
    return photo_store()


def _batch(photos, n=16, recipe="soco_fpn", **kw):
    images, store = photos
    cfg = DataConfig(images=str(images), proposals=str(store), views=ViewsConfig(recipe=recipe), **kw)
    ds = build_pretrain_dataset(cfg, seed=5)
    return collate_views([ds[(i // len(ds), i % len(ds))] for i in range(n)])


@pytest.mark.parametrize("shape", [(224, 224), (112, 112), (37, 23), (5, 9)])
def test_numba_blur_equals_pil_bit_for_bit(shape):
    photo = Image.fromarray(skimage.data.astronaut()).resize(shape[::-1], Image.Resampling.BILINEAR)
    arr = np.asarray(photo)
    for radius in np.random.default_rng(0).uniform(0.1, 2.0, 12).tolist() + [0.1, 2.0, 4.5]:
        ref = np.asarray(photo.filter(ImageFilter.GaussianBlur(radius=radius)))
        np.testing.assert_array_equal(box_blur.pil_gaussian_blur(arr, radius), ref, err_msg=f"radius {radius}")


def test_device_gaussian_close_to_pil_box_approximation():
    photo = Image.fromarray(skimage.data.coffee()).resize((224, 150), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].float()
    for sigma in (0.3, 1.0, 2.0):
        ref = torch.from_numpy(np.asarray(photo.filter(ImageFilter.GaussianBlur(radius=sigma))).copy()).permute(
            2, 0, 1
        )[None]
        diff = (dp.gaussian_blur(x, torch.tensor([sigma])) - ref.float()).abs()
        # a true Gaussian vs PIL's three extended boxes: about a level on average on a photo
        assert diff.mean() < 1.0, (sigma, diff.mean())
        assert diff.max() <= 24, (sigma, diff.max())


def test_device_path_matches_cpu_path(photos):
    cpu = _batch(photos)
    raw = _batch(photos, photometric="device")
    assert raw["images"][0].dtype == torch.uint8 and raw["images"][0].shape == (16, 3, 224, 224)
    dev = dp.apply_device_photometric(raw)
    assert set(dev) == set(cpu)
    for key in ("boxes", "ids", "levels"):
        for a, b in zip(cpu[key], dev[key]):
            assert all(torch.equal(u, w) for u, w in zip(a, b)), key
    for a, b in zip(cpu["corr"], dev["corr"]):
        assert torch.equal(a, b)
    assert torch.equal(cpu["index"], dev["index"])
    for v, (a, b) in enumerate(zip(cpu["images"], dev["images"])):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        diff = (a - b).abs() * STD * 255  # in uint8 levels
        blurred = raw["photometric"][v][:, dp._P["blur"]] > 0
        if (~blurred).any():  # same PIL arithmetic: only rare hue rounding differs
            assert diff[~blurred].mean() < 0.05, (v, diff[~blurred].mean())
            assert (diff[~blurred] > 0.5).float().mean() < 0.005
        if blurred.any():  # Gaussian vs PIL's box approximation
            assert diff[blurred].mean() < 1.0, (v, diff[blurred].mean())
        # cutout: the same regions are zero in both paths
        for i in range(a.shape[0]):
            for x1, y1, x2, y2 in raw["cutout"][v][i].tolist():
                if x2 >= x1:
                    assert (b[i, :, y1 : y2 + 1, x1 : x2 + 1] == 0).all()
                    assert (a[i, :, y1 : y2 + 1, x1 : x2 + 1] == 0).all()


def test_device_path_exact_without_jitter_and_blur(photos):
    """Grayscale, solarize, normalisation and cutout reproduce the CPU path exactly."""
    views = ViewsConfig(
        recipe="soco_fpn",
        photometric=ViewPhotometric(
            color_jitter_prob=0.0, blur_prob=[0.0, 0.0, 0.0], grayscale_prob=0.5, solarize_prob=[0.0, 0.5, 0.5]
        ),
    )
    images, store = photos
    mk = lambda mode: build_pretrain_dataset(
        DataConfig(images=str(images), proposals=str(store), views=views, photometric=mode), seed=1
    )
    a, b = mk("cpu"), mk("device")
    cpu = collate_views([a[i] for i in range(len(a))])
    raw = collate_views([b[i] for i in range(len(b))])
    assert raw["photometric"][1][:, dp._P["solarize"]].sum() > 0 and raw["photometric"][1][:, dp._P["gray"]].sum() > 0
    dev = dp.apply_device_photometric(raw)
    for x, y in zip(cpu["images"], dev["images"]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_apply_device_photometric_leaves_cpu_batches_alone(photos):
    batch = _batch(photos, n=2)
    assert dp.apply_device_photometric(batch) is batch


def test_resize_reducing_gap_is_opt_in_and_close():
    from soco_det.data.sampler import ViewSampler

    photo = Image.fromarray(skimage.data.astronaut()).convert("RGB")  # 512 px: views downsample >= 2x
    rects = np.array([[40, 60, 200, 180], [250, 20, 200, 300], [100, 300, 150, 120]], dtype=np.int32)
    mk = lambda gap: ViewSampler(
        ViewsConfig(recipe="soco_fpn"), PixelOptions(photometric="device", resize_reducing_gap=gap)
    )
    exact, approx = mk(None), mk(1.0)
    for seed in range(3):
        e = exact(photo, rects, np.random.default_rng(seed))
        a = approx(photo, rects, np.random.default_rng(seed))
        assert e.crops == a.crops and all((x[0] == y[0]).all() for x, y in zip(e.boxes, a.boxes))
        diff = (e.images[0].float() - a.images[0].float()).abs()  # V1: 512 -> 224, reduced first
        assert 0 < diff.mean() < 2.0, diff.mean()
    with pytest.raises(ValueError, match="resize_reducing_gap"):
        DataConfig(resize_reducing_gap=0.5).validate()
    with pytest.raises(ValueError, match="photometric"):
        DataConfig(photometric="gpu").validate()
