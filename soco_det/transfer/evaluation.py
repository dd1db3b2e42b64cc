"""COCO box and mask AP of a Mask R-CNN on a COCO-format val set, with pycocotools.

``evaluate(model_or_ckpt, coco_json, images_dir, out_dir)`` runs the model over the images at their
original size (the model's transform resizes them and maps its outputs back), turns the outputs
into COCO results and scores them with ``COCOeval``:

* boxes ``x1, y1, x2, y2`` (pixels) -> COCO ``bbox`` ``[x, y, w, h]``;
* masks: the model's ``[N, 1, H, W]`` probabilities, already pasted at the original image size,
  thresholded at 0.5 and encoded as compressed RLE;
* labels ``1..C`` -> the dataset's own category ids (sorted id order, as in
  :class:`~soco_det.transfer.coco_data.CocoInstances`), so non-contiguous ids such as 3, 7, 11 survive.

Metrics are fractions in ``[0, 1]`` (``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` per IoU
type); ``None`` where COCOeval has no ground truth in a size range (it reports -1 there). They are
written atomically to ``out_dir/metrics.json``, the raw results to ``out_dir/{bbox,segm}_results.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from soco_det.atomic import atomic_write_json
from soco_det.checkpoint_files import load_checkpoint, load_model_strict
from soco_det.config import from_dict
from soco_det.errors import UserError
from soco_det.logs import Progress, get_logger
from soco_det.runlock import is_run_folder
from soco_det.torch_io import resolve_device
from soco_det.transfer.box_only import has_mask_branch, iou_types
from soco_det.transfer.coco_data import CocoInstances, to_tensor
from soco_det.transfer.config import FinetuneConfig
from soco_det.transfer.model import build_from_config

log = get_logger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
RESULT_FILES = ("metrics.json", "bbox_results.json", "segm_results.json")  # what evaluate() writes to out_dir
MASK_THRESHOLD = 0.5


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, cat_ids: Sequence[int]
) -> tuple[list[dict], list[dict]]:
    """COCO ``bbox`` and ``segm`` result entries of one image's model output.

    ``output``: ``boxes`` float ``[N, 4]`` xyxy pixels, ``scores`` ``[N]``, ``labels`` int64 ``[N]``
    in ``1..C`` and optionally ``masks`` float ``[N, 1, H, W]`` probabilities at the image's size.
    ``cat_ids[label - 1]`` is the dataset category id of a label.
    """
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    categories = [int(cat_ids[label - 1]) for label in labels]
    bbox = [
        {"image_id": int(image_id), "category_id": c, "bbox": [round(v, 3) for v in b], "score": float(s)}
        for c, b, s in zip(categories, xywh, scores)
    ]
    segm: list[dict] = []
    if "masks" in output and len(labels):
        binary = (output["masks"].detach()[:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for c, rle, s in zip(categories, rles, scores):
            segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            segm.append({"image_id": int(image_id), "category_id": c, "segmentation": segmentation, "score": float(s)})
    return bbox, segm


def coco_metrics(
    coco_gt: Any, results: list[dict], iou_type: str, image_ids: Sequence[int] | None = None
) -> dict[str, float | None]:
    """``COCOeval`` summary of ``results`` against ``coco_gt`` (a pycocotools ``COCO``).

    Returns ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (``stats[0:6]``, fractions), ``None``
    where COCOeval reports -1 (no ground truth of that size). No result at all scores 0.
    ``image_ids`` restricts the evaluation (default: every image of ``coco_gt``).
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        log.warning("no %s detections: every %s metric is 0", iou_type, iou_type)
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # pycocotools prints its tables
        # loadRes adds numpy-typed fields (area, bbox, id) to the dicts it is given: hand it copies.
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("%s\n%s", iou_type, printed.getvalue())
    return {name: (float(v) if v >= 0 else None) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[Any], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The detector's outputs (eval mode, on the CPU) for PIL ``images`` at their own size: per image
    ``boxes`` float32 ``[N, 4]`` ``x1, y1, x2, y2`` pixels, ``labels`` int64 ``[N]`` in ``1..C``,
    ``scores`` ``[N]`` and, with a mask branch, ``masks`` float32 ``[N, 1, H, W]`` probabilities.
    The model's training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        outputs = model([to_tensor(im).to(device) for im in images])
    finally:
        model.train(was_training)
    return [{k: v.detach().cpu() for k, v in out.items()} for out in outputs]


def predict(
    model: nn.Module, dataset: Any, device: torch.device, batch_size: int = 1, show_progress: bool = True
) -> dict[str, list[dict]]:
    """COCO results (``{"bbox": [...], "segm": [...]}``) of ``model`` on every image of ``dataset``
    (a :class:`~soco_det.transfer.coco_data.CocoInstances` with ``train=False``)."""
    results: dict[str, list[dict]] = {t: [] for t in IOU_TYPES}
    with Progress(total=len(dataset), desc="evaluate", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            outputs = detect(model, [dataset.load_image(i) for i in indices], device)
            for i, output in zip(indices, outputs):
                bbox, segm = to_coco_results(output, dataset.ids[i], dataset.cat_ids)
                results["bbox"] += bbox
                results["segm"] += segm
            bar.update(len(indices))
    return results


def load_detector(path: str | Path, device: torch.device) -> tuple[nn.Module, list[int], FinetuneConfig]:
    """The fine-tuned detector of a ``soco-det finetune`` checkpoint or run folder (its newest intact
    checkpoint) on ``device``, the dataset category id of each label (``cat_ids[label - 1]``) and the
    run's config."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "maskrcnn":
        raise UserError(
            f"{ckpt['path']}: not a fine-tuning checkpoint (kind {ckpt.get('kind')!r}); give a `soco-det finetune` run"
        )
    cfg = from_dict(FinetuneConfig, ckpt["config"])

    model = build_from_config(
        cfg.model, cfg.input, num_classes=len(ckpt["cat_ids"]) + 1, masks=has_mask_branch(ckpt["model"])
    )
    load_model_strict(model, ckpt["model"], source=ckpt["path"])
    return model.to(device), [int(c) for c in ckpt["cat_ids"]], cfg


def evaluate(
    model_or_ckpt: nn.Module | str | Path,
    coco_json: str | Path,
    images_dir: str | Path,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 1,
    max_images: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """COCO bbox and segm AP of a Mask R-CNN (a model object, or a fine-tuning checkpoint / run folder).

    Returns ``{"bbox": {AP, AP50, ...}, "segm": {...}, "num_images": n}`` (fractions; no ``segm``
    for a box-only Faster R-CNN) and, with
    ``out_dir``, writes ``metrics.json`` and the raw results there. A model object is evaluated on
    its current device with labels mapped through the dataset's categories; a checkpoint must have
    been trained on the same category ids as ``coco_json`` holds.
    """
    if out_dir is not None and is_run_folder(out_dir):
        raise UserError(
            f"{out_dir}: is a run folder (its metrics.json is the run's result); evaluate into a folder of its own"
        )
    if not isinstance(model_or_ckpt, nn.Module):
        device = torch.device(resolve_device(device, "--device"))  # before any reading: fail fast
    dataset = CocoInstances(coco_json, images_dir, train=False, max_images=max_images)
    if isinstance(model_or_ckpt, nn.Module):
        model = model_or_ckpt
        device = next(model.parameters()).device
    else:
        model, cat_ids, _ = load_detector(model_or_ckpt, device)
        if cat_ids != dataset.cat_ids:
            raise UserError(
                f"{coco_json}: category ids {dataset.cat_ids} differ from the ones the model was trained on {cat_ids}"
            )

    results = predict(model, dataset, device, batch_size=batch_size, show_progress=show_progress)
    # A box-only detector (no mask branch) is scored on boxes only.
    kinds = iou_types(model)
    metrics: dict[str, Any] = {t: coco_metrics(dataset.coco, results[t], t, dataset.ids) for t in kinds}
    metrics["num_images"] = len(dataset)
    if out_dir is not None:
        out = Path(out_dir)
        for t in kinds:
            atomic_write_json(out / f"{t}_results.json", results[t])
        atomic_write_json(out / "metrics.json", metrics, indent=2)
    log.info("%s", format_metrics(metrics))
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line per IoU type, values in percent, e.g. ``bbox: AP 41.2 AP50 ...``."""
    lines = []
    for t in (t for t in IOU_TYPES if t in metrics):
        values = " ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in metrics[t].items())
        lines.append(f"{t}: {values}")
    return "; ".join(lines)
