"""The object-probe report of several networks on one labeled COCO set (``soco-det probe``, ``api.probe``).

:func:`object_probe_report` probes each source (a run folder, a checkpoint, an official checkpoint
or ``untrained``) with :func:`~soco_det.probe.probe.run_probe` on the same objects and returns one
JSON-ready dict: the bootstrap summary of each source and the paired difference of each source
against the first. :func:`resolve_probe_config` picks the pretraining config that gives the
architecture, the view size and the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)


def resolve_probe_config(config: str | Path | None, sources: Sequence[str]) -> Any:
    """The :class:`~soco_det.engine.config.PretrainConfig` of the probe: ``config`` (a run's
    ``config.yaml`` or a recipe), else the first source's run config."""
    from soco_det.config import build_config, load_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.probe.network import UNTRAINED, read_run_config

    if config is not None:
        path = Path(config)
        if path.is_file() and path.suffix in (".yaml", ".yml") and path.name == "config.yaml":
            return load_config(PretrainConfig, path)
        return build_config(PretrainConfig, config)
    for src in sources:
        if src != UNTRAINED:
            return read_run_config(src)
    raise UserError("'untrained' alone needs --config (a recipe name or a run's config.yaml)")


def object_probe_report(
    sources: Sequence[str],
    cfg: Any,
    *,
    train_json: str | Path,
    val_json: str | Path,
    images: str | Path,
    seed: int | None = None,
    size: int | None = None,
    max_images: int | None = None,
    tasks: Sequence[str] | None = None,
    device: str = "auto",
    resamples: int = 1000,
) -> dict[str, Any]:
    """Probe every source on the objects of ``train_json`` (fit) and ``val_json`` (score).

    Returns ``{"sources", "seed", "view_size", "n_train_objects", "n_val_objects", "background_boxes",
    "seconds", "results": {source: summary}, "paired": {"B - A": difference}}`` (summaries as
    :func:`~soco_det.probe.probe.summarise`, differences as :func:`~soco_det.probe.probe.paired_difference`:
    each later source minus the first). With one category, as many background boxes as objects, drawn
    away from them (:func:`~soco_det.probe.objects.with_background_boxes`), become the second class
    (``background_boxes``: how many in each set, else ``None``; the object counts include them) and
    ``*_balanced`` / ``linear_auc`` score that object-vs-background task.
    """
    import torch

    from soco_det.probe.network import load_probe_network
    from soco_det.probe.objects import read_objects, spec_from_config, with_background_boxes
    from soco_det.probe.probe import TASKS, paired_difference, run_probe, summarise
    from soco_det.torch_io import resolve_device

    if not sources:
        raise UserError("the object probe needs at least one source (a run, a checkpoint or 'untrained')")
    seed = cfg.seed if seed is None else seed
    spec = spec_from_config(cfg, size)
    dev = torch.device(resolve_device(device, "--device"))
    train = read_objects(train_json, images, max_images)
    val = read_objects(val_json, images, max_images, categories=train.categories)
    background = None
    if len(train.categories) == 1:
        n_train, n_val = len(train), len(val)
        train, val = with_background_boxes(train, seed), with_background_boxes(val, seed + 1)
        background = {"train": len(train) - n_train, "val": len(val) - n_val}
        log.info(
            "one category: the classifiers tell objects from background boxes drawn away from them "
            "(%d train / %d val, one per object where it fits)",
            background["train"],
            background["val"],
        )
    task_names = tuple(tasks or TASKS)
    log.info(
        "probe: %d train / %d val objects, %d classes, views %d px, tasks %s",
        len(train),
        len(val),
        len(set(train.labels.tolist())),
        spec.size,
        " ".join(task_names),
    )
    results, summaries = [], {}
    for src in sources:
        net = load_probe_network(src, cfg.model, seed)
        result = run_probe(net, train, val, spec, dev, seed=seed, task_names=task_names, copy_network=False)
        results.append(result)
        summaries[src] = summarise(result, resamples)
        loaded = ", ".join(f"{k} <- {v}" for k, v in result.loaded.items())
        log.info("%s: probed in %.1f s (parts: %s)", src, result.seconds, loaded)
    return {
        "sources": list(sources),
        "seed": seed,
        "view_size": spec.size,
        "n_train_objects": len(train),
        "n_val_objects": len(val),
        "background_boxes": background,
        "seconds": {r.name: r.seconds for r in results},
        "results": summaries,
        "paired": {f"{b.name} - {results[0].name}": paired_difference(b, results[0], resamples) for b in results[1:]},
    }
