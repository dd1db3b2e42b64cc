"""``FinetuneConfig``: everything a Mask R-CNN fine-tuning run reads (docs/method.md 7.1).

The defaults are the SoCo detectron2 transfer recipe (Mask R-CNN R50-FPN, BN everywhere and SyncBN
under DDP, nothing frozen, 1x = 90k iterations at batch 16, LR 0.02 with steps at 60k/80k,
multi-scale 640-800 training, weight decay 2.5e-5, RGB input with ImageNet mean/std). Recipes
``finetune_1x`` and ``finetune_tiny_cpu`` set them explicitly; ``key=value`` overrides change any leaf.

A ``solver.schedule`` preset (``1x``, ``2x``) replaces ``iterations``/``steps``/``warmup_iters`` by
the COCO schedule scaled to the size of the training set (see :func:`resolve_schedule`), so that a
small dataset gets the same number of *epochs* as COCO 1x (about 12.2) rather than 90k iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional, Union

from soco_det.engine.config import LoggingConfig
from soco_det.logs import get_logger

log = get_logger(__name__)

# COCO train2017 (the images with at least one annotation, as detectron2 trains on) and the 1x
# schedule: 90k iterations at 16 images each = 12.17 epochs; LR steps at 2/3 and 8/9 of it.
COCO_TRAIN_IMAGES = 117266
COCO_1X_ITERATIONS = 90000
COCO_1X_BATCH = 16
COCO_WARMUP_ITERS = 1000
SCHEDULE_MULTIPLIERS = {"1x": 1.0, "2x": 2.0, "3x": 3.0}


@dataclass
class FinetuneDataConfig:
    """COCO-format data: ``*_json`` annotation files, ``*_images`` folders their ``file_name``s are relative to."""

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    # loader workers per process; auto: the cores available to this node's processes, less one each
    num_workers: Union[int, Literal["auto"]] = 2
    # Training skips images without a usable (non-crowd, non-degenerate) instance, as detectron2 does.
    filter_empty: bool = True
    # Evaluate on at most this many val images (0 = all); for quick periodic checks.
    max_val_images: int = 0

    def validate(self) -> None:
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or auto, got {self.num_workers}")
        if self.max_val_images < 0:
            raise ValueError(f"max_val_images must be >= 0, got {self.max_val_images}")


@dataclass
class FinetuneModelConfig:
    """Mask R-CNN v2 (torchvision architecture) on a ResNet-``depth`` FPN backbone.

    ``init``: ``random`` (torchvision's init); ``untrained:RUN``, the network the pretraining run
    ``RUN`` (folder, ``config.yaml`` or checkpoint) started from, untrained (its paired baseline,
    :mod:`soco_det.transfer.untrained_init`); a torchvision-format export of a pretrained SoCo model
    (``soco-det export --to torchvision``: backbone + FPN + box head), or the pretraining run folder,
    checkpoint or official ``ckpt_epoch_*.pth`` it comes from (exported in memory, online network);
    or a torchvision ImageNet-style ResNet weights file (``resnet50-*.pth``, backbone only). Files are
    read locally, never downloaded.
    """

    depth: int = 50
    init: str = "random"
    # 0: from the dataset (its number of categories + 1 for the background); otherwise must agree.
    num_classes: int = 0
    # BatchNorm -> SyncBatchNorm when training under DDP (SoCo fine-tunes with SyncBN everywhere).
    sync_bn: bool = True
    # Widths of the FPN and the box head (0 / empty: read from an init export, else torchvision's
    # 256 / [256]*4 / [1024] / 7). A SoCo export fixes them: they must match its pretrained layers.
    fpn_channels: int = 0
    box_conv_dims: list[int] = field(default_factory=list)
    box_fc_dims: list[int] = field(default_factory=list)
    box_roi_size: int = 0
    # Sampled RoIs per image for the box head (detectron2/torchvision default 512) and anchors for the RPN.
    roi_batch_size: int = 512
    rpn_batch_size: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    detections_per_img: int = 100
    score_thresh: float = 0.05
    # BatchNorm while fine-tuning: "train" (batch statistics, running averages for evaluation) or
    # "frozen" (the init's running statistics and affine parameters kept fixed, detectron2's FrozenBN).
    bn_mode: Literal["train", "frozen"] = "train"
    # PreciseBN: before each evaluation, re-estimate every BN's running statistics as the average over
    # this many training images (0: off; the running averages of the last iterations are used).
    precise_bn_images: int = 0

    def validate(self) -> None:
        if self.depth not in (18, 34, 50, 101, 152):
            raise ValueError(f"depth must be one of 18, 34, 50, 101, 152, got {self.depth}")
        if not self.init:
            raise ValueError("init must be 'random' or a path to a weights file")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ValueError(f"num_classes must be 0 (from the dataset) or >= 2, got {self.num_classes}")
        if (
            self.fpn_channels < 0
            or self.box_roi_size < 0
            or any(d < 1 for d in [*self.box_conv_dims, *self.box_fc_dims])
        ):
            raise ValueError("fpn_channels, box_roi_size and the box head dims must be positive (or 0/empty for auto)")
        if self.precise_bn_images < 0:
            raise ValueError(f"precise_bn_images must be >= 0, got {self.precise_bn_images}")
        for name in ("roi_batch_size", "rpn_batch_size", "detections_per_img"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SolverConfig:
    """SGD with momentum, linear warmup and step decay, all as functions of the iteration.

    ``batch_size`` is the total over all processes; ``base_lr`` is the LR at ``lr_reference_batch``
    images, scaled linearly to ``batch_size`` (``lr_scaling=linear``: 0.02 at 16 is 0.005 at 4).
    With ``schedule`` = ``1x``/``2x``/``3x``, ``iterations``, ``steps`` and ``warmup_iters`` are
    derived from the training-set size (:func:`resolve_schedule`); with ``none`` they are used as given.
    """

    schedule: str = "none"
    iterations: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    base_lr: float = 0.02  # at lr_reference_batch images per iteration
    batch_size: int = 16
    # linear: the LR is base_lr * batch_size / lr_reference_batch (the paper's 0.02 at batch 16);
    # none: base_lr whatever the batch.
    lr_scaling: Literal["linear", "none"] = "linear"
    lr_reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 2.5e-5
    # Norm (BN) weights and biases get this decay instead (detectron2's WEIGHT_DECAY_NORM = 0).
    weight_decay_norm: float = 0.0
    # Clip the global gradient norm (0 = off); keeps tiny-batch CPU runs from diverging.
    clip_grad_norm: float = 0.0

    def validate(self) -> None:
        if self.schedule != "none" and self.schedule not in SCHEDULE_MULTIPLIERS:
            raise ValueError(f"schedule must be 'none' or one of {sorted(SCHEDULE_MULTIPLIERS)}, got {self.schedule!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if list(self.steps) != sorted(self.steps) or any(s < 1 for s in self.steps):
            raise ValueError(f"steps must be increasing positive iterations, got {self.steps}")
        if self.schedule == "none" and any(s > self.iterations for s in self.steps):
            raise ValueError(f"steps {self.steps} go beyond iterations={self.iterations}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1, got {self.lr_reference_batch}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must be in (0, 1], got {self.warmup_factor}")
        if self.warmup_iters < 0 or self.weight_decay < 0 or self.weight_decay_norm < 0:
            raise ValueError("warmup_iters, weight_decay and weight_decay_norm must be >= 0")


@dataclass
class InputConfig:
    """Image sizes (pixels of the shorter / longer side) and normalisation (RGB, values in [0, 1])."""

    min_size_train: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    hflip_prob: float = 0.5
    # SoCo's detectron2 configs: RGB, PIXEL_MEAN/STD = ImageNet statistics (docs/method.md 7.1).
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def validate(self) -> None:
        if not self.min_size_train or any(s < 1 for s in self.min_size_train):
            raise ValueError(f"min_size_train must be a non-empty list of positive sizes, got {self.min_size_train}")
        if self.min_size_test < 1 or self.max_size_train < 1 or self.max_size_test < 1:
            raise ValueError("image sizes must be positive")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ValueError("pixel_mean and pixel_std need 3 values (RGB)")


@dataclass
class FinetuneConfig:
    """The whole fine-tuning run. ``eval_period``/``checkpoint_period`` are in iterations (0 = only at the end)."""

    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    input: InputConfig = field(default_factory=InputConfig)
    # Where the records go besides metrics.jsonl: TensorBoard by default, W&B, MLflow (as pretraining's logging)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Autocast as in pretraining (train.loop.amp): auto = bf16 on CUDA where supported, full precision on
    # CPU; fp16 runs with a GradScaler, as torchvision's detection reference.
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    eval_period: int = 0
    checkpoint_period: int = 5000
    # Checkpoints to keep besides last.pt (oldest removed first; 0 = keep all).
    keep_checkpoints: int = 3
    log_period: int = 20
    seed: int = 0
    # auto: CUDA if available (the local rank's GPU under torchrun), else CPU.
    device: str = "auto"
    # torch intra-op CPU threads (null: torch's default, one per core), as pretraining's
    # train.loop.cpu_threads; on a machine shared with other jobs use 1 (extra threads spin-wait there).
    cpu_threads: Optional[int] = None

    @staticmethod
    def upgrade_values(data: dict[str, Any]) -> dict[str, Any]:
        """Config files written before ``amp`` became pretraining's choice (``amp: true`` +
        ``amp_dtype: float16|bfloat16``, e.g. the ``config.yaml`` of a run to resume) still load."""
        if "amp_dtype" not in data and not isinstance(data.get("amp"), bool):
            return data
        dtype = data.pop("amp_dtype", "float16")
        if isinstance(data.get("amp"), bool):
            data["amp"] = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype) if data["amp"] else "none"
            log.warning("config: amp/amp_dtype of an older soco-det read as amp=%s", data["amp"])
        return data

    def validate(self) -> None:
        for name in ("eval_period", "checkpoint_period", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_period < 1:
            raise ValueError(f"log_period must be >= 1, got {self.log_period}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or null), got {self.cpu_threads}")

    def check_data(self) -> None:
        """Raise ``ValueError`` naming the first data path that was not given (called before training)."""
        for name in ("train_json", "train_images", "val_json", "val_images"):
            if not getattr(self.data, name):
                raise ValueError(f"data.{name} is not set")


def resolve_schedule(solver: SolverConfig, num_train_images: int) -> SolverConfig:
    """The solver with a ``1x``/``2x``/``3x`` preset turned into explicit iterations.

    COCO 1x is 90k iterations of 16 images over 117k images (12.2 epochs), LR steps at 2/3 and 8/9,
    1k warmup iterations. The same number of epochs at ``solver.batch_size`` over
    ``num_train_images`` gives ``iterations``; steps keep their fractions and warmup is capped at a
    tenth of the run. ``schedule == "none"`` returns the solver unchanged.
    """
    if solver.schedule == "none":
        return solver
    mult = SCHEDULE_MULTIPLIERS[solver.schedule]
    epochs = mult * COCO_1X_ITERATIONS * COCO_1X_BATCH / COCO_TRAIN_IMAGES
    iterations = max(1, round(epochs * num_train_images / solver.batch_size))
    # 2x/3x in detectron2 keep the last two decays at the same distance from the end, scaled.
    steps = [max(1, round(iterations * f)) for f in (2 / 3, 8 / 9)]
    warmup = min(COCO_WARMUP_ITERS, iterations // 10)
    return replace(solver, iterations=iterations, steps=steps, warmup_iters=warmup)
