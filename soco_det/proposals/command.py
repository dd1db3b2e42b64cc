"""Compute, merge, import, export and inspect selective-search proposal stores.

Five forms, told apart by the first positional argument (a word, or else the images folder):

  soco-det proposals IMAGES -o STORE [--method M] [--workers N] [--max-side N] [--shard K/N] ...
  soco-det proposals merge SHARD_STORE... -o STORE
  soco-det proposals import FILE.json --images DIR -o STORE
  soco-det proposals export STORE --format official-json|coco -o FILE.json
  soco-det proposals info STORE

``soco-det proposals WORD --help`` shows the options of one form. A folder literally named like one
of the words can be given as ``./merge``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

FORMS = ("merge", "import", "export", "info")
_USAGE = """
  %(prog)s IMAGES -o STORE [--method M] [--workers N] [--max-side N] [--shard K/N] [--filter F] [--keep-raw] [--exif-transpose]
  %(prog)s merge SHARD_STORE... -o STORE [--allow-missing]
  %(prog)s import FILE.json --images DIR -o STORE [--exif-transpose]
  %(prog)s export STORE --format official-json|coco -o FILE.json
  %(prog)s info STORE"""
_EPILOG = """forms:
  IMAGES            compute (or resume) the store for every image under the folder IMAGES
  merge SHARDS...   combine the partial stores of a --shard K/N job (K = 0..N-1) into one store
  import FILE.json  store the official proposals JSON {basename: [[x,y,w,h],...]} for the images in --images
  export STORE      write the store as the official JSON or as COCO-style JSON (bbox = [x, y, w+1, h+1])
  info STORE        print the store's settings and summary (images, failures, boxes per image, bytes per image)
Use `soco-det proposals WORD --help` for one form's options. An interrupted run resumes when rerun
with the same command; a finished store is left as it is."""


def _output(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    p.add_argument("-o", "--output", metavar="PATH", default=None, help=what)


def _compute_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--method", default="selective_search",
                   help="proposal method: selective_search (faithful, official parameters), reference (slow "
                        "reference), opencv-single|opencv-fast|opencv-quality (needs `pip install soco-det[opencv]`), "
                        "random (seeded baseline)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method parameter, e.g. --param scale=500 (selective search: scale, sigma, "
                        "min_size; opencv: base_k, inc_k, sigma; random: n, min_size, max_size, ratio, seed)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (e.g. the number of CPU cores)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="run the method on a copy whose longer side is at most N px (faster; rects are mapped back "
                        "to full resolution). Default: full resolution, as the official proposals")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="compute only shard K of N (K = 0..N-1, e.g. $SLURM_ARRAY_TASK_ID/8) into a partial store; "
                        "combine the shards with `soco-det proposals merge`")
    p.add_argument("--filter", default="ratio3size0308post",
                   help="filter strategy: ratio3size0308post (official), ratio3size0308 (no fallback), ratio3, "
                        "none (min side 32 only), raw (keep all)")
    p.add_argument("--keep-raw", action="store_true", help="also store the unfiltered rects")
    p.add_argument("--chunk-size", type=int, default=32, help="images per saved chunk (the unit of resumption)")


def _decode_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--exif-transpose", action="store_true",
                   help="apply the EXIF orientation before computing (recorded in the store so that training does "
                        "the same). Default: no transpose, as the official code")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images above N pixels (decompression bombs); default: soco_det.imageio's limit (64 Mpx); "
                        "0: no limit")


def _merge_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--allow-missing", action="store_true", help="merge even if some shards K/N are missing")


def _overwrite_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store (merge, import) or file (export) at -o")


def _import_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--images", default=None, metavar="DIR", help="images folder the JSON's basenames refer to")


def _export_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--format", default="official-json", choices=["official-json", "coco"],
                   help="official-json: {basename: [[x,y,w,h],...]} (official convention w = max-min); "
                        "coco: COCO-style images/annotations with bbox = [x, y, w+1, h+1]")


# form -> (positional metavar, nargs, positional help, option adders, -o help)
_FORMS: dict[str, tuple[str, str, str, tuple[Callable, ...], str]] = {
    "compute": ("IMAGES", "1", "folder of images (searched recursively, images inside its .tar/.zip archives included) or one .tar/.zip", (_compute_options, _decode_options),
                "store folder to write (resumed if it holds partial results)"),
    "merge": ("SHARD_STORE", "+", "partial stores written with --shard K/N", (_merge_options, _overwrite_option),
              "merged store folder"),
    "import": ("FILE.json", "1", "official proposals JSON", (_import_options, _decode_options, _overwrite_option),
               "store folder to write"),
    "export": ("STORE", "1", "store folder", (_export_options, _overwrite_option), "JSON file to write"),
    "info": ("STORE", "1", "store folder", (), "(unused)"),
}


_DESCRIPTIONS = {
    "compute": "Compute (or resume) the proposal store of every image under IMAGES. A killed run keeps its finished "
               "chunks; rerunning the same command computes only the missing images.",
    "merge": "Combine the partial stores of a sharded job (--shard K/N, K = 0..N-1) into one store.",
    "import": "Store the official proposals JSON {basename: [[x,y,w,h],...]} for the images under --images; "
              "unmatched names on either side are reported.",
    "export": "Write a store as the official JSON or as COCO-style JSON (bbox = [x, y, w+1, h+1]).",
    "info": "Print a store's settings and summary (images, failures, boxes per image, fallbacks, bytes per image).",
}


def _form_parser(form: str, prog: str) -> argparse.ArgumentParser:
    from soco_det.cli import HelpFormatter

    metavar, nargs, pos_help, adders, out_help = _FORMS[form]
    word = "" if form == "compute" else f" {form}"
    p = argparse.ArgumentParser(prog=f"{prog}{word}", description=_DESCRIPTIONS[form],
                                formatter_class=HelpFormatter)
    p.add_argument(metavar.lower().replace(".", "_"), metavar=metavar, nargs=None if nargs == "1" else nargs, help=pos_help)
    if form != "info":
        _output(p, out_help)
    for add in adders:
        add(p)
    return p


class _FormHelp(argparse.Action):
    """``-h``: the help of the form named by the first positional argument (if already parsed)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        words = getattr(namespace, "args", None) or []
        if words and words[0] in FORMS:
            _form_parser(words[0], parser.prog).print_help()
        else:
            parser.print_help()
        parser.exit()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = _USAGE.replace("%(prog)s", parser.prog)
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # Replace argparse's -h with the per-form help (the optionals group checks the conflicts).
    parser._optionals.conflict_handler = "resolve"
    parser.add_argument("-h", "--help", action=_FormHelp, help="show this help (after a form word: that form's help)")
    parser.add_argument("args", nargs="+", metavar="IMAGES|WORD", help="the images folder, or merge/import/export/info "
                        "followed by its arguments")
    _output(parser, "output store folder (compute, merge, import) or JSON file (export)")
    _compute_options(parser.add_argument_group("compute options (IMAGES form)"))
    _decode_options(parser.add_argument_group("decoding options (IMAGES and import forms)"))
    _merge_options(parser.add_argument_group("merge options"))
    _overwrite_option(parser.add_argument_group("output options (merge, import, export)"))
    _import_options(parser.add_argument_group("import options"))
    _export_options(parser.add_argument_group("export options"))


def _check_form_options(form: str, args: argparse.Namespace) -> None:
    """Refuse options that do not belong to the form (they would be silently ignored)."""
    from soco_det.errors import UserError

    allowed = {a.dest for a in _form_parser(form, "soco-det proposals")._actions}
    for p in (_form_parser(f, "soco-det proposals") for f in _FORMS):
        for action in p._actions:
            if action.dest in allowed or not action.option_strings or action.dest == "help":
                continue
            if getattr(args, action.dest, action.default) != action.default:
                raise UserError(f"{action.option_strings[-1]} does not apply to "
                                f"`soco-det proposals{'' if form == 'compute' else ' ' + form}`")


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
    from soco_det.errors import UserError
    from soco_det.imageio import DEFAULT_MAX_PIXELS

    words = list(args.args)
    form = words[0] if words[0] in FORMS else "compute"
    rest = words[1:] if form != "compute" else words
    _check_form_options(form, args)
    nargs = _FORMS[form][1]
    if (nargs == "1" and len(rest) != 1) or (nargs == "+" and not rest):
        raise UserError(f"`soco-det proposals{'' if form == 'compute' else ' ' + form}` takes "
                        f"{'one' if nargs == '1' else 'one or more'} {_FORMS[form][0]} (got {len(rest)}); see --help")
    if form != "info" and not args.output:
        raise UserError("-o/--output is required")
    max_pixels = args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS

    if form == "compute":
        from soco_det.proposals.runner import compute_store

        compute_store(rest[0], args.output, method=args.method, workers=args.workers, max_side=args.max_side,
                      shard=args.shard, filter=args.filter, keep_raw=args.keep_raw, params=_parse_params(args.param),
                      exif_transpose=args.exif_transpose, max_pixels=max_pixels, chunk_size=args.chunk_size)
    elif form == "merge":
        from soco_det.proposals.runner import merge_stores

        merge_stores(rest, args.output, allow_missing=args.allow_missing, overwrite=args.overwrite)
    elif form == "import":
        from soco_det.proposals.interchange import import_official_json

        if not args.images:
            raise UserError("`soco-det proposals import` needs --images DIR (the folder the JSON's basenames refer to)")
        import_official_json(rest[0], args.images, args.output, exif_transpose=args.exif_transpose, max_pixels=max_pixels,
                             overwrite=args.overwrite)
    elif form == "export":
        from soco_det.proposals.interchange import export_coco, export_official_json

        (export_coco if args.format == "coco" else export_official_json)(rest[0], args.output, overwrite=args.overwrite)
        print(f"wrote {args.output} ({args.format})")
    else:
        from soco_det.proposals.store import ProposalStore, format_summary

        store = ProposalStore.open(rest[0])
        print(f"store: {store.path}\nimages root: {store.root}")
        print("settings: " + json.dumps(store.settings()))
        print(format_summary(store.summary))
    sys.stdout.flush()
    return 0
