"""Compute, merge, import, export and inspect selective-search proposal stores.

One argparse sub-command each; ``compute`` is the default, so its word may be left out:

  soco-det proposals [compute] IMAGES -o STORE [--method M] [--workers N] [--max-side N] [--shard K/N] ...
  soco-det proposals merge SHARD_STORE... -o STORE
  soco-det proposals import FILE.json --images DIR -o STORE
  soco-det proposals export STORE --format official-json|coco -o FILE.json
  soco-det proposals info STORE [--coco FILE.json]

``soco-det proposals SUBCOMMAND --help`` shows the options of one sub-command. An images folder named
like a sub-command can be given as ``./merge`` (or after the word: ``compute merge``).
"""

from __future__ import annotations

import argparse
import json
import sys

SUBCOMMANDS = ("compute", "merge", "import", "export", "info")

_EPILOG = (
    "Without a sub-command word the arguments are those of `compute` (`soco-det proposals IMAGES -o STORE` "
    "is `soco-det proposals compute IMAGES -o STORE`). Use `soco-det proposals SUBCOMMAND --help` for its "
    "options. An interrupted run resumes when rerun with the same command; a finished store is left as it is."
)


class _SubcommandParser(argparse.ArgumentParser):
    """Refuses unknown arguments itself, so that the error names the sub-command and shows its usage
    (argparse would otherwise leave them to the top parser, whose message names only ``soco-det``)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def normalize_argv(words: list[str]) -> list[str]:
    """The arguments after ``soco-det proposals``, with ``compute`` put first when they do not start with a
    sub-command word (or with -h/--help, which lists the sub-commands)."""
    if words and words[0] not in SUBCOMMANDS and words[0] not in ("-h", "--help"):
        return ["compute", *words]
    return list(words)


def _workers(text: str) -> int | str:
    """``--workers``: ``auto`` or a whole number (its range is checked by the job, with the others)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor auto") from None


def _add_compute(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images",
        metavar="IMAGES",
        nargs="+",
        help="folder of images (searched recursively, images inside its .tar/.zip archives included), .tar/.zip "
        "archives, image files, patterns such as 'shards/shard-{000000..001281}.tar' or 'shards/*.tar' (quoted: "
        "expanded here), or .txt files listing such inputs one per line; several inputs are keyed relative to the "
        "folder that holds them all",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="STORE",
        required=True,
        help="store folder to write (resumed if it holds partial results)",
    )
    p.add_argument(
        "--method",
        default="selective_search",
        help="proposal method: selective_search (faithful, official parameters), reference (slow "
        "reference), opencv-single|opencv-fast|opencv-quality (needs `pip install soco-det[opencv]`), "
        "random (seeded baseline)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a method parameter, e.g. --param scale=500 (selective search: scale, sigma, "
        "min_size; opencv: base_k, inc_k, sigma; random: n, min_size, max_size, ratio, seed)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="worker processes: a number, or auto (default): one per CPU core this process may use",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="N",
        help="run the method on a copy whose longer side is at most N px (faster; rects are mapped back "
        "to full resolution). Default: full resolution, as the official proposals",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="compute only shard K of N (K = 0..N-1, e.g. $SLURM_ARRAY_TASK_ID/8) into a partial store; "
        "combine the shards with `soco-det proposals merge`",
    )
    p.add_argument(
        "--object-size",
        default="auto",
        metavar="HINT",
        help="how large the objects are, to fit the selective-search settings and the size filter: auto "
        "(default: estimated from a sample of the images), N (object side in px, e.g. 36), N%% (of the image "
        "side), coco:FILE.json (median box of a few labelled images), or paper (the paper's settings and "
        "ratio3size0308post: use it for the paper recipes and ImageNet-like photos of one large object)",
    )
    p.add_argument(
        "--filter",
        default=None,
        help="filter strategy (default: the one --object-size fits): ratio3size0308post (official), "
        "ratio3size0308 (no fallback), ratio3, none (min side 32 only), raw (keep all), size:MIN-MAX[post] "
        "(object side in px or %% of the image side, e.g. size:16-96post, size:2%%-30%%)",
    )
    p.add_argument("--keep-raw", action="store_true", help="also store the unfiltered rects")
    p.add_argument("--chunk-size", type=int, default=32, help="images per saved chunk (the unit of resumption)")
    _add_decode_options(p)


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exif-transpose",
        action="store_true",
        help="apply the EXIF orientation before computing (recorded in the store so that training does "
        "the same). Default: no transpose, as the official code",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse images above N pixels (decompression bombs); default: soco_det.imageio's limit (64 Mpx); "
        "0: no limit",
    )


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing {what} at -o (the old one is moved to NAME.old-<time>)",
    )


def _add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARD_STORE", nargs="+", help="partial stores written with --shard K/N")
    p.add_argument("-o", "--output", metavar="STORE", required=True, help="merged store folder")
    p.add_argument("--allow-missing", action="store_true", help="merge even if some shards K/N are missing")
    _add_overwrite(p, "store")


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("json_file", metavar="FILE.json", help="official proposals JSON")
    p.add_argument("--images", required=True, metavar="DIR", help="images folder the JSON's basenames refer to")
    p.add_argument("-o", "--output", metavar="STORE", required=True, help="store folder to write")
    _add_decode_options(p)
    _add_overwrite(p, "store")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="store folder")
    p.add_argument("-o", "--output", metavar="FILE.json", required=True, help="JSON file to write")
    p.add_argument(
        "--format",
        default="official-json",
        choices=["official-json", "coco"],
        help="official-json: {basename: [[x,y,w,h],...]} (official convention w = max-min); "
        "coco: COCO-style images/annotations with bbox = [x, y, w+1, h+1]",
    )
    _add_overwrite(p, "file")


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="store folder")
    p.add_argument(
        "--coco",
        metavar="FILE.json",
        default=None,
        help="also print the recall of this COCO file's boxes at IoU 0.5 by the kept (and raw, if stored) "
        "boxes; images are matched by basename",
    )


# sub-command -> (one-line help, description, option adder)
_SUBCOMMANDS = {
    "compute": (
        "compute (or resume) the store of every image under IMAGES (the default sub-command)",
        "Compute (or resume) the proposal store of every image under IMAGES. A killed run keeps its finished "
        "chunks; rerunning the same command computes only the missing images. The word `compute` may be "
        "left out: `soco-det proposals IMAGES -o STORE`.",
        _add_compute,
    ),
    "merge": (
        "combine the partial stores of a --shard K/N job into one store",
        "Combine the partial stores of a sharded job (--shard K/N, K = 0..N-1) into one store.",
        _add_merge,
    ),
    "import": (
        "store the official proposals JSON {basename: [[x,y,w,h],...]}",
        "Store the official proposals JSON {basename: [[x,y,w,h],...]} for the images under --images; "
        "unmatched names on either side are reported.",
        _add_import,
    ),
    "export": (
        "write a store as the official JSON or as COCO-style JSON",
        "Write a store as the official JSON or as COCO-style JSON (bbox = [x, y, w+1, h+1]).",
        _add_export,
    ),
    "info": (
        "print a store's settings and summary",
        "Print a store's settings and summary (images, failures, boxes per image, fallbacks, bytes per image), "
        "the fit of --object-size, the side distribution of raw and kept boxes (with a warning when the kept "
        "ones are far larger), and with --coco the ground-truth recall.",
        _add_info,
    ),
}
assert tuple(_SUBCOMMANDS) == SUBCOMMANDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True, parser_class=_SubcommandParser)
    for name, (help_text, description, add) in _SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=description, formatter_class=parser.formatter_class))


def _parse_params(items: list[str]) -> dict:
    import yaml

    from soco_det.errors import UserError

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        params[key.strip()] = yaml.safe_load(value)
    return params


def run(args: argparse.Namespace) -> int:
    from soco_det.imageio import DEFAULT_MAX_PIXELS

    if args.subcommand == "compute":
        from soco_det import api

        api.proposals(
            args.images,
            args.output,
            method=args.method,
            workers=args.workers,
            max_side=args.max_side,
            shard=args.shard,
            filter=args.filter,
            object_size=args.object_size,
            keep_raw=args.keep_raw,
            params=_parse_params(args.param),
            exif_transpose=args.exif_transpose,
            max_pixels=args.max_pixels,
            chunk_size=args.chunk_size,
        )
    elif args.subcommand == "merge":
        from soco_det.proposals.runner import merge_stores

        merge_stores(args.shards, args.output, allow_missing=args.allow_missing, overwrite=args.overwrite)
    elif args.subcommand == "import":
        from soco_det.proposals.interchange import import_official_json

        max_pixels = args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS
        import_official_json(
            args.json_file,
            args.images,
            args.output,
            exif_transpose=args.exif_transpose,
            max_pixels=max_pixels,
            overwrite=args.overwrite,
        )
    elif args.subcommand == "export":
        from soco_det.proposals.interchange import export_coco, export_official_json

        (export_coco if args.format == "coco" else export_official_json)(
            args.store, args.output, overwrite=args.overwrite
        )
        print(f"wrote {args.output} ({args.format})")
    else:
        _info(args.store, args.coco)
    sys.stdout.flush()
    return 0


def _info(path: str, coco: str | None) -> None:
    from soco_det.proposals.recall import store_recall
    from soco_det.proposals.sizes import format_sides, large_box_warning, store_sides
    from soco_det.proposals.store import ProposalStore, format_summary

    store = ProposalStore.open(path, upgrade=False)
    print(f"store: {store.path}\nimages root: {store.root}")
    print("settings: " + json.dumps(store.settings()))
    fit = store.meta.get("fit")
    if fit:
        print(f"fit: --object-size {fit.get('hint')}: {fit.get('reason')}")
    print(format_summary(store.summary))
    sides = store_sides(store)
    print("\n".join(format_sides(sides)))
    warning = large_box_warning(sides)
    if warning:
        print(f"WARNING: {warning}")
    if coco:
        print(store_recall(store, coco).format(coco))
