"""Our SoCo_FPN against the official one on the same weights and batch: loss, gradients, BN statistics.

The official model (``../shared/official``: its tarball extracted into ``.official/``, built through
``official_step.py``'s helpers, never imported by the project) and a batch from the official dataset
class (views 224/224/112) are made; its weights are copied into our model (``legacy`` box scaling,
as the official code); both run one training forward + backward. Printed per variant of ours
(``batched_calls`` on/off, ``batched_backbone`` on/off): the loss difference, the largest relative
gradient difference, and the largest relative difference of every BN running statistic, which
depends on the order of the official calls (V1-12, V1-13, V2, V3 per level; docs/method.md 3.4).

    python benchmarks/official_parity.py --batch 2 --threads 1        # CPU, ~1-2 min
    python benchmarks/official_parity.py --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tarfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def official_batch_and_model(shared: Path, batch: int, device: str):  # noqa: ANN201
    dest = REPO / ".official"
    if not (dest / "SoCo" / "contrast").is_dir():
        dest.mkdir(exist_ok=True)
        with tarfile.open(sorted(shared.glob("SoCo-official-*.tar.gz"))[-1]) as tar:
            tar.extractall(dest)
    os.environ.setdefault("SOCO_DIR", str(dest / "SoCo"))
    os.environ.setdefault("PEER_DIR", str(dest))
    sys.path.insert(0, str(shared))
    import official_step as off  # noqa: E402 - the official yardstick script, run-time only
    import peer_common as pc
    import peer_data as pdata
    import torch.distributed as dist

    pc.add_official_to_path()
    args, _, data, _ = off.synthetic_batch(batch, min(32, batch), 0, ["--batch_size", str(batch)])
    args.num_instances = 1281167
    pdata.seed_all(0)
    model, *_ = off.build(args, torch.device(device))
    if dist.is_initialized():  # SyncBatchNorm takes the plain path without a group (one GPU / CPU)
        dist.destroy_process_group()
    return model.train(), [x.to(device) for x in data]


def bn_stats(named_buffers) -> dict:  # noqa: ANN001
    return {n: b.detach().clone() for n, b in named_buffers if n.endswith(("running_mean", "running_var"))}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--official-dir", default=str(REPO.parent / "shared" / "official"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from soco_det.models import ModelConfig, build_model
    from soco_det.models.official import official_to_ours

    official, data = official_batch_and_model(Path(args.official_dir), args.batch, args.device)
    im1, im2, im3, b1_12, b1_13, b2, b3, c12, c13 = data
    batch = {
        "images": [im1, im2, im3],
        "pairs": [(0, 1), (0, 2)],
        "boxes": [(b1_12[..., :4].float(), b2[..., :4].float()), (b1_13[..., :4].float(), b3[..., :4].float())],
        "corr": [c12.float(), c13.float()],
    }
    state = {official_to_ours(k): v for k, v in official.state_dict().items() if official_to_ours(k) is not None}
    base = build_model(ModelConfig(legacy=True)).to(args.device)
    missing, unexpected = base.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")

    loss_off = official(*data)
    loss_off.backward()
    stats_off = {official_to_ours(n): v for n, v in bn_stats(official.named_buffers()).items()}
    grads_off = {official_to_ours(n): p.grad for n, p in official.named_parameters() if p.grad is not None}

    rows = []
    for name, over in [
        ("batched", {}),
        ("roi-only", {"batched_backbone": False}),
        ("separate", {"batched_calls": False}),
    ]:
        ours = copy.deepcopy(base)
        ours.cfg = dataclasses.replace(base.cfg, **over)
        out = ours(batch)
        out["loss"].backward()
        stats = bn_stats(ours.named_buffers())
        stat_diff = {n: max_rel(stats[n], v) for n, v in stats_off.items()}
        # Gradients that are zero up to rounding (a Linear bias followed by a BatchNorm) have no
        # relative precision: compare parameters whose gradient is not negligible.
        scale = max(float(g.abs().max()) for g in grads_off.values())
        grad_diff = {
            n: max_rel(p.grad, grads_off[n])
            for n, p in ours.named_parameters()
            if n in grads_off and grads_off[n].abs().max() > 1e-4 * scale
        }
        worst_stat = max(stat_diff, key=stat_diff.get)
        worst_grad = max(grad_diff, key=grad_diff.get)
        loss_ours, loss_ref = float(out["loss"].detach()), float(loss_off.detach())
        row = {
            "ours": name,
            "loss_official": loss_ref,
            "loss_ours": loss_ours,
            "loss_abs_diff": abs(loss_ours - loss_ref),
            "n_grads": len(grad_diff),
            "bn_stat_max_rel": stat_diff[worst_stat],
            "bn_stat_worst": worst_stat,
            "head_bn1_running_mean_rel": stat_diff["online.head.bn1.running_mean"],
            "grad_max_rel": grad_diff[worst_grad],
            "grad_worst": worst_grad,
            "n_stats": len(stat_diff),
        }
        rows.append(row)
        print(
            f"{name:9s} loss official {row['loss_official']:.6f} ours {row['loss_ours']:.6f} "
            f"(|diff| {row['loss_abs_diff']:.2e}); BN running stats max rel diff {row['bn_stat_max_rel']:.2e} "
            f"({worst_stat}); head.bn1.running_mean {row['head_bn1_running_mean_rel']:.2e}; "
            f"grads max rel diff {row['grad_max_rel']:.2e} ({worst_grad}, {len(grad_diff)} of {len(grads_off)} "
            f"tensors with a non-negligible gradient)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "batch": args.batch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
