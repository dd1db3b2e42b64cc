"""Start pretraining from existing weights (``model.init=PATH``).

Most teams already have a ResNet they trust, or a whole detector. SoCo pretrains the backbone, the
FPN and the box head together, so starting from such weights and adapting the whole detector to
one's own unlabeled images is the common case. :func:`init_from_weights` reads a **local** file,
recognises its naming, and copies what matches into the online network; the target network is then
set to a copy of the online one (BYOL's start, docs/method.md 3.6).

Accepted files (the format is recognised from the names; nothing is downloaded):

* a torchvision or timm ResNet state dict (``conv1.weight``, ``layer1.0.bn1.*``; ``fc.*`` unused),
  also our ``export --to timm``;
* a torchvision Mask R-CNN / Faster R-CNN "v2" state dict, also our ``export --to torchvision``
  (backbone, FPN with BatchNorm, 4conv1fc box head);
* a detectron2 checkpoint (``.pkl`` of numpy arrays, any pickle protocol, or a ``.pth``; fully
  qualified names, or the short names of the official SoCo converters), also our ``export --to
  detectron2``;
* an mmdetection checkpoint (``{"state_dict": ...}``), also our ``export --to mmdet``;
* a soco-det checkpoint or run folder (e.g. an ``image_byol`` run), or an official SoCo
  ``ckpt_epoch_*.pth`` (read by :func:`soco_det.export.source.load_source`, online network).

The name tables are not repeated here: the exporters' renaming rules
(:func:`soco_det.export.torchvision.map_source` and its detectron2 / mmdet / timm siblings) are
applied to our own key names and inverted, so export and import cannot disagree.

What is loaded, part by part:

* ``encoder`` (backbone) must be complete and of the configured depth; otherwise
  :class:`~soco_det.errors.UserError` says what is wrong (a depth mismatch names both depths);
* ``neck`` (FPN) and ``head`` (box head) are loaded when the file holds all their tensors; when it
  holds none or only some (torchvision's v1 FPN has conv biases and no BatchNorm, its box head is a
  2-MLP), the part stays randomly initialised and the report says why; a shape mismatch (other
  widths) is an error naming the keys and the config fields to change;
* the projector and predictor always start random: image-level checkpoints have other shapes.

Files are read as data only (:func:`soco_det.torch_io.torch_load`: numpy values such as an mmdet
``meta`` are accepted, no other global). A loaded tensor with NaN or infinite values is an error
naming it. ``num_batches_tracked`` counters may be absent (FrozenBatchNorm checkpoints have none); the
model's own counters are kept then. The report (:class:`InitReport`) lists every loaded key,
every key that stays random and every unused key of the file; the engine logs its summary and
writes it to ``RUN/init_weights.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from soco_det.atomic import atomic_write_text
from soco_det.errors import UserError
from soco_det.export import detectron2, mmdet, timm, torchvision
from soco_det.export.source import ExportSource, infer_depth, load_source
from soco_det.logs import get_logger
from soco_det.models import build_model
from soco_det.models.config import ModelConfig
from soco_det.torch_io import check_finite, torch_load

log = get_logger(__name__)

PARTS = ("encoder", "neck", "head")
TORCHVISION_DETECTOR = "torchvision Mask R-CNN v2"  # also a Faster R-CNN v2 file: reported as such
PART_NAMES = {"encoder": "backbone", "neck": "FPN", "head": "box head"}
_COUNTER = ".num_batches_tracked"


@dataclass
class InitReport:
    """What :func:`init_from_weights` did.

    ``loaded``: our state-dict keys filled from the file (``online.*``; the target got copies);
    BatchNorm ``num_batches_tracked`` counters are left out of all three lists;
    ``random``: ``online.*`` / ``predictor.*`` keys left as built; ``unused``: file keys not loaded;
    ``skipped``: part -> why it stays random although the file has some of its tensors.
    """

    path: str
    kind: str
    depth: int
    loaded: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        lines = [f"model.init: {self.path} ({self.kind}, ResNet-{self.depth})"]
        lines.append(f"  loaded {len(self.loaded)} tensors: {_by_module(self.loaded)}")
        lines.append(f"  random {len(self.random)} tensors: {_by_module(self.random) or 'none'}")
        for part, why in self.skipped.items():
            lines.append(f"  {PART_NAMES[part]} stays random: {why}")
        if self.unused:
            lines.append(f"  unused in the file {len(self.unused)} tensors: {_by_module(self.unused, depth=2)}")
        lines.append("  target network: a copy of the online network")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "depth": self.depth,
            "loaded": self.loaded,
            "random": self.random,
            "unused": self.unused,
            "skipped": self.skipped,
        }


# ----------------------------------------------------------------------------- reading the file
def _check_local(path: str | Path) -> Path:
    text = str(path)
    if "://" in text:
        raise UserError(f"model.init: {text} is a URL; give a local file (nothing is downloaded)")
    p = Path(text).expanduser()
    if not p.exists():
        raise UserError(f"model.init: {p}: no such file or folder")
    return p


def _is_ours_or_official(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        return False
    if str(obj.get("format", "")).startswith("soco-det/"):
        return True
    keys = [k[len("module.") :] if k.startswith("module.") else k for k in obj["model"]]
    return any(k.startswith("encoder.") for k in keys) and any(k.startswith(("projector.", "encoder_k.")) for k in keys)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, Callable[[str], str | None] | None]:
    """``(tensors by file key, description, key rule)`` of a weights file or run folder.

    For soco-det / official checkpoints the keys are already ours (``encoder.*``, ``neck.*``,
    ``head.*``, online network) and the rule is the identity; otherwise the rule is ``None`` and
    :func:`match_format` finds it.
    """

    p = _check_local(path)
    if p.is_dir():  # a soco-det run folder
        src = load_source(p, network="online")
        return _source_tensors(src), f"soco-det {src.variant} run", _identity
    obj = torch_load(p, mmap=True, what="cannot be read as a weights file")  # also detectron2 .pkl
    if _is_ours_or_official(obj):
        src = load_source(p, network="online")
        return _source_tensors(src), f"{src.origin} {src.variant} checkpoint", _identity
    state = obj
    for wrapper in ("model", "state_dict"):  # detectron2 / generic, mmdetection
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise UserError(f"model.init: {p}: holds a {type(obj).__name__}, not a state dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DDP model
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    if not tensors:
        raise UserError(f"model.init: {p}: has no tensors")
    return tensors, "", None


def _identity(key: str) -> str | None:
    return key if key.startswith(tuple(f"{part}." for part in PARTS)) else None


def _source_tensors(src: Any) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in PARTS for k, v in getattr(src, part).items()}


# ----------------------------------------------------------------------------- name formats
def _names(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _encoder_names() -> dict[str, torch.Tensor]:
    """Keys of every ResNet depth's trunk (meta tensors): ResNet-152 (bottleneck, most blocks per
    stage) and ResNet-34 (basic blocks) together cover 18/34/50/101/152."""
    import torchvision

    names: dict[str, torch.Tensor] = {}
    with torch.device("meta"):
        for builder in (torchvision.models.resnet152, torchvision.models.resnet34):
            names.update({k: v for k, v in builder(weights=None).state_dict().items() if not k.startswith("fc.")})
    return names


def format_rules(model: nn.Module, variant: str) -> dict[str, dict[str, str]]:
    """Format name -> {file key: our part key (``encoder.*`` / ``neck.*`` / ``head.*``)}.

    Built by running the exporters' renaming rules on our names (any ResNet depth for the encoder,
    ``model``'s own FPN and box head) and inverting them.
    """

    online = model.online
    neck = _names(online["neck"]) if "neck" in online else {}
    head = _names(online["head"]) if "head" in online else {}
    encoder = _encoder_names()

    def inverse(module: Any, source_variant: str) -> dict[str, str]:
        src = ExportSource(
            path=Path("<model>"),
            origin="soco-det",
            network="online",
            variant=source_variant,
            depth=50,
            encoder=encoder,
            neck=neck,
            head=head,
        )
        mapping = module.map_source(src)
        return {rec.target: rec.source[len("online.") :] for rec in mapping.records}

    rules = {
        "torchvision/timm ResNet": inverse(timm, variant),
        TORCHVISION_DETECTOR: inverse(torchvision, variant),
        "detectron2": inverse(detectron2, "soco_fpn"),
        "detectron2 C4": inverse(detectron2, "soco_c4"),
        "mmdetection": inverse(mmdet, variant),
    }
    short = {}  # the official SoCo converters' names, which detectron2 suffix-matches
    for target, ours in rules["detectron2"].items():
        for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads."):
            if target.startswith(prefix):
                target = target[len(prefix) :]
                break
        short[target] = ours
    rules["detectron2 (short names)"] = short
    return rules


def match_format(
    tensors: Mapping[str, torch.Tensor], rules: Mapping[str, Mapping[str, str]]
) -> tuple[str, dict[str, str]]:
    """The format whose names cover the most keys of the file (ties: the first listed)."""
    best, best_n = "", 0
    for name, rule in rules.items():
        n = sum(1 for k in tensors if k in rule)
        if n > best_n:
            best, best_n = name, n
    if best_n == 0:
        raise UserError(
            f"model.init: no ResNet / FPN / box-head names recognised (first keys: {_few(list(tensors), 5)}); "
            f"accepted: {', '.join(rules)}, soco-det and official SoCo checkpoints"
        )
    return best, dict(rules[best])


def file_depth(path: str | Path) -> int:
    """The ResNet depth of the backbone in a weights file (any format :func:`read_weights` reads)."""

    tensors, _, rule = read_weights(path)
    if rule is None:
        probe = build_model(ModelConfig(variant="image_byol", depth=18, proj_hidden_dim=8, proj_dim=8))
        _, names = match_format(tensors, format_rules(probe, "image_byol"))
        rule = names.get
    encoder = {}
    for key in tensors:
        mine = rule(key)
        if mine is not None and mine.startswith("encoder."):
            encoder[mine[len("encoder.") :]] = tensors[key]
    if not encoder:
        raise UserError(f"{path}: no backbone weights in the file")
    return infer_depth(encoder, path)


# ----------------------------------------------------------------------------- loading
def init_from_weights(model: nn.Module, path: str | Path, cfg: ModelConfig) -> InitReport:
    """Load what matches from ``path`` into ``model.online`` and copy online -> target.

    ``model`` is a freshly built pretraining model (:func:`soco_det.models.build_model`) of
    ``cfg``. Raises :class:`UserError` for a URL, a missing or unreadable file, a file with no
    recognisable backbone, an incomplete backbone, a depth mismatch or a shape mismatch.
    """

    tensors, kind, rule = read_weights(path)
    if rule is None:
        kind, names = match_format(tensors, format_rules(model, cfg.variant))
        rule = names.get
        if kind == TORCHVISION_DETECTOR and not any(k.startswith("roi_heads.mask_") for k in tensors):
            kind = "torchvision Faster R-CNN v2"  # the same names, without the mask branch
    source_key = {mine: key for key in tensors if (mine := rule(key)) is not None}  # our key -> the file's
    ours = {mine: tensors[key] for mine, key in source_key.items()}
    unused = sorted(set(tensors) - set(source_key.values()))

    encoder = {k[len("encoder.") :]: v for k, v in ours.items() if k.startswith("encoder.")}
    if not encoder:
        raise UserError(f"model.init: {path}: no backbone weights in the file ({kind}; keys: {_few(list(tensors), 5)})")
    depth = infer_depth(encoder, f"model.init: {path}")
    if depth != cfg.depth:
        raise UserError(
            f"model.init: {path} holds a ResNet-{depth} backbone but model.depth={cfg.depth}; "
            f"set model.depth={depth} or give a ResNet-{cfg.depth} checkpoint"
        )

    report = InitReport(path=str(path), kind=kind, depth=depth, unused=unused)
    for part in PARTS:
        have = {k[len(part) + 1 :]: v for k, v in ours.items() if k.startswith(part + ".")}
        _load_part(
            model, part, have, report, cfg, path, lambda part=part: sorted(_file_keys(rule, tensors, part)), source_key
        )

    # BYOL's start: the target is a copy of the online network (loaded parts and random ones alike).
    with torch.no_grad():
        for name in model.target:
            model.target[name].load_state_dict(model.online[name].state_dict(), strict=True)
    loaded = set(report.loaded)
    report.random = [
        k for k in model.state_dict() if not k.startswith("target.") and k not in loaded and not k.endswith(_COUNTER)
    ]
    report.unused = sorted(set(report.unused))
    return report


_WIDTH_HINTS = {"neck": "model.fpn_channels", "head": "model.head_conv_dim / model.head_fc_dim / model.roi_output_size"}


def _load_part(
    model: nn.Module,
    part: str,
    have: dict[str, torch.Tensor],
    report: InitReport,
    cfg: ModelConfig,
    path: str | Path,
    file_keys: Callable[[], list[str]],
    source_key: dict[str, str],
) -> None:
    """Copy the file's tensors ``have`` of one online ``part`` into the model, recorded in ``report``:
    all of a part or none (a part without BatchNorm or of another layout stays random, named in
    ``report.skipped``); an incomplete backbone or shapes that differ are an error.
    ``file_keys()``: the file's keys of that part (reported as unused when it is skipped);
    ``source_key``: our key -> the file's (a non-finite tensor is refused by the file's name)."""
    if part not in model.online:
        if have:
            report.skipped[part] = (
                f"the file has {len(have)} {PART_NAMES[part]} tensors, variant {cfg.variant} has no {PART_NAMES[part]}"
            )
            report.unused += file_keys()
        return
    dst = model.online[part].state_dict()
    wanted = [k for k in dst if not k.endswith(_COUNTER)]
    missing = [k for k in wanted if k not in have]
    extra = [k for k in have if k not in dst]
    if part == "encoder" and (missing or extra):
        raise UserError(
            f"model.init: {path}: the backbone is incomplete for ResNet-{report.depth}: "
            f"missing {_few(missing)}; unknown {_few(extra)}"
        )
    if not have:
        return
    if missing or extra:
        report.skipped[part] = (
            f"the file has {len(have)} of its {len(wanted)} tensors (missing {_few(missing, 3)}), "
            f"e.g. a {PART_NAMES[part]} without BatchNorm or of another layout"
        )
        report.unused += file_keys()
        return
    bad = [
        f"{part}.{k} {tuple(v.shape)} vs model {tuple(dst[k].shape)}"
        for k, v in have.items()
        if v.shape != dst[k].shape
    ]
    if bad:
        extra_hint = f" (set {_WIDTH_HINTS[part]} to the file's widths)" if part in _WIDTH_HINTS else ""
        raise UserError(f"model.init: {path}: {PART_NAMES[part]} shapes differ{extra_hint}: {_few(bad, 4)}")
    check_finite({source_key[f"{part}.{k}"]: v for k, v in have.items()}, f"model.init: {path}")
    with torch.no_grad():
        for k, v in have.items():
            dst[k].copy_(v.to(dst[k].dtype))
    report.loaded += [f"online.{part}.{k}" for k in have if not k.endswith(_COUNTER)]


def _file_keys(rule: Callable[[str], str | None], tensors: Mapping[str, Any], part: str) -> list[str]:
    return [k for k in tensors if (rule(k) or "").startswith(part + ".")]


def apply_init(model: nn.Module, cfg: ModelConfig, run_dir: str | Path | None = None) -> InitReport:
    """:func:`init_from_weights` with ``cfg.init``; logs the summary and writes
    ``run_dir/init_weights.json`` (every loaded, random and unused key)."""

    report = init_from_weights(model, cfg.init, cfg)
    for line in report.summary_lines():
        log.info("%s", line)
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / "init_weights.json", json.dumps(report.to_dict(), indent=1) + "\n")
    return report


def _by_module(keys: list[str], depth: int | None = None) -> str:
    """``online.encoder.* 320, online.neck.* 24``: keys counted per module prefix."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        n = depth if depth is not None else (2 if parts[0] in ("online", "target") else 1)
        prefix = ".".join(parts[:n] if len(parts) > n else parts[:-1])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{p}.* {n}" for p, n in counts.items())


def _few(items: list[str], n: int = 6) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")
