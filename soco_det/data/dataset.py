"""The pretraining dataset (images + proposals -> views) and the collate function.

Determinism: the views of sample ``index`` in epoch ``epoch`` come only from
``numpy.random.default_rng([seed, epoch, index])``, so a batch is the same whatever the number of
loader workers. ``dataset.set_epoch(epoch)`` selects the epoch; an index may also be given as an
``(epoch, index)`` tuple, which works with persistent workers (whose dataset copy never sees
``set_epoch``).

Bad input at load time (an unreadable or truncated file, an image smaller than ``min_side``, an
image whose size differs from the one the proposals were computed on) is skipped with a warning:
the sample is replaced by another index drawn from ``default_rng([seed, epoch, index, attempt])``
(the views still use the original index's generator), the ``skipped`` count travels with the
sample into the batch (``batch["skipped"]``, so the engine can log it from any worker), and
``dataset.stats`` counts it in the current process. ``strict=True`` raises instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from soco_det.data.config import DataConfig, PixelOptions, ViewsConfig
from soco_det.data.lazy_image import LazyImage
from soco_det.data.levels import correspondence
from soco_det.data.sampler import ViewSample, ViewSampler
from soco_det.data.sources import ImageItem, join_with_store, resolve_items
from soco_det.data.view_report import warn_tiny_boxes
from soco_det.errors import ImageError, UserError
from soco_det.logs import get_logger
from soco_det.proposals.store import ProposalStore

log = get_logger(__name__)

NO_PROPOSALS = np.zeros((0, 4), dtype=np.int32)


def open_store(path: str | Path) -> Any:
    return ProposalStore.open(path)


class PretrainDataset(torch.utils.data.Dataset):
    """Views of every image in ``items``.

    Args:
        items: the images.
        store_indices: int64 ``[len(items)]``, each item's index in the proposal store (-1: none).
        store: a proposal store object (``boxes(i)``, ``size(i)``, ``exif_transpose``), or its path,
            opened lazily in each process (memory-mapped stores are cheap to reopen), or None.
        views: the view recipe.
        seed: the run's seed.
        pixels: decoding / resize / photometric options (default: ``PixelOptions()``).
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        store_indices: np.ndarray,
        store: Any,
        views: ViewsConfig,
        seed: int,
        strict: bool = False,
        min_side: int = 32,
        max_replacements: int = 16,
        pixels: PixelOptions | None = None,
    ) -> None:
        if len(items) == 0:
            raise UserError("the pretraining dataset has no images")
        self.items = list(items)
        self.store_indices = np.asarray(store_indices, dtype=np.int64)
        self._store_path = str(store) if isinstance(store, (str, Path)) else None
        self._store = None if self._store_path else store
        self.sampler = ViewSampler(views, pixels)
        self.photometric = self.sampler.pixels.photometric
        self.num_levels = self.sampler.num_levels
        self.seed = int(seed)
        self.epoch = 0
        self.strict = strict
        self.min_side = min_side
        self.max_replacements = max_replacements
        self.stats = {"bad_images": 0, "empty_proposals": 0, "samples": 0}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._store_path is not None:
            state["_store"] = None  # reopened in the worker
        return state

    @property
    def store_path(self) -> str | None:
        """The proposal store's folder when the dataset was given one by path."""
        return self._store_path

    @property
    def store(self) -> Any:
        if self._store is None and self._store_path is not None:
            self._store = open_store(self._store_path)
        return self._store

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, i: int) -> tuple[LazyImage, np.ndarray]:
        """Image i (pixels decoded by the sampler) and its proposals; raises ImageError for bad input.

        When the store records the image's size, the header is not read here: the sampler's
        decode checks that the file still has that size (a changed image is bad input)."""
        item = self.items[i]
        store, sidx = self.store, int(self.store_indices[i])
        exif = bool(getattr(store, "exif_transpose", False)) if store is not None else False
        expected = None
        if store is not None and sidx >= 0:
            expected = tuple(int(s) for s in store.size(sidx))
            if expected == (0, 0):  # the proposal job could not read it then: no proposals
                expected = None
                sidx = -1
        img = LazyImage(item.path, exif_transpose=exif, size=expected)
        if min(img.size) < self.min_side:
            raise ImageError(item.path, f"image is {img.size[0]}x{img.size[1]}, smaller than min_side={self.min_side}")
        if store is None or sidx < 0:
            return img, NO_PROPOSALS
        return img, np.asarray(store.boxes(sidx), dtype=np.int32).reshape(-1, 4)

    def geometry_inputs(self, i: int) -> tuple[tuple[int, int], np.ndarray] | None:
        """``(image size (W, H), rects int32 [n, 4])`` of item ``i`` as its samples get them, without
        decoding pixels (the size from the store, else the file's header); ``None`` for bad input."""
        try:
            img, rects = self._load(i)
        except ImageError:
            return None
        return tuple(img.size), rects

    def views(self, index: int, epoch: int | None = None) -> tuple[ViewSample, int, int]:
        """``(views, index actually used, number of bad images skipped)`` for ``index``."""
        epoch = self.epoch if epoch is None else int(epoch)
        used, skipped = int(index), 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            try:
                img, rects = self._load(used)
                sample = self.sampler(img, rects, rng)  # decodes: a truncated file fails here
                break
            except ImageError as exc:
                if self.strict:
                    raise
                skipped += 1
                self.stats["bad_images"] += 1
                if skipped > self.max_replacements:
                    raise UserError(
                        f"{skipped} bad images in a row while loading sample {index} (last: {exc}); "
                        "is the image folder readable?"
                    ) from exc
                used = int(np.random.default_rng([self.seed, epoch, int(index), skipped]).integers(len(self)))
                log.warning("skipping bad image (%s); using sample %d instead of %d", exc, used, index)
        if len(rects) == 0:
            self.stats["empty_proposals"] += 1
        self.stats["samples"] += 1
        return sample, used, skipped

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        sample, _, skipped = self.views(index, epoch)
        out = {
            "images": sample.images,
            "pairs": sample.pairs,
            "boxes": sample.boxes,
            "ids": sample.ids,
            "levels": sample.levels,
            "num_levels": self.num_levels,
            "index": int(index),
            "skipped": skipped,
        }
        if self.photometric == "device":
            k = self.sampler.cfg.boxes.padding_k
            out["photometric"] = sample.params
            out["cutout"] = [_pad_regions(r, k) for r in sample.cutouts]
            out["norm"] = (self.sampler.cfg.photometric.mean, self.sampler.cfg.photometric.std)
        return out


def _pad_regions(regions: np.ndarray, k: int) -> np.ndarray:
    """Cutout regions int64 ``[M, 4]`` (M <= k) -> ``[k, 4]``, unused rows ``[0, 0, -1, -1]`` (empty)."""
    out = np.zeros((k, 4), dtype=np.int64)
    out[len(regions) :, 2:] = -1
    out[: len(regions)] = regions
    return out


def _stack(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).to(dtype)


def collate_views(samples: list[dict]) -> dict:
    """Stack samples into the batch the model consumes (docs/architecture.md).

    With ``B`` samples, ``K = padding_k``, ``P`` levels (4 for FPN, 1 for C4):

    * ``images``: ``list[Tensor]``, one per view v, float32 ``[B, 3, S_v, S_v]`` (ImageNet-normalised);
    * ``pairs``: ``list[tuple[int, int]]``, e.g. ``[(0, 1), (0, 2)]``;
    * ``boxes``: per pair, ``(a, b)`` float32 ``[B, K, 4]`` ``x1, y1, x2, y2`` normalised to each view
      (continuous convention, or legacy values with ``legacy=True``), after flips;
    * ``ids``: per pair, ``(a, b)`` int64 ``[B, K]``, 1-based proposal ids;
    * ``levels``: per pair, ``(a, b)`` int64 ``[B, K]``, level 0..P-1 (P2..), -1 unassigned;
    * ``corr``: per pair, float32 ``[B, P*K, P*K]`` from :func:`soco_det.data.levels.correspondence`;
    * ``index``: int64 ``[B]`` dataset index of each sample;
    * ``skipped``: int64 ``[B]`` bad images replaced while loading each sample.

    With ``data.photometric: device`` the images are uint8 ``[B, 3, S_v, S_v]`` (colour, blur,
    normalisation and cutout not applied yet) and three more keys carry what
    :func:`soco_det.data.device_photometric.apply_device_photometric` needs:

    * ``photometric``: per view, float32 ``[B, NUM_PARAMS]`` (``photometric.PARAM_NAMES``);
    * ``cutout``: per view, int64 ``[B, K, 4]`` inclusive pixel regions, unused rows ``[0, 0, -1, -1]``;
    * ``norm``: float32 ``[2, 3]``, the mean and std rows.
    """
    first = samples[0]
    pairs = [tuple(p) for p in first["pairs"]]
    num_views = len(first["images"])
    batch: dict[str, Any] = {
        "images": [torch.stack([s["images"][v] for s in samples]) for v in range(num_views)],
        "pairs": pairs,
        "boxes": [],
        "ids": [],
        "levels": [],
        "corr": [],
    }
    for p in range(len(pairs)):
        for key, dtype in (("boxes", torch.float32), ("ids", torch.int64), ("levels", torch.int64)):
            batch[key].append(tuple(_stack([s[key][p][side] for s in samples], dtype) for side in (0, 1)))
        (ids_a, ids_b), (lv_a, lv_b) = batch["ids"][p], batch["levels"][p]
        batch["corr"].append(correspondence(ids_a, lv_a, ids_b, lv_b, first["num_levels"]))
    if "photometric" in first:
        batch["photometric"] = [_stack([s["photometric"][v] for s in samples], torch.float32) for v in range(num_views)]
        batch["cutout"] = [_stack([s["cutout"][v] for s in samples], torch.int64) for v in range(num_views)]
        batch["norm"] = torch.tensor(first["norm"], dtype=torch.float32)
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    batch["skipped"] = torch.tensor([s["skipped"] for s in samples], dtype=torch.int64)
    return batch


def check_coverage(cfg: DataConfig, items: Sequence[ImageItem], indices: np.ndarray, store: Any) -> None:
    """Refuse a store that gives proposals to less than ``cfg.min_proposal_coverage`` of the
    images (no entry, or an entry that is not 'ok'): training would silently be image-level."""
    ok = np.zeros(len(indices), bool)
    found = indices >= 0
    if found.any():
        ok[found] = np.isin(indices[found], store.ok_indices())
    covered = int(ok.sum())
    if covered >= cfg.min_proposal_coverage * len(items):
        return
    root = cfg.images if isinstance(cfg.images, str) else (store.root if cfg.images is None else "IMAGES")
    raise UserError(
        f"{cfg.proposals}: only {covered} of the {len(items)} images have proposals there "
        f"({100 * covered / len(items):.1f} %, data.min_proposal_coverage={cfg.min_proposal_coverage}), so most "
        f"would be trained on the whole-image box; compute the missing ones with "
        f"`soco-det proposals {root} -o {cfg.proposals}` (it extends the store), or lower data.min_proposal_coverage"
    )


def build_pretrain_dataset(cfg: DataConfig, seed: int) -> PretrainDataset:
    """The dataset a :class:`DataConfig` describes (images joined with the proposal store)."""
    cfg.validate()
    store = open_store(cfg.proposals) if cfg.proposals is not None else None
    items = resolve_items(cfg.images, cfg.list_file, cfg.coco_json, store)
    if store is None:
        log.warning("no proposal store (data.proposals): every image uses the whole-image box")
        indices = np.full(len(items), -1, dtype=np.int64)
    else:
        indices = join_with_store(items, store)
        missing = int((indices < 0).sum())
        if missing == len(items):
            raise UserError(
                f"none of the {len(items)} images (e.g. {items[0].key!r}) is in the proposal store {cfg.proposals} "
                f"(e.g. {store.paths[0] if len(store) else 'empty store'!r}); do the image root and the store match?"
            )
        check_coverage(cfg, items, indices, store)
        if missing:
            msg = f"{missing} of {len(items)} images have no entry in the proposal store {cfg.proposals}"
            if cfg.strict:
                raise UserError(msg + " (data.strict=true)")
            log.warning("%s; they use the whole-image box", msg)
    dataset = PretrainDataset(
        items,
        indices,
        cfg.proposals,
        cfg.views,
        seed,
        strict=cfg.strict,
        min_side=cfg.min_side,
        max_replacements=cfg.max_replacements,
        pixels=cfg.pixels,
    )
    if store is not None:  # whole-image boxes are never tiny: only proposals need the check
        warn_tiny_boxes(dataset)
    return dataset
