"""Configuration of the pretraining model (``model.*`` keys of a pretraining recipe).

Defaults are the official SoCo_FPN network (docs/method.md 3): ResNet-50, FPN P2-P5 with 256 channels,
a 4conv1fc box head (256 -> 1024), BYOL MLPs 1024 -> 4096 -> 256, 7x7 RoIAlign, every box pooled
on every level. Tests shrink the widths (``proj_hidden_dim=64`` ...) to run on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

VARIANTS = ("soco_fpn", "soco_star", "soco_c4", "image_byol", "detcon")
FPN_VARIANTS = ("soco_fpn", "soco_star")
DEPTHS = (18, 34, 50, 101)


@dataclass
class ModelConfig:
    """The network and how boxes are pooled.

    * ``variant``: ``soco_fpn`` / ``soco_star`` (ResNet + FPN + box head; SoCo* only differs in
      its views, i.e. the number of pairs in the batch), ``soco_c4`` (RoIAlign on C4, res5 as the
      RoI head), ``image_byol`` (image-level BYOL baseline on pooled C5) or ``detcon`` (DetCon
      baseline: NT-Xent over box masks pooled on C5, :mod:`soco_det.models.detcon`).
    * ``temperature``: NT-Xent temperature of ``detcon`` (DetCon's 0.1); unused by the others.
    * ``roi_output_size``: RoIAlign output side; ``None`` means the official value for the
      variant (7 for FPN variants, 14 for C4, where res5 halves it to 7).
    * ``roi_mode``: ``all_levels`` pools every box on every FPN level and runs the head once per
      (view, pair, level), which is what the released models used (docs/method.md 9.8);
      ``assigned_level`` pools each box only on its assigned level, one head call per
      (view, pair): about P times cheaper, with different BatchNorm statistics.
    * ``legacy``: scale normalised boxes by the feature-map size (official, docs/method.md 9.6) instead
      of ``view size / stride``; the two agree when the view side is a multiple of 32.
    * ``sync_bn``: the engine synchronises BatchNorm across processes when training distributed
      (:func:`soco_det.models.convert_sync_bn`; gloo or NCCL, per call and per segment as the
      official SyncBatchNorm); the official runs did.
    * ``channels_last``: NHWC memory format for the convolutional parts (faster on tensor cores).
    * ``batched_calls``: run the per-(pair, view, level) head/projector/predictor calls of
      ``all_levels`` as one call, and the backbone/FPN once for consecutive views of one size, with
      segment-wise BatchNorm (each original call keeps its own statistics; equal to separate calls
      up to float rounding, :mod:`soco_det.models.segment_bn`). ``false``: one call each, as the
      official code (slower; for tests and benchmarks).
    * ``batched_backbone``: with ``batched_calls``, also batch the backbone/FPN over views of one
      size (V1 + V2). Segment-wise BN costs two extra copies per BN layer there, which can outweigh
      the gain of one larger call at a large per-GPU batch: ``false`` batches the RoI calls only.
    * ``init``: a local weights file (or soco-det run folder) to start the online network from:
      a torchvision/timm ResNet, a torchvision Mask R-CNN v2, a detectron2 or mmdetection
      checkpoint, one of our exports, a soco-det or official SoCo checkpoint. What matches is
      loaded, the target starts as a copy (:mod:`soco_det.export.init_weights`); ignored on resume.
    """

    variant: Literal["soco_fpn", "soco_star", "soco_c4", "image_byol", "detcon"] = "soco_fpn"
    depth: int = 50
    fpn_channels: int = 256
    head_conv_dim: int = 256
    head_fc_dim: int = 1024
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    roi_output_size: Optional[int] = None
    roi_mode: Literal["all_levels", "assigned_level"] = "all_levels"
    legacy: bool = False
    num_levels: int = 4
    zero_init_residual: bool = True
    sync_bn: bool = False
    channels_last: bool = False
    batched_calls: bool = True
    batched_backbone: bool = True
    # Not in the paper (docs/differences.md): weight of a penalty on correlated channels of the
    # online box-head output (soco_det.losses.decorrelation_loss), which keeps small-budget runs from
    # collapsing onto a few directions. 0 = off (the paper recipes).
    head_decorrelation: float = 0.0
    temperature: float = 0.1
    init: Optional[str] = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value the model cannot be built with."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.depth not in DEPTHS:
            raise ValueError(f"depth: must be one of {list(DEPTHS)}, got {self.depth}")
        widths = {
            "fpn_channels": self.fpn_channels,
            "head_conv_dim": self.head_conv_dim,
            "head_fc_dim": self.head_fc_dim,
            "proj_hidden_dim": self.proj_hidden_dim,
            "proj_dim": self.proj_dim,
        }
        for name, value in widths.items():
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.head_decorrelation < 0:
            raise ValueError(f"head_decorrelation: must be >= 0, got {self.head_decorrelation}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.roi_output_size is not None and self.roi_output_size < 1:
            raise ValueError(f"roi_output_size: must be >= 1 (or null), got {self.roi_output_size}")
        if self.variant == "soco_c4" and self.resolved_roi_output_size() % 2:
            raise ValueError(
                f"roi_output_size: soco_c4 runs res5 (stride 2) on the RoIs and needs an even size, "
                f"got {self.roi_output_size}"
            )
        if self.roi_mode not in ("all_levels", "assigned_level"):
            raise ValueError(f"roi_mode: must be all_levels or assigned_level, got {self.roi_mode!r}")
        if self.init is not None and "://" in str(self.init):
            raise ValueError(f"init: must be a local file or run folder (nothing is downloaded), got {self.init!r}")
        # The FPN is built on C2..C5, so it has exactly four outputs (P2..P5, no P6: docs/method.md 3.2).
        if self.variant in FPN_VARIANTS and self.num_levels != 4:
            raise ValueError(f"num_levels: the FPN outputs P2..P5, so it must be 4, got {self.num_levels}")

    def resolved_roi_output_size(self) -> int:
        """RoIAlign output side: the configured one, else 14 for C4 and 7 otherwise."""
        if self.roi_output_size is not None:
            return self.roi_output_size
        return 14 if self.variant == "soco_c4" else 7

    def model_levels(self) -> int:
        """P as the model sees it: the FPN levels, 1 for C4 and the two baselines."""
        return self.num_levels if self.variant in FPN_VARIANTS else 1
