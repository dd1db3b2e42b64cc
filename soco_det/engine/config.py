"""Configuration of SoCo pretraining: the optimisation schedule and the training loop.

``PretrainConfig`` composes the three stage configs (data, model, train) and the run's seed; a
recipe YAML (``soco_det/recipes/*.yaml``) fills it and ``key=value`` overrides adjust it
(``train.loop.epochs=10 data.batch_size=32``). Defaults follow docs/method.md 5 (official values).

Batch and learning rate: ``data.batch_size`` is the batch *per process* (per GPU); the effective
batch is ``batch_size * world_size * train.loop.accum_steps`` and the peak learning rate is
``train.optim.base_lr * effective_batch / 256`` (the paper: 128 x 16 GPUs = 2048, so lr = 8.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Sequence

from soco_det.config import moved_keys
from soco_det.data.config import DataConfig
from soco_det.models.config import ModelConfig


@dataclass
class OptimConfig:
    """``train.optim``: LARS, the learning-rate and target-momentum schedules, the budget rule."""

    base_lr: float = 1.0  # scaled by effective_batch / lr_batch_denominator
    lr_batch_denominator: int = 256
    lr_scaling: Literal["linear", "sqrt"] = "linear"  # linear: the paper's rule
    # paper: lars_eta as given. auto: eta raised so that peak_lr * eta >= target_update (a conv weight's
    # relative step per optimizer step); see docs/budget.md and docs/results.md.
    budget: Literal["paper", "auto"] = "paper"
    target_update: float = 1.25e-3
    warmup_epochs: float = 10.0  # linear warmup from lr/warmup_multiplier, per iteration
    warmup_multiplier: float = 100.0
    min_lr: float = 1e-6  # cosine floor
    weight_decay: float = 1e-5  # conv/linear weights only (LARS group); 1-D params get none
    sgd_momentum: float = 0.9
    lars_eta: float = 0.001  # LARS trust coefficient
    lars_eps: float = 1e-8
    target_momentum: float = 0.99  # tau0 of the BYOL target EMA, rises to 1 by a cosine

    def validate(self) -> None:
        if self.lr_batch_denominator < 1:
            raise ValueError(f"lr_batch_denominator: must be >= 1, got {self.lr_batch_denominator}")
        if not self.target_update > 0:
            raise ValueError(f"target_update: must be > 0, got {self.target_update}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr: must be > 0, got {self.base_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.warmup_multiplier < 1:
            raise ValueError(f"warmup_multiplier: must be >= 1, got {self.warmup_multiplier}")
        if self.min_lr < 0 or self.weight_decay < 0 or self.lars_eta <= 0 or self.lars_eps <= 0:
            raise ValueError("min_lr and weight_decay must be >= 0; lars_eta and lars_eps > 0")
        if not (0 <= self.sgd_momentum < 1):
            raise ValueError(f"sgd_momentum: must lie in [0, 1), got {self.sgd_momentum}")
        if not (0 <= self.target_momentum <= 1):
            raise ValueError(f"target_momentum: must lie in [0, 1], got {self.target_momentum}")


@dataclass
class LoopConfig:
    """``train.loop``: how long the run is, where and how it computes, how often it records and saves."""

    epochs: int = 100
    max_steps: Optional[int] = None  # stop early after this global step (smoke runs); schedules unchanged
    accum_steps: int = 1  # gradient accumulation (micro-batches per optimizer step)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on CUDA, none on CPU
    compile: bool = False  # torch.compile the forward pass
    cpu_threads: Optional[int] = None  # torch intra-op threads (null: torch's default); see tiny_cpu
    freeze_bn: bool = False  # BN layers in eval mode (running stats, frozen); see engine/distributed.py
    find_unused_parameters: Optional[bool] = None  # DDP; null: only for model.roi_mode=assigned_level
    log_every: int = 10  # steps between metric lines (JSONL, the logging back-ends, log)
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end of the run, or when stopped)
    ckpt_epoch_end: bool = False  # also save at every epoch end (a small folder has many short epochs)
    keep_last: int = 3  # step checkpoints kept (last.pt is always kept)
    tensorboard: bool = True  # false: no TensorBoard whatever logging.backends says (older switch)
    progress: bool = True

    def validate(self) -> None:
        for name in ("epochs", "accum_steps", "log_every", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1 (or null), got {self.max_steps}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads: must be >= 1 (or null), got {self.cpu_threads}")


TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LoggingConfig:
    """``logging``: where a run's records go besides ``metrics.jsonl`` (pretraining and fine-tuning
    alike; soco_det/engine/tracking.py). ``backends`` from ``tensorboard`` (``RUN/tensorboard``),
    ``wandb`` (``RUN/wandb``; ``pip install wandb``) and ``mlflow`` (``pip install mlflow-skinny``).
    W&B and MLflow read their usual environment (``WANDB_API_KEY``, ``WANDB_MODE``,
    ``MLFLOW_TRACKING_URI``, ...); the keys below set the rest."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "soco-det"  # W&B project, MLflow experiment
    run_name: Optional[str] = None  # null: the run folder's name
    wandb_mode: Optional[Literal["online", "offline"]] = None  # null: W&B's own (WANDB_MODE, else online)
    # null: MLFLOW_TRACKING_URI when set, else a file store in RUN/mlruns (works offline)
    mlflow_uri: Optional[str] = None

    def validate(self) -> None:
        unknown = [b for b in self.backends if b not in TRACKING_BACKENDS]
        if unknown:
            raise ValueError(f"backends: {unknown[0]!r} is not one of {', '.join(TRACKING_BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends: each at most once, got {self.backends}")
        if not self.project:
            raise ValueError("project: must not be empty")


PROBE_TASKS = ("linear", "knn", "loc", "retrieval", "rank")


@dataclass
class ProbeConfig:
    """``train.probe``: the online object probe (soco_det/probe/online.py): every ``every`` steps (0: off;
    a multiple of ``train.loop.log_every``), linear/k-NN/rank read-outs of the frozen online features
    on a small labeled COCO set."""

    every: int = 0
    train_json: Optional[str] = None
    val_json: Optional[str] = None
    images: Optional[str] = None
    max_images: Optional[int] = 100
    tasks: list[str] = field(default_factory=lambda: ["linear", "knn", "rank"])

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"every: must be >= 0 (0: off), got {self.every}")
        if not self.every:
            return
        missing = [k for k in ("train_json", "val_json", "images") if not getattr(self, k)]
        if missing:
            raise ValueError(f"every={self.every} needs {', '.join(missing)}")
        unknown = sorted(set(self.tasks) - set(PROBE_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks: choose from {' '.join(PROBE_TASKS)}, got {self.tasks}")


def _moved_to(section: str, names: Sequence[str], prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{name}": f"{section}.{name}" for name in names}


# The flat keys of soco-det before the sections (train.max_steps is now train.loop.max_steps, ...).
TRAIN_MOVED_KEYS = {
    **_moved_to("optim", [f.name for f in fields(OptimConfig)]),
    **_moved_to("loop", [f.name for f in fields(LoopConfig)]),
    **_moved_to("probe", [f.name for f in fields(ProbeConfig)], prefix="probe_"),
}


@moved_keys(TRAIN_MOVED_KEYS)
@dataclass
class TrainConfig:
    """How a run trains, in three sections: ``optim`` (LARS and the schedules), ``loop`` (length,
    device and precision, records and checkpoints; one optimizer step = ``loop.accum_steps``
    micro-batches) and ``probe`` (the online object probe). The flat keys of older versions
    (``train.max_steps``, ``train.probe_every``, ...) are still read (soco_det/config.py)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        for name in ("optim", "loop", "probe"):
            try:
                getattr(self, name).validate()
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None
        if not self.optim.warmup_epochs < self.loop.epochs:
            raise ValueError(
                f"optim.warmup_epochs: must lie in [0, loop.epochs={self.loop.epochs}), got {self.optim.warmup_epochs}"
            )
        if self.probe.every % self.loop.log_every:
            raise ValueError(
                f"probe.every: must be a multiple of loop.log_every={self.loop.log_every}, got {self.probe.every}"
            )


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; written to ``RUN/config.yaml`` and into checkpoints."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def validate(self) -> None:
        for part in (self.data, self.model, self.train, self.logging):
            validate = getattr(part, "validate", None)
            if callable(validate):
                validate()
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        # The views' box values and the model's RoI scaling are one convention: a mix misplaces boxes.
        if self.data.views.legacy != self.model.legacy:
            raise ValueError(
                f"data.views.legacy={str(self.data.views.legacy).lower()} and model.legacy="
                f"{str(self.model.legacy).lower()} must agree: set both to true for the official box "
                "conventions (inclusive ends, RoIs scaled by feature-map size) or both to false"
            )
