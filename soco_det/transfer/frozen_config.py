"""Settings of the frozen-backbone detection probe (:mod:`soco_det.transfer.frozen`), torch-free so
that ``soco-det probe --help`` can show their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from soco_det.errors import UserError

HEADS = ("own", "shared")


@dataclass
class FrozenSettings:
    """Settings of the frozen detection probe (see the module docstring)."""

    size: int = 128  # side of the square every image is resized to, pixels
    flip: bool = True  # also cache the mirrored train images (a flip is drawn per sample)
    iterations: int = 300
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    decay_at: float = 0.8  # lr x 0.1 after this fraction of the iterations
    head: str = "own"  # own | shared: the box head each init starts from
    roi_batch_size: int = 128  # sampled RoIs per image
    rpn_batch_size: int = 256
    rpn_pre_nms_top_n: tuple[int, int] = (1000, 500)  # (train, test)
    rpn_post_nms_top_n: tuple[int, int] = (500, 300)
    detections_per_img: int = 100
    score_thresh: float = 0.001  # keep low-scored boxes for COCO AP (heads trained briefly score low)
    optimizer: str = "sgd"  # sgd | adamw (lr is then AdamW's)
    # one anchor size per level P2..P6: torchvision's (32, ..., 512) are made for 800-px images; at
    # 128 px they miss the small objects, so the default halves them (the RPN head's shape is unchanged)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    cache_batch: int = 16  # images per backbone forward while caching
    # re-estimate the frozen backbone's BatchNorm statistics on the train images before caching
    # (as PreciseBN does after fine-tuning); the same for every init, weights untouched
    precise_bn: bool = True

    def validate(self) -> None:
        if self.head not in HEADS:
            raise UserError(f"frozen probe head: must be one of {', '.join(HEADS)}, got {self.head!r}")
        for name in ("size", "iterations", "batch_size", "roi_batch_size", "cache_batch"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"frozen probe {name}: must be >= 1, got {getattr(self, name)}")
        if self.size < 32:
            raise UserError(f"frozen probe size: must be >= 32 pixels, got {self.size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"frozen probe optimizer: sgd or adamw, got {self.optimizer!r}")
        if len(self.anchor_sizes) != 5:
            raise UserError(f"frozen probe anchor_sizes: one per level P2..P6 (5), got {list(self.anchor_sizes)}")
        if not self.lr > 0 or not 0 < self.decay_at <= 1:
            raise UserError(f"frozen probe: lr must be > 0 and decay_at in (0, 1], got {self.lr}, {self.decay_at}")
