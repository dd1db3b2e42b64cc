"""Transfer: fine-tune Mask R-CNN (torchvision v2 architecture) from a SoCo export and evaluate COCO AP.

``finetune(cfg, out_dir)`` trains and returns the run folder; ``evaluate(model_or_ckpt, coco_json,
images_dir, out_dir)`` returns bbox/segm AP and writes ``metrics.json``; ``FinetuneConfig`` is the
run's configuration (recipes ``finetune_1x``, ``finetune_tiny_cpu``). Heavy imports happen on use.

The implementations live in ``finetuning.py`` and ``evaluation.py``: a submodule named ``finetune``
would replace this package's ``finetune`` function by the module as soon as it was imported.
"""

from __future__ import annotations

from typing import Any

from soco_det.transfer.config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune", "evaluate"]


def finetune(cfg: FinetuneConfig, out_dir: Any, resume: Any = None, overwrite: bool = False) -> Any:
    """See :func:`soco_det.transfer.finetuning.finetune`."""
    from soco_det.transfer.finetuning import finetune as _finetune

    return _finetune(cfg, out_dir, resume=resume, overwrite=overwrite)


def evaluate(model_or_ckpt: Any, coco_json: Any, images_dir: Any, out_dir: Any = None, **kwargs: Any) -> dict:
    """See :func:`soco_det.transfer.evaluation.evaluate`."""
    from soco_det.transfer.evaluation import evaluate as _evaluate

    return _evaluate(model_or_ckpt, coco_json, images_dir, out_dir, **kwargs)
