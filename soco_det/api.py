"""The Python API: the pipeline's verbs with the command line's arguments, each returning a small result.

``soco-det COMMAND --flag VALUE`` is ``api.COMMAND(flag=VALUE)``: the same verbs and the same
arguments (a flag ``--train-json`` is the keyword ``train_json``, ``-o/--out`` is ``out``), and the
commands of ``soco_det/commands/`` are thin layers over these functions. Each returns a frozen
dataclass of paths and metrics; errors are :class:`soco_det.errors.UserError` with the one-line
message the CLI would print::

    from soco_det import api

    scenes = api.synth("data", unlabeled=16, train=8, val=8, size=96)
    store = api.proposals(scenes.images / "unlabeled", "runs/props")
    run = api.pretrain(scenes.images / "unlabeled", store.path, "runs/soco", recipe="tiny_cpu",
                       overrides={"train.loop.epochs": 1})
    tv = api.export(run.path, to="torchvision", out="soco_tv.pth")
    ft = api.finetune("runs/ft", init=tv.path, train_json=scenes.train, train_images=scenes.images,
                      val_json=scenes.val, val_images=scenes.images, recipe="finetune_tiny_cpu")
    print(ft.metrics["bbox"]["AP"], api.evaluate(ft.path, json=scenes.val, images=scenes.images).metrics)

``overrides`` take a mapping of dotted keys (``{"train.loop.epochs": 1, "data.batch_size": 8}``) or the
CLI's ``key=value`` strings. Paths in a run's resolved config (images, proposals, COCO files,
``model.init``) are stored absolute, so a run folder means the same thing from any working folder.

Importing this module loads no torch: every function imports its stage when called.
"""

from __future__ import annotations

import json as _json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from soco_det.logs import get_logger

log = get_logger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Overrides = Union[Mapping[str, Any], Iterable[str], None]

__all__ = [
    "EvaluateResult",
    "ExportResult",
    "FinetuneResult",
    "PretrainResult",
    "ProbeResult",
    "ProposalsResult",
    "detection_probe",
    "ScenesResult",
    "DatasetResult",
    "evaluate",
    "export",
    "finetune",
    "pretrain",
    "probe",
    "prepare",
    "proposals",
    "synth",
]


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ScenesResult:
    """``soco-det synth``: ``path`` the output folder, ``images`` the root the COCO files'
    ``file_name`` values are relative to, and the COCO file of each split."""

    path: Path
    images: Path
    unlabeled: Path
    train: Path
    val: Path


@dataclass(frozen=True)
class DatasetResult:
    """``soco-det prepare``: the data set's name, the output folder, the images root, the COCO file of
    each split and :func:`soco_det.datasets.summary.summarise`'s numbers per split."""

    name: str
    path: Path
    images: Path
    unlabeled: Path
    train: Path
    val: Path
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProposalsResult:
    """``soco-det proposals``: the store folder and its ``summary.json`` (images, failures, boxes)."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainResult:
    """``soco-det pretrain``: the run folder, its newest checkpoint, its resolved config and the
    last training record of ``metrics.jsonl`` (``step``, ``loss``, ``lr``, ...)."""

    path: Path
    checkpoint: Path
    config: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportResult:
    """``soco-det export``: the written file, the check's one-line result and, for detectron2 and
    mmdet, the ready fine-tuning config written next to it with the keys it sets (``settings``)."""

    path: Path
    target: str
    check: str
    config: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneResult:
    """``soco-det finetune``: the run folder, its newest checkpoint and the final evaluation
    (``{"bbox": {"AP": ...}, "segm": {...}, "num_images": n}``, fractions)."""

    path: Path
    checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateResult:
    """``soco-det evaluate``: the output folder (``None`` when not written) and the COCO metrics."""

    path: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeResult:
    """``soco-det probe``: the JSON written (``None`` when not written) and the report it holds
    (per source and feature kind: mean and 95 % interval of each read-out; paired differences)."""

    path: Path | None
    report: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def override_strings(overrides: Overrides) -> list[str]:
    """``key=value`` strings of ``overrides`` (a mapping of dotted keys, or such strings already).

    Mapping values are written as JSON, which the config reads back as YAML: ``{"a.b": [1, 2]}``
    gives ``a.b=[1, 2]``, a string stays a string, a path becomes its string."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [
            f"{key}={_json.dumps(os.fspath(v) if isinstance(v, os.PathLike) else v)}" for key, v in overrides.items()
        ]
    return [str(item) for item in overrides]


def absolute(path: PathLike | Sequence[PathLike] | None) -> str | list[str] | None:
    """``path`` (or each of several) made absolute against the working folder (``~`` expanded);
    ``None`` stays ``None``."""
    if path is None:
        return None
    if isinstance(path, (list, tuple)):
        return [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in path]
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


UNTRAINED_PREFIX = "untrained:"  # model.init of fine-tuning: untrained:RUN (soco_det.transfer.untrained_init)


def _absolute_init(init: str | None) -> str | None:
    """``model.init`` made absolute, unless it is one of the words that name no file; the run of
    ``untrained:RUN`` is made absolute."""
    if init is None or init in ("random", "untrained"):
        return init
    if init.startswith(UNTRAINED_PREFIX):
        run = init[len(UNTRAINED_PREFIX) :]
        return UNTRAINED_PREFIX + absolute(run) if run else init
    return absolute(init)


# ----------------------------------------------------------------------------- verbs
def synth(
    out: PathLike,
    *,
    unlabeled: int = 200,
    train: int = 50,
    val: int = 50,
    size: int = 256,
    seed: int = 0,
    workers: int = 1,
) -> ScenesResult:
    """Generate the seeded sample scenes (``soco-det synth``): ``out/images/<split>/NNNNNN.jpg`` and
    ``out/<split>.json`` (COCO, with instance masks); the same seed gives the same bytes."""
    from soco_det.synth import generate

    paths = generate(out, n_unlabeled=unlabeled, n_train=train, n_val=val, short_side=size, seed=seed, workers=workers)
    return ScenesResult(
        path=Path(out),
        images=Path(paths["images"]),
        unlabeled=Path(paths["unlabeled"]),
        train=Path(paths["train"]),
        val=Path(paths["val"]),
    )


def prepare(name: str, out: PathLike, **options: Any) -> DatasetResult:
    """Write a ready-made data set (``soco-det prepare``): ``scenes`` (the sample scenes at the CPU
    benchmark's sizes) or ``nuclei`` (tiles of the fluorescence image of nuclei that PyPI's stardist
    ships), as ``out/images/<split>/`` and ``out/<split>.json``; ``options`` are the set's own
    (:func:`soco_det.datasets.options_of`), e.g. ``tile=128`` for nuclei."""
    from soco_det import datasets
    from soco_det.datasets.summary import summarise

    paths = datasets.prepare(name, out, **options)
    return DatasetResult(
        name=name,
        path=Path(out),
        images=paths["images"],
        unlabeled=paths["unlabeled"],
        train=paths["train"],
        val=paths["val"],
        summary=summarise(paths),
    )


def proposals(
    images: PathLike,
    out: PathLike,
    *,
    method: str = "selective_search",
    workers: int | str = "auto",
    max_side: int | None = None,
    shard: str | None = None,
    filter: str | None = None,
    keep_raw: bool = False,
    params: Mapping[str, Any] | None = None,
    exif_transpose: bool = False,
    max_pixels: int | None = None,
    chunk_size: int = 32,
    object_size: str = "paper",
) -> ProposalsResult:
    """Compute (or resume) the proposal store of every image under ``images`` (``soco-det proposals``).

    The options are ``soco-det proposals compute``'s; ``workers="auto"``: one per CPU core this
    process may use (:func:`soco_det.cpus.available_cpus`); ``max_pixels=None`` is the decoder's
    default limit (64 Mpx), 0 no limit. ``object_size``: ``"paper"`` (here the default: the paper's
    selective search and ``ratio3size0308post``, as the paper recipes want), ``"auto"`` (the CLI's
    default), ``"N"`` px, ``"N%"`` of the image side or ``"coco:FILE.json"``
    (:mod:`soco_det.proposals.fit`); ``filter=None``: the fitted filter. A finished store is left
    as it is."""
    from soco_det.cpus import parse_workers
    from soco_det.imageio import DEFAULT_MAX_PIXELS
    from soco_det.proposals.runner import compute_store

    path = compute_store(
        images,
        out,
        method=method,
        workers=parse_workers(workers, "--workers"),
        max_side=max_side,
        shard=shard,
        filter=filter,
        keep_raw=keep_raw,
        params=dict(params or {}),
        object_size=object_size,
        exif_transpose=exif_transpose,
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
        chunk_size=chunk_size,
    )
    summary_file = Path(path) / "summary.json"
    summary = _json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return ProposalsResult(path=Path(path), summary=summary)


def pretrain_config(
    images: PathLike | None,
    proposals: PathLike | None,
    *,
    recipe: PathLike = "tiny_cpu",
    overrides: Overrides = None,
    device: str | None = None,
) -> Any:
    """The :class:`~soco_det.engine.config.PretrainConfig` :func:`pretrain` trains with: the recipe,
    then ``images`` / ``proposals`` / ``device``, then ``overrides``; data paths and ``model.init``
    made absolute."""
    from dataclasses import replace

    from soco_det.config import build_config
    from soco_det.engine.config import PretrainConfig

    extra: dict[str, Any] = {}
    if images is not None:
        extra.setdefault("data", {})["images"] = absolute(images)
    if proposals is not None:
        extra.setdefault("data", {})["proposals"] = absolute(proposals)
    if device is not None:
        extra.setdefault("train", {}).setdefault("loop", {})["device"] = device
    cfg = build_config(PretrainConfig, os.fspath(recipe), override_strings(overrides), extra=extra)
    paths = {k: getattr(cfg.data, k) for k in ("images", "proposals", "list_file", "coco_json")}
    return replace(
        cfg,
        data=replace(cfg.data, **{k: absolute(v) for k, v in paths.items() if isinstance(v, str)}),
        model=replace(cfg.model, init=_absolute_init(cfg.model.init)),
    )


def describe_loss(cfg: Any) -> str:
    """One line saying what the pretraining loss is and where its minimum lies for ``cfg``'s views
    (docs/method.md 4): each pair (V1, Vv) gives two directional terms ``-2 cos``."""
    views = cfg.data.views.resolved().num_views
    terms = 2 * (views - 1)
    pairs = ", ".join(f"V1<->V{v}" for v in range(2, views + 1))
    extra = " + the head decorrelation penalty (>= 0)" if cfg.model.head_decorrelation else ""
    what = "images" if cfg.model.variant == "image_byol" else "matched boxes"
    return (
        f"loss = {terms} terms -2 cos(prediction, target) over {what} ({pairs}, each way){extra}; "
        f"a term is BYOL's 2 - 2 cos minus 2, in [-2, 2]: 0 = unrelated, {-2 * terms} = all {what} agree"
    )


def pretrain(
    images: PathLike | None,
    proposals: PathLike | None,
    out: PathLike,
    *,
    recipe: PathLike = "tiny_cpu",
    overrides: Overrides = None,
    resume: PathLike | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> PretrainResult:
    """SoCo pretraining into the run folder ``out`` (``soco-det pretrain``).

    ``images``: the images root (``None``: the proposal store's root, or the recipe's
    ``data.images``); ``proposals``: the store from :func:`proposals`; ``recipe``: a shipped name
    or a YAML file; ``resume``: ``"auto"`` (the folder's last checkpoint, if any) or a checkpoint /
    run folder; ``overwrite``: move an existing run aside to ``OUT.old-<time>``. With
    ``train.probe.every`` set, the online object probe adds its read-outs to the metrics. Raises
    :class:`~soco_det.engine.loop.NonFiniteLossError` when the loss diverges.
    """
    from soco_det.engine.trainer import pretrain as _pretrain

    cfg = pretrain_config(images, proposals, recipe=recipe, overrides=overrides, device=device)
    sources = []
    if cfg.train.probe.every and os.environ.get("RANK", "0") == "0":  # main process (torchrun sets RANK)
        from soco_det.probe.online import OnlineProbe

        sources.append(OnlineProbe(cfg))
    if os.environ.get("RANK", "0") == "0":
        log.info("%s", describe_loss(cfg))
    run = Path(_pretrain(cfg, out, resume=resume, overwrite=overwrite, metric_sources=sources))
    return PretrainResult(
        path=run,
        checkpoint=run / "checkpoints" / "last.pt",
        config=run / "config.yaml",
        metrics=_last_record(run, "loss"),
    )


def _last_record(run: Path, key: str) -> dict[str, Any]:
    from soco_det.engine.metrics import read_metrics

    records = [r for r in read_metrics(run) if key in r]
    return records[-1] if records else {}


def export(
    run: PathLike,
    *,
    to: str,
    out: PathLike | None = None,
    network: str = "online",
    check: bool = True,
) -> ExportResult:
    """Export a pretrained network for ``to`` in ``torchvision|detectron2|mmdet|timm`` (``soco-det export``).

    ``run``: a run folder (its newest intact checkpoint), a checkpoint or an official
    ``ckpt_epoch_*.pth``; ``out``: the file (default ``RUN/export/soco_<to>.<ext>``). For detectron2
    and mmdet a fine-tuning config with this network's widths is written next to the file."""
    from soco_det.export import export as _export

    result = _export(run, to, out, network=network, check=check)
    return ExportResult(
        path=Path(result.path),
        target=result.target,
        check=result.check,
        config=result.config,
        settings=dict(result.settings),
    )


def finetune_config(
    out: PathLike,
    *,
    init: PathLike | None = None,
    train_json: PathLike | None = None,
    train_images: PathLike | None = None,
    val_json: PathLike | None = None,
    val_images: PathLike | None = None,
    recipe: PathLike | None = None,
    overrides: Overrides = None,
    resume: bool = False,
    device: str | None = None,
    threads: int | None = None,
) -> Any:
    """The :class:`~soco_det.transfer.config.FinetuneConfig` :func:`finetune` trains with. ``recipe``
    ``None``: the run folder's ``config.yaml`` when resuming one, else ``finetune_1x``; ``threads``:
    its ``cpu_threads``."""
    from dataclasses import replace

    from soco_det.config import build_config
    from soco_det.transfer import FinetuneConfig

    if recipe is None:
        saved = Path(out) / "config.yaml"
        recipe = saved if resume and saved.is_file() else "finetune_1x"
    data = {"train_json": train_json, "train_images": train_images, "val_json": val_json, "val_images": val_images}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if value is not None:
            extra.setdefault("data", {})[key] = absolute(value)
    if init is not None:
        extra.setdefault("model", {})["init"] = os.fspath(init)
    if device is not None:
        extra["device"] = device
    if threads is not None:
        extra["cpu_threads"] = threads
    cfg = build_config(FinetuneConfig, os.fspath(recipe), override_strings(overrides), extra=extra)
    return replace(cfg, model=replace(cfg.model, init=_absolute_init(cfg.model.init)))


def finetune(
    out: PathLike,
    *,
    init: PathLike | None = None,
    train_json: PathLike | None = None,
    train_images: PathLike | None = None,
    val_json: PathLike | None = None,
    val_images: PathLike | None = None,
    recipe: PathLike | None = None,
    overrides: Overrides = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    threads: int | None = None,
) -> FinetuneResult:
    """Fine-tune a Mask R-CNN (a box-only Faster R-CNN when the training set has no masks) into ``out``
    (``soco-det finetune``).

    ``init``: ``"random"`` (torchvision's init), ``"untrained:RUN"`` (the network the pretraining run
    ``RUN``, a folder or its ``config.yaml``, started from: same init scheme and seed, the paired
    baseline), a ``soco-det export --to torchvision`` file, a pretraining run folder or checkpoint, an
    official SoCo checkpoint or a torchvision ResNet file (default: the recipe's); ``threads``: torch's
    CPU threads (``cpu_threads``; default: the recipe's, else torch's own: one per core; 1 on a shared
    machine);
    ``recipe``: ``finetune_1x``, ``finetune_tiny_cpu`` or a YAML file (default: ``finetune_1x``,
    or the run's ``config.yaml`` with ``resume``); ``resume``: continue ``out`` from its newest
    intact checkpoint. Raises :class:`~soco_det.engine.loop.NonFiniteLossError` when the loss diverges.
    """
    from soco_det.transfer import finetune as _finetune

    cfg = finetune_config(
        out,
        init=init,
        train_json=train_json,
        train_images=train_images,
        val_json=val_json,
        val_images=val_images,
        recipe=recipe,
        overrides=overrides,
        resume=resume,
        device=device,
        threads=threads,
    )
    run = Path(_finetune(cfg, out, resume="auto" if resume else None, overwrite=overwrite))
    metrics_file = run / "metrics.json"
    metrics = _json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return FinetuneResult(path=run, checkpoint=run / "checkpoints" / "last.pt", metrics=metrics)


def evaluate(
    checkpoint: PathLike,
    *,
    json: PathLike,
    images: PathLike,
    out: PathLike | None = None,
    device: str = "auto",
    batch_size: int = 1,
    max_images: int = 0,
) -> EvaluateResult:
    """COCO bbox (and segm) AP of a fine-tuned detector on a COCO-format set (``soco-det evaluate``).

    ``checkpoint``: a fine-tuning run folder or checkpoint; ``json`` / ``images``: the COCO file and
    the folder its ``file_name`` values are relative to; ``out``: write ``metrics.json`` and the
    COCO results there (default: nothing written)."""
    from soco_det.transfer import evaluate as _evaluate

    metrics = _evaluate(checkpoint, json, images, out, device=device, batch_size=batch_size, max_images=max_images)
    return EvaluateResult(path=Path(out) if out is not None else None, metrics=metrics)


def _probe_result(report: dict[str, Any], out: PathLike | None) -> ProbeResult:
    """A probe's report as its result, written as JSON to ``out`` (atomically) when given."""
    if out is not None:
        from soco_det.atomic import atomic_write_text

        atomic_write_text(Path(out), _json.dumps(report, indent=2))
        log.info("wrote %s", out)
    return ProbeResult(path=Path(out) if out is not None else None, report=report)


def probe(
    sources: PathLike | Sequence[PathLike],
    *,
    train_json: PathLike,
    val_json: PathLike,
    images: PathLike,
    out: PathLike | None = None,
    config: PathLike | None = None,
    seed: int | None = None,
    size: int | None = None,
    max_images: int | None = None,
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    resamples: int = 1000,
) -> ProbeResult:
    """The object-level probe of frozen features (``soco-det probe``): linear and k-NN classification,
    localisation, cross-view retrieval and effective rank with bootstrap 95 % intervals, and the
    paired difference of each source against the first.

    ``sources``: run folders, checkpoints, official checkpoints or ``"untrained"`` (the first run's
    architecture and seed, untrained); ``config``: the recipe or ``config.yaml`` giving the
    architecture (default: the first run folder's); ``out``: write the report as JSON there."""
    from soco_det.probe.report import object_probe_report, resolve_probe_config

    names = [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]
    cfg = resolve_probe_config(os.fspath(config) if config is not None else None, names)
    report = object_probe_report(
        names,
        cfg,
        train_json=train_json,
        val_json=val_json,
        images=images,
        seed=seed,
        size=size,
        max_images=max_images,
        tasks=tasks,
        device=device,
        resamples=resamples,
    )
    return _probe_result(report, out)


def detection_probe(
    sources: PathLike | Sequence[PathLike],
    *,
    train_json: PathLike,
    val_json: PathLike,
    images: PathLike,
    out: PathLike | None = None,
    config: PathLike | None = None,
    seed: int | None = None,
    ft_seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] = (1.0,),
    device: str = "auto",
    **settings: Any,
) -> ProbeResult:
    """The frozen-backbone detection probe (``soco-det probe --task detection``): per source, the
    RPN and box head of a Faster R-CNN trained on its frozen backbone + FPN features (cached once),
    box AP / AP50 on ``val_json`` with pycocotools, for every fine-tuning seed of ``ft_seeds`` and
    train fraction of ``fractions``, and each source's paired difference against the first.

    ``sources``: run folders, checkpoints, official checkpoints, torchvision exports or
    ``"untrained"`` (the architecture of ``config`` or of the first run, seed ``seed``);
    ``settings``: fields of :class:`soco_det.transfer.frozen.FrozenSettings` (``size``, ``iterations``,
    ``batch_size``, ``lr``, ``head`` ...). The report is :func:`~soco_det.transfer.frozen.frozen_detection_probe`'s."""
    import tempfile

    from soco_det.errors import UserError
    from soco_det.probe.report import resolve_probe_config
    from soco_det.transfer.frozen import FrozenSettings, frozen_detection_probe, load_inits

    names = [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]
    try:
        cfg = resolve_probe_config(os.fspath(config) if config is not None else None, names)
    except UserError:
        if config is not None or "untrained" in names:
            raise
        cfg = None  # exports only: nothing to complete a source with, nothing untrained to build
    with tempfile.TemporaryDirectory(prefix="soco-det-probe-") as tmp:
        report = frozen_detection_probe(
            load_inits(names, cfg, seed, tmp),
            train_json,
            val_json,
            images,
            FrozenSettings(**settings),
            seeds=list(ft_seeds),
            fractions=list(fractions),
            device=device,
        )
    return _probe_result(report, out)
