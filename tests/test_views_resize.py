"""The numba bilinear resize (soco_det.data.resize) gives PIL's bilinear pixels bit for bit when PIL
runs its horizontal pass first (every Pillow up to 12; checked here as two single-axis PIL resizes,
which have one pass and so no order), equals the full ``Image.resize`` wherever the installed Pillow
also goes horizontal first, and the view sampler's numba backend keeps the geometry and (up to
Pillow 13's pass order, <= 1 level) the pixels of the PIL backend for every recipe."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from _views_data import photo_store
from soco_det.data.config import PixelOptions, ViewPhotometric, ViewsConfig
from soco_det.data.lazy_image import LazyImage
from soco_det.data.resize import resize_into
from soco_det.data.sampler import ViewSampler

_PHOTO = np.ascontiguousarray(skimage.data.astronaut())  # 512 x 512 RGB


def _image(width: int, height: int, seed: int) -> np.ndarray:
    """A photo crop (smooth regions and edges) with noise added (values hitting 0 and 255)."""
    g = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(_PHOTO).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = g.integers(-40, 41, base.shape, dtype=np.int16) * (g.random(base.shape[:2])[..., None] < 0.2)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@st.composite
def _cases(draw):
    w, h = draw(st.integers(40, 700)), draw(st.integers(40, 700))
    # the sampler's boxes: integer crops of the original, scaled by a JPEG draft factor (1, 1/2, ...)
    # -- plus arbitrary fractional ones
    cw, ch = draw(st.integers(1, w)), draw(st.integers(1, h))
    left, top = draw(st.integers(0, w - cw)), draw(st.integers(0, h - ch))
    box = [left, top, left + cw, top + ch]
    kind = draw(st.sampled_from(["int", "draft", "fraction"]))
    if kind == "draft":
        f = draw(st.sampled_from([0.5, 0.25, 0.125, 0.37]))
        box = [v * f for v in box]
        w, h = max(int(np.ceil(w * f)), 1), max(int(np.ceil(h * f)), 1)
    elif kind == "fraction":
        box = [box[0] + draw(st.floats(0, 0.99)), box[1] + draw(st.floats(0, 0.99)), box[2], box[3]]
        box[2], box[3] = (
            max(box[2] - draw(st.floats(0, 0.49)), box[0] + 0.01),
            max(box[3] - draw(st.floats(0, 0.49)), box[1] + 0.01),
        )
    out_w, out_h = draw(st.integers(32, 256)), draw(st.integers(32, 256))
    return w, h, tuple(float(v) for v in box), (out_w, out_h), draw(st.booleans()), draw(st.integers(0, 2**16))


def _pil_horizontal_then_vertical(arr: np.ndarray, box, size) -> np.ndarray:
    """PIL's two passes in the classic order, each a single-axis ``resize`` (one pass, no order)."""
    h = arr.shape[0]
    x0, y0, x1, y1 = box
    wide = Image.fromarray(arr).resize((size[0], h), Image.Resampling.BILINEAR, box=(x0, 0, x1, h))
    return np.asarray(wide.resize(size, Image.Resampling.BILINEAR, box=(0, y0, size[0], y1)))


def _horizontal_first(arr: np.ndarray, box, size) -> bool:
    """Whether the installed Pillow's ``resize`` equals its horizontal-then-vertical passes here."""
    full = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR, box=box))
    return np.array_equal(full, _pil_horizontal_then_vertical(arr, box, size))


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_resize_into_equals_pil_bit_for_bit(case):
    w, h, box, (out_w, out_h), flip, seed = case
    arr = _image(w, h, seed)
    ref = _pil_horizontal_then_vertical(arr, box, (out_w, out_h))
    if flip:
        ref = ref[:, ::-1]
    out = resize_into(arr, box, np.empty((3, out_h, out_w), np.uint8), flip)
    np.testing.assert_array_equal(
        out, ref.transpose(2, 0, 1), err_msg=f"{w}x{h} box {box} -> {out_w}x{out_h} flip {flip}"
    )


def test_resize_into_equals_image_resize_where_pillow_goes_horizontal_first():
    """The sampler's shapes (landscape photos to 224/112 views, crops, upscaled small crops) against
    the full ``Image.resize``; cases where this Pillow runs vertical first are only counted."""
    g = np.random.default_rng(7)
    checked = 0
    for t in range(60):
        w, h = (500, 375) if t % 2 else (int(g.integers(40, 700)), int(g.integers(40, 700)))
        arr = _image(w, h, t)
        cw, ch = int(g.integers(8, w + 1)), int(g.integers(8, h + 1))
        left, top = int(g.integers(0, w - cw + 1)), int(g.integers(0, h - ch + 1))
        box = (float(left), float(top), float(left + cw), float(top + ch))
        size = (224, 224) if t % 3 else (112, 112)
        if not _horizontal_first(arr, box, size):
            continue
        checked += 1
        ref = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR, box=box))
        out = resize_into(arr, box, np.empty((3, size[1], size[0]), np.uint8))
        np.testing.assert_array_equal(out, ref.transpose(2, 0, 1), err_msg=f"{w}x{h} box {box} -> {size}")
    assert checked >= 20


def test_resize_into_strided_source_and_destination():
    """A flipped channel-first source read through a reversed view (the ``down:m`` case) and an
    ``[S, S, 3]`` destination written through its channel-first view give PIL's pixels."""
    arr = _image(224, 224, 3)
    stored = np.ascontiguousarray(arr[:, ::-1].transpose(2, 0, 1))  # a flipped CHW view buffer
    hwc = np.empty((112, 112, 3), np.uint8)
    resize_into(stored.transpose(1, 2, 0)[:, ::-1], (0.0, 0.0, 224.0, 224.0), hwc.transpose(2, 0, 1))
    np.testing.assert_array_equal(hwc, np.asarray(Image.fromarray(arr).resize((112, 112), Image.Resampling.BILINEAR)))


def test_resize_into_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_into(np.zeros((10, 10), np.uint8), (0, 0, 10, 10), np.empty((3, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="empty box"):
        resize_into(np.zeros((10, 10, 3), np.uint8), (4, 0, 4, 10), np.empty((3, 5, 5), np.uint8))


@pytest.fixture(scope="module")
def photos():
    return photo_store()


NO_PHOTOMETRIC = dict(
    color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=[0.0] * 4, solarize_prob=[0.0] * 4, cutout_views=[]
)


@pytest.mark.parametrize("recipe", ["soco_fpn", "soco_star", "paper"])
def test_sampler_numba_backend_keeps_geometry_and_pixels(photos, recipe):
    """Same seeds, numba against PIL backend, on real JPEGs (draft-decoded where the crops allow) and
    on PIL images, ``down:m`` views included: identical geometry and view types; uint8 views (device
    path) within one level and mostly identical (Pillow 13's pass order); normalised views (CPU path)
    identical wherever the uint8 views are, and within one level's worth where they are not."""
    images, _ = photos
    paths = sorted(images.rglob("*.jpg"))[:4]
    g = np.random.default_rng(0)
    n = len(ViewsConfig(recipe=recipe).resolved().geometry.view_kinds)
    plain = {k: v[:n] if isinstance(v, list) and k != "cutout_views" else v for k, v in NO_PHOTOMETRIC.items()}
    settings_ = {"device": ("device", {}), "cpu": ("cpu", {}), "cpu_plain": ("cpu", plain)}
    samplers = {
        (name, backend): ViewSampler(
            ViewsConfig(recipe=recipe, photometric=ViewPhotometric(**extra)),
            PixelOptions(photometric=mode, decode_reducing_gap=1.0, resize_backend=backend),
        )
        for name, (mode, extra) in settings_.items()
        for backend in ("numba", "pil")
    }
    std = min(ViewsConfig(recipe=recipe).resolved().photometric.std)
    same = total = 0
    for i, path in enumerate(paths):
        w, h = Image.open(path).size
        rects = np.stack(
            [
                g.integers(0, w // 2, 12),
                g.integers(0, h // 2, 12),
                g.integers(8, w // 2, 12),
                g.integers(8, h // 2, 12),
            ],
            1,
        )
        for source in (lambda: LazyImage(path), lambda: Image.open(path).convert("RGB")):
            out = {key: s(source(), rects.astype(np.int32), np.random.default_rng(i)) for key, s in samplers.items()}
            geometry = {(tuple(o.crops), tuple(o.flips)) for o in out.values()}
            assert len(geometry) == 1  # every backend and photometric mode: the same crops and flips
            for v in range(n):
                dev = [out["device", b].images[v] for b in ("numba", "pil")]
                cpu = [out["cpu", b].images[v] for b in ("numba", "pil")]
                flat = [out["cpu_plain", b].images[v] for b in ("numba", "pil")]
                assert dev[0].dtype == dev[1].dtype == torch.uint8 and dev[0].shape == dev[1].shape
                assert cpu[0].dtype == cpu[1].dtype == torch.float32 and cpu[0].shape == cpu[1].shape
                assert (dev[0].int() - dev[1].int()).abs().max() <= 1
                assert (dev[0] != dev[1]).float().mean() < 0.05
                # normalisation only: one uint8 level is 1 / (255 std) at most
                assert (flat[0] - flat[1]).abs().max() <= 1 / (255 * std) + 1e-5
                total += 1
                if torch.equal(dev[0], dev[1]):
                    same += 1
                    assert torch.equal(cpu[0], cpu[1]), f"view {v}: same pixels, different CPU photometric"
                    assert torch.equal(flat[0], flat[1])
    assert same >= total // 2  # Pillow 13 goes vertical first for some shapes only


def test_data_config_selects_the_resize_backend():
    from soco_det.config import ConfigError, build_config
    from soco_det.data.config import DataConfig

    # One default, wherever the sampler is built from.
    assert build_config(DataConfig).pixels == DataConfig().pixels == PixelOptions() == ViewSampler(ViewsConfig()).pixels
    assert build_config(DataConfig).resize_backend == "numba"
    assert build_config(DataConfig, None, ["resize_backend=pil"]).resize_backend == "pil"
    with pytest.raises(ConfigError, match="resize_backend"):
        build_config(DataConfig, None, ["resize_backend=opencv"])


def test_dataset_hands_the_data_configs_pixel_options_to_its_sampler(photos):
    from soco_det.data.config import DataConfig
    from soco_det.data.dataset import build_pretrain_dataset

    images, store = photos
    options = dict(decode_reducing_gap=None, photometric="device", resize_reducing_gap=1.5, resize_backend="pil")
    ds = build_pretrain_dataset(DataConfig(images=str(images), proposals=str(store), **options), seed=0)
    assert ds.sampler.pixels == PixelOptions(**options)
    assert ds.views(0)[0].images[0].dtype == torch.uint8  # the device path's uint8 views
