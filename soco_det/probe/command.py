"""Probe what frozen detector features know about objects, with 95 % intervals (``soco-det probe``).

For one or more networks of the same architecture — pretraining runs, checkpoints, official
checkpoints, or ``untrained`` (the run's own init, same seed: the honest random baseline) — pool
the ground-truth boxes of a labeled COCO set and report linear and k-NN classification, a
localisation probe, cross-view retrieval and the effective rank, each with a bootstrap interval,
plus paired differences against the first network::

    soco-det probe runs/soco untrained --train-json train.json --val-json val.json --images imgs/ -o probe.json

``--task classification`` is the official linear evaluation instead (:mod:`soco_det.probe.linear_eval`:
frozen backbone, linear classifier on pooled C5, ImageFolder layout)::

    soco-det probe runs/soco --task classification --train imagenet/train --val imagenet/val -o runs/linear
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="*",
        help="run folders, checkpoints, official checkpoints, or 'untrained' (the architecture's "
        "init with the config's seed); the first is compared with each other one",
    )
    parser.add_argument(
        "--task",
        choices=["objects", "classification"],
        default="objects",
        help="objects: the object-level probe on a COCO set; classification: the official linear "
        "evaluation on ImageFolders (--train/--val)",
    )
    parser.add_argument("--train-json", help="objects: COCO file whose objects fit the read-outs")
    parser.add_argument("--val-json", help="objects: COCO file whose objects score them")
    parser.add_argument("--images", help="objects: folder the COCO file_name entries are relative to")
    parser.add_argument(
        "--config",
        default=None,
        help="pretraining recipe or config.yaml giving the architecture, view size and seed "
        "(default: the first run folder's config.yaml)",
    )
    parser.add_argument("--seed", type=int, default=None, help="init seed of 'untrained' (default: the config's)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="probe images at this side in pixels (default: the config's whole-image view size; "
        "the level thresholds scale with it)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images per set")
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="subset of linear knn loc retrieval rank (default: all)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "-o", "--out", default=None, help="objects: write the results as JSON here; classification: output folder"
    )
    from soco_det.probe import linear_eval

    linear_eval.add_arguments(parser)  # the classification task's options (shared ones are not repeated)


def _config(args: argparse.Namespace):  # noqa: ANN202
    from soco_det.config import build_config, load_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.probe.network import UNTRAINED, read_run_config

    if args.config is not None:
        path = Path(args.config)
        return (
            load_config(PretrainConfig, path)
            if path.is_file() and path.suffix in (".yaml", ".yml") and path.name == "config.yaml"
            else build_config(PretrainConfig, args.config)
        )
    for src in args.sources:
        if src != UNTRAINED:
            return read_run_config(src)
    raise UserError("'untrained' alone needs --config (a recipe name or a run's config.yaml)")


def run(args: argparse.Namespace) -> int:
    if args.task == "classification":
        from soco_det.probe import linear_eval

        return linear_eval.run(args)
    missing = [f"--{k.replace('_', '-')}" for k in ("train_json", "val_json", "images") if not getattr(args, k)]
    if missing or not args.sources:
        raise UserError(
            f"the object probe needs sources and {', '.join(missing) or 'them'}"
            if missing
            else "the object probe needs at least one source (a run, a checkpoint or 'untrained')"
        )
    import torch

    from soco_det.torch_io import resolve_device
    from soco_det.probe.network import load_probe_network
    from soco_det.probe.objects import read_objects, spec_from_config, with_background_boxes
    from soco_det.probe.probe import TASKS, format_table, paired_difference, run_probe, summarise

    cfg = _config(args)
    seed = cfg.seed if args.seed is None else args.seed
    spec = spec_from_config(cfg, args.size)
    device = torch.device(resolve_device(args.device, "--device"))
    train = read_objects(args.train_json, args.images, args.max_images)
    val = read_objects(args.val_json, args.images, args.max_images, categories=train.categories)
    if len(train.categories) == 1:
        log.info("one category: the classifiers tell objects from background boxes drawn away from them")
        train, val = with_background_boxes(train, seed), with_background_boxes(val, seed + 1)
    task_names = tuple(args.tasks or TASKS)
    log.info(
        "probe: %d train / %d val objects, %d classes, views %d px, tasks %s",
        len(train),
        len(val),
        len(set(train.labels.tolist())),
        spec.size,
        " ".join(task_names),
    )
    results, summaries = [], {}
    for src in args.sources:
        net = load_probe_network(src, cfg.model, seed)
        result = run_probe(net, train, val, spec, device, seed=seed, task_names=task_names, copy_network=False)
        results.append(result)
        summaries[src] = summarise(result, args.resamples)
        log.info(
            "%s: probed in %.1f s (parts: %s)",
            src,
            result.seconds,
            ", ".join(f"{k} <- {v}" for k, v in result.loaded.items()),
        )
    report = {
        "sources": args.sources,
        "seed": seed,
        "view_size": spec.size,
        "n_train_objects": len(train),
        "n_val_objects": len(val),
        "seconds": {r.name: r.seconds for r in results},
        "results": summaries,
        "paired": {
            f"{b.name} - {results[0].name}": paired_difference(b, results[0], args.resamples) for b in results[1:]
        },
    }
    for kind in ("roi", "head"):
        print(format_table(summaries, kind))
        print()
    for name, diff in report["paired"].items():
        print(format_table({name: diff}, "roi"))
        print()
    if args.out:
        from soco_det.atomic import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(report, indent=2))
        log.info("wrote %s", args.out)
    return 0
