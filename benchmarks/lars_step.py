"""Time of one LARS optimizer step over the full SoCo model's parameters: per-parameter loop vs foreach.

Gradients are random (no forward/backward); only ``optimizer.step()`` is timed, which is where the
per-parameter loop launches ~8 kernels per parameter. Same update either way (tests/test_lars.py).

    python benchmarks/lars_step.py --device cpu --threads 1
    python benchmarks/lars_step.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from soco_det.engine.lars import build_lars
from soco_det.models import ModelConfig, build_model


def time_step(model: torch.nn.Module, foreach: bool, device: str, steps: int) -> float:
    opt = build_lars(model, lr=0.1, weight_decay=1e-5, foreach=foreach)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    opt.step()  # momentum buffers exist from here on
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(ModelConfig(depth=args.depth)).to(args.device)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.requires_grad for p in model.parameters())
    res = {
        "device": args.device,
        "params": n,
        "loop_ms": 1e3 * time_step(model, False, args.device, args.steps),
        "foreach_ms": 1e3 * time_step(model, True, args.device, args.steps),
    }
    res["speedup"] = res["loop_ms"] / res["foreach_ms"]
    print(
        f"LARS step over {n} parameter tensors on {args.device}: loop {res['loop_ms']:.2f} ms, "
        f"foreach {res['foreach_ms']:.2f} ms (x{res['speedup']:.2f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
