"""Linear evaluation: a linear classifier on the frozen backbone's pooled C5, on an ImageFolder.

The image-level counterpart of the detection transfer, as the official ``main_linear.py`` runs it
(hologerry/SoCo ``main_linear.py``, ``contrast/option.py`` with ``stage='linear'``,
``contrast/lr_scheduler.py``, ``contrast/data/transform.py``). Defaults are that recipe:

==========================  ===============================================================
classifier                  ``Linear(C5 channels -> classes)`` on global-average-pooled C5
                            (``head_type='reduce'``); only it is trained
optimiser                   SGD, lr **30** (not scaled by the batch), momentum 0.9,
                            weight decay 0, total batch 256
schedule                    per iteration: linear warmup over 5 epochs from lr/100, then a
                            cosine to 1e-6 over the remaining epochs; 100 epochs
train views                 RandomResizedCrop(224, scale=(0.08, 1)), horizontal flip
val views                   Resize(224 + 32) (shorter side), CenterCrop(224)
normalisation               ImageNet mean/std
==========================  ===============================================================

One deliberate difference: the backbone runs in eval mode (BatchNorm uses and keeps its running
statistics), so it is really frozen. The official script calls ``model.train()``, so its BN layers
normalise with batch statistics and update their running averages while the "frozen" backbone is
probed; ``bn_train_mode=True`` reproduces that.

The score is top-1 (and top-5 with at least 5 classes) on the val folder, with a 95 % bootstrap
interval for top-1 (:func:`bootstrap_ci`). Any weights :mod:`soco_det.export.init_weights` reads
can be probed (a soco-det run or checkpoint, an export, an official SoCo checkpoint, a torchvision
or timm ResNet, a detector checkpoint), or ``random`` for the floor.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy

from soco_det.atomic import atomic_save, atomic_write_json
from soco_det.engine.schedules import learning_rate
from soco_det.errors import UserError
from soco_det.export.init_weights import file_depth, init_from_weights
from soco_det.imageio import load_rgb
from soco_det.logs import get_logger
from soco_det.models import ModelConfig, build_model
from soco_det.probe.config import LinearEvalSettings
from soco_det.torch_io import resolve_device

log = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bootstrap_ci(
    correct: "numpy.ndarray", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy of 0/1 outcomes ``correct`` ``[N]``.

    Resampling N outcomes with replacement and averaging is exactly a Binomial(N, acc) / N draw, so
    the ``n_boot`` resamples are drawn that way (the same distribution, without an N x n_boot array).
    """
    import numpy as np

    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.binomial(n, correct.mean(), size=n_boot) / n
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def load_backbone(weights: str | Path, depth: int | None = None) -> tuple[Any, str]:
    """``(ResNet trunk returning C2..C5, description)`` for a weights file/run folder or ``random``.

    ``depth``: the ResNet depth; ``None`` reads it from the file (50 for ``random``).
    """
    import torch

    if str(weights) == "random":
        d = depth or 50
        torch.manual_seed(0)
        cfg = ModelConfig(variant="image_byol", depth=d, proj_hidden_dim=8, proj_dim=8)
        return build_model(cfg).online["encoder"], f"random ResNet-{d}"
    d = depth or file_depth(weights)
    cfg = ModelConfig(variant="image_byol", depth=d, proj_hidden_dim=8, proj_dim=8, init=str(weights))
    model = build_model(cfg)
    report = init_from_weights(model, weights, cfg)
    return model.online["encoder"], f"{weights} ({report.kind}, ResNet-{d}, {len(report.loaded)} backbone tensors)"


def _datasets(train_dir: str | Path, val_dir: str | Path, s: LinearEvalSettings) -> tuple[Any, Any]:
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(s.image_size, scale=(s.crop_min_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(s.image_size + 32),
            transforms.CenterCrop(s.image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    out = []
    for folder, tf in ((train_dir, train_tf), (val_dir, val_tf)):
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: not a folder (ImageFolder layout: ROOT/CLASS/IMAGE)")
        try:
            out.append(datasets.ImageFolder(str(folder), transform=tf, loader=load_rgb))
        except (FileNotFoundError, RuntimeError) as exc:
            raise UserError(f"{folder}: {exc}") from exc
    if out[0].classes != out[1].classes:
        raise UserError(f"class folders differ: train {out[0].classes} vs val {out[1].classes}")
    return out[0], out[1]


def _train_loader(train_set: Any, s: LinearEvalSettings, dev: Any):  # noqa: ANN202
    """Shuffled by its own generator; the random crops and flips draw from the global RNG, seeded here."""
    import torch

    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)  # the random crops and flips (torchvision draws from the global RNG)
    return torch.utils.data.DataLoader(
        train_set,
        batch_size=s.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= s.batch_size,
        num_workers=s.num_workers,
        generator=gen,
        pin_memory=dev.type == "cuda",
    )


def _train_classifier(features: Any, classifier: Any, optimizer: Any, loader: Any, s: LinearEvalSettings, dev: Any):  # noqa: ANN202
    """``s.epochs`` epochs of SGD on the linear classifier over the frozen ``features``, at the official
    per-iteration schedule; returns ``(iterations, mean training loss of the last epoch)``."""
    import numpy as np
    import torch.nn.functional as F

    steps_per_epoch = len(loader)
    total = s.epochs * steps_per_epoch
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    step, loss_value = 0, float("nan")
    for epoch in range(s.epochs):
        classifier.train()
        losses = []
        for images, labels in loader:
            # 1. Learning rate of this iteration (warmup, then cosine), as the official scheduler.
            lr = learning_rate(step, s.lr, warmup, total, s.min_lr, s.warmup_multiplier)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 2. Frozen features, linear logits, cross-entropy; only the classifier gets gradients.
            loss = F.cross_entropy(classifier(features(images)), labels.to(dev))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss at iteration {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step = step + 1
            losses.append(loss.item())
        loss_value = float(np.mean(losses))  # the epoch's mean training loss
        log.info("linear eval: epoch %d/%d, loss %.4f, lr %.4g", epoch + 1, s.epochs, loss_value, lr)
    return step, loss_value


def _score(features: Any, classifier: Any, val_set: Any, s: LinearEvalSettings, k: int):  # noqa: ANN202
    """Top-1 and top-``k`` hits (bool ``[N]`` each) of the classifier over the val folder."""
    import numpy as np
    import torch

    classifier.eval()
    loader = torch.utils.data.DataLoader(val_set, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers)
    correct1, correct5 = [], []
    with torch.no_grad():
        for images, labels in loader:
            top = classifier(features(images)).cpu().topk(k, dim=1).indices
            correct1.append((top[:, 0] == labels).numpy())
            correct5.append((top == labels[:, None]).any(dim=1).numpy())
    return np.concatenate(correct1), np.concatenate(correct5)


def linear_eval(
    weights: str | Path,
    train_dir: str | Path,
    val_dir: str | Path,
    out_dir: str | Path | None = None,
    depth: int | None = None,
    device: str = "auto",
    settings: LinearEvalSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a linear classifier on the frozen backbone of ``weights`` and score it on ``val_dir``.

    ``train_dir`` / ``val_dir``: ImageFolder layouts (``ROOT/CLASS/IMAGE``) with the same classes.
    ``settings`` (or keyword ``overrides`` of its fields) default to the official recipe.
    Returns ``{"top1", "top1_ci95": [lo, hi], "top5", "num_classes", "num_train", "num_val",
    "iterations", "final_loss" (mean over the last epoch), "backbone", "settings", "seconds"}`` (accuracies as fractions) and, with
    ``out_dir``, writes ``metrics.json`` and the classifier (``linear.pt``) there.
    """
    import torch
    from torch import nn

    s = settings or LinearEvalSettings()
    if overrides:
        s = LinearEvalSettings(**{**asdict(s), **overrides})
    s.validate()
    dev = torch.device(resolve_device(device, "device"))
    t0 = time.perf_counter()
    train_set, val_set = _datasets(train_dir, val_dir, s)
    backbone, described = load_backbone(weights, depth)
    backbone.requires_grad_(False)
    backbone.to(dev).train(s.bn_train_mode)
    classifier = nn.Linear(backbone.channels[3], len(train_set.classes)).to(dev)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    loader = _train_loader(train_set, s, dev)

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return backbone(x.to(dev, non_blocking=True))[-1].mean(dim=(2, 3))  # pooled C5 [B, C]

    step, loss_value = _train_classifier(features, classifier, optimizer, loader, s, dev)
    backbone.eval()
    hits1, hits5 = _score(features, classifier, val_set, s, min(5, len(train_set.classes)))
    lo, hi = bootstrap_ci(hits1, s.bootstrap, seed=s.seed)
    result = {
        "top1": float(hits1.mean()),
        "top1_ci95": [lo, hi],
        "top5": float(hits5.mean()) if len(train_set.classes) >= 5 else None,
        "num_classes": len(train_set.classes),
        "num_train": len(train_set),
        "num_val": len(val_set),
        "iterations": step,
        "final_loss": loss_value,
        "backbone": described,
        "settings": asdict(s),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info(
        "linear eval: top-1 %.2f%% (95%% CI %.2f-%.2f) on %d val images, %d classes",
        100 * result["top1"],
        100 * lo,
        100 * hi,
        len(val_set),
        len(train_set.classes),
    )
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "metrics.json", result, indent=2)
        state = {"classifier": classifier.state_dict(), "classes": train_set.classes}
        atomic_save(out / "linear.pt", lambda f: torch.save(state, f))
    return result
