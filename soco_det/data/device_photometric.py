"""The photometric augmentations of a batch as torch ops (``data.photometric: device``).

With ``data.photometric: device`` the loader workers only decode, crop, resize and flip; each view
arrives as uint8 ``[B, 3, S, S]`` together with the per-view parameters the CPU drew from the
sample's generator (``batch["photometric"]``, rows laid out as ``photometric.PARAM_NAMES``), the
cutout regions (``batch["cutout"]``) and the normalisation (``batch["norm"]``). The engine moves
the batch to the GPU and calls :func:`apply_device_photometric`, which runs the same pipeline as
the CPU path (:func:`soco_det.data.photometric.apply_params`):

* ColorJitter with the drawn factors in the drawn order, each op reproducing PIL's uint8
  arithmetic (float32 blend, clip, truncate; contrast around the rounded mean ``L``; saturation
  around each pixel's ``L``; hue through PIL's uint8 HSV round trip) -> equal to the CPU path up to
  float rounding (hue: at most a couple of uint8 levels on a few pixels);
* grayscale (PIL's integer ``L``), solarize, normalisation and cutout: exact;
* Gaussian blur: a **true Gaussian** of standard deviation ``sigma`` (separable, kernel radius
  ``ceil(3 sigma)``, edges replicated, rounded back to uint8 levels) instead of PIL's three-pass
  extended-box approximation. The two differ by about one uint8 level on average (measured in
  ``tests/test_views_speed_paths.py``); the Gaussian is what PIL approximates.

Everything runs batched (per-sample factors are tensors), on CUDA or CPU tensors alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from soco_det.data.photometric import PARAM_NAMES

_P = {name: i for i, name in enumerate(PARAM_NAMES)}
_LUMA = (19595.0, 38470.0, 7471.0)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's integer ``L`` of float ``[N, 3, H, W]`` uint8-valued pixels -> ``[N, 1, H, W]``.
    Every intermediate is an integer below 2**24, so float32 is exact."""
    s = x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2] + 32768.0
    return torch.floor(s / 65536.0)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend``: ``a + f (b - a)`` in float32, clipped to [0, 255], truncated."""
    return torch.clamp(a + f * (b - a), 0.0, 255.0).floor()


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, f)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    lum = _luma(x).to(torch.float64)
    mean = torch.floor(lum.mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
    return _blend(mean.expand_as(x), x, f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(_luma(x).expand_as(x), x, f)


def _hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert('HSV')``, ``H += uint8(hue * 255)`` (wrapping), ``convert('RGB')``."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    cr = maxc - minc
    grey = cr == 0
    crs = torch.where(grey, torch.ones_like(cr), cr)
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / crs, (maxc - g) / crs, (maxc - b) / crs
    h = torch.where(r == maxc, bc - gc, torch.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    # PIL's C code promotes to double from here on; float32 would move hues that sit exactly on a
    # uint8 step (e.g. 15/255) to the level below.
    h, s, maxc = h.double(), s.double(), maxc.double()
    h = h / 6.0 + 1.0
    h = h - torch.floor(h)
    uh = torch.clamp(torch.floor(h * 255.0), 0, 255)
    us = torch.clamp(torch.floor(s * 255.0), 0, 255)
    shift = torch.remainder(torch.trunc(hue.double() * 255.0), 256.0).view(-1, 1, 1)
    uh = torch.remainder(uh + shift, 256.0)
    v = maxc
    hf = uh * 6.0 / 255.0
    i = torch.floor(hf)
    fr = hf - i
    fs = us / 255.0
    p = torch.clamp(torch.floor(v * (1.0 - fs) + 0.5), 0, 255)
    q = torch.clamp(torch.floor(v * (1.0 - fs * fr) + 0.5), 0, 255)
    t = torch.clamp(torch.floor(v * (1.0 - fs * (1.0 - fr)) + 0.5), 0, 255)
    i = torch.remainder(i, 6.0)
    sel = [i == k for k in range(6)]

    def pick(c0, c1, c2, c3, c4, c5):
        out = c5
        for k, ck in reversed(list(enumerate((c0, c1, c2, c3, c4)))):
            out = torch.where(sel[k], ck, out)
        return out

    rgb = torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], dim=1)
    grey_v = torch.stack([v, v, v], dim=1)
    keep = (grey | (us == 0)).unsqueeze(1)
    # s == 0 in HSV (grey pixel, or saturation rounded to 0): PIL returns (v, v, v); exactly grey
    # input pixels come back unchanged (r == g == b == v).
    return torch.where(keep, grey_v, rgb).to(x.dtype)


_OPS = (_brightness, _contrast, _saturation, _hue)


def _colour_jitter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The four ColorJitter ops in each sample's drawn order, on the samples that jitter."""
    order = p[:, _P["order0"] : _P["order0"] + 4].round().long()
    factors = p[:, _P["brightness"] : _P["brightness"] + 4]
    enabled = p[:, _P["enabled_b"] : _P["enabled_b"] + 4] > 0
    jitter = p[:, _P["jitter"]] > 0
    for step in range(4):
        for op, fn in enumerate(_OPS):
            idx = torch.nonzero(jitter & (order[:, step] == op) & enabled[:, op]).flatten()
            if idx.numel() == 0:
                continue
            f = factors[idx, op]
            arg = f if op == 3 else f.view(-1, 1, 1, 1)
            x[idx] = fn(x[idx], arg)
    return x


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``[N, 2 radius + 1]`` for standard deviations ``sigma [N]``."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """True Gaussian blur of float ``[N, C, H, W]`` uint8-valued images, one sigma per image,
    edges replicated, rounded to uint8 levels (as PIL stores its result)."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    k = gaussian_kernels(sigma, radius).repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return torch.clamp(torch.floor(y.reshape(n, c, h, w) + 0.5), 0.0, 255.0)


def _cutout_mask(regions: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bool ``[N, 1, H, W]``: pixels inside any inclusive region ``[N, K, 4]`` (empty rows: x2 < x1)."""
    ys = torch.arange(h, device=regions.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=regions.device).view(1, 1, 1, w)
    r = regions.view(regions.shape[0], regions.shape[1], 4, 1, 1)
    inside = (xs >= r[:, :, 0]) & (xs <= r[:, :, 2]) & (ys >= r[:, :, 1]) & (ys <= r[:, :, 3])
    return inside.any(dim=1, keepdim=True)


def augment_view(images: torch.Tensor, params: torch.Tensor, cutout: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """One view of a batch: uint8 ``[B, 3, S, S]`` + params float32 ``[B, NUM_PARAMS]`` + cutout
    int64 ``[B, K, 4]`` + norm float32 ``[2, 3]`` -> normalised float32 ``[B, 3, S, S]``."""
    x = images.to(torch.float32)
    params = params.to(x.device)
    x = _colour_jitter(x, params)
    gray = torch.nonzero(params[:, _P["gray"]] > 0).flatten()
    if gray.numel():
        x[gray] = _luma(x[gray]).expand(-1, 3, -1, -1).clone()
    blur = torch.nonzero(params[:, _P["blur"]] > 0).flatten()
    if blur.numel():
        x[blur] = gaussian_blur(x[blur], params[blur, _P["sigma"]])
    sol = (params[:, _P["solarize"]] > 0).view(-1, 1, 1, 1) & (x >= params[:, _P["threshold"]].view(-1, 1, 1, 1))
    x = torch.where(sol, 255.0 - x, x)
    norm = norm.to(device=x.device, dtype=torch.float32)
    scale = (1.0 / (255.0 * norm[1].double())).float().view(1, 3, 1, 1)
    offset = (norm[0].double() / norm[1].double()).float().view(1, 3, 1, 1)
    x = x * scale - offset
    mask = _cutout_mask(cutout.to(x.device), x.shape[2], x.shape[3])
    return x.masked_fill_(mask, 0.0)


def apply_device_photometric(batch: dict) -> dict:
    """The batch of a ``data.photometric: device`` loader (on any device) -> the same batch with
    ``images`` replaced by the normalised float32 views (layout of docs/architecture.md) and the
    ``photometric`` / ``cutout`` / ``norm`` keys removed. A batch without those keys (CPU path) is
    returned unchanged, so the call is safe either way."""
    if "photometric" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in ("photometric", "cutout", "norm")}
    # fp32 throughout even when called inside an autocast region (the blur is a conv2d)
    with torch.autocast(device_type=batch["images"][0].device.type, enabled=False):
        out["images"] = [
            augment_view(img, p, cut, batch["norm"])
            for img, p, cut in zip(batch["images"], batch["photometric"], batch["cutout"])
        ]
    return out
