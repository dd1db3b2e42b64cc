"""One prepared GPU run for the throughput comparison (issue 10): one JSON with every figure.

Parts, in this order, each in its own process, time-boxed and failure-isolated (a part that fails or
runs out of time records its error and the suite goes on):

1. ``official_fp16``  the official SoCo_FPN step (``../shared/official/official_step.py``), fp16 autocast
   + GradScaler (the apex O1 analogue), batch 128, views 224/224/112;
2. ``ours``           our step at the same batch (``benchmarks/train_step.py``, recipe
   ``soco_fpn_r50_100ep``): ``all_levels`` (batched calls, and separate calls for the ratio) and
   ``assigned_level``, bf16 and fp16, with peak memory;
3. ``official_bf16``  the official step under bf16 autocast;
4. ``ceiling``        a plain ResNet-50 classification step (``../shared/official/ceiling.py``);
5. ``gpu_tests``      ``pytest tests/test_gpu.py``;
6. ``end_to_end``     ``soco-det pretrain`` from a JPEG folder generated here (``soco-det synth``, random
   proposals: the loader's cost does not depend on how the boxes were found) through the real loader,
   ``data.photometric=cpu`` and ``device``, with ``--workers`` loader processes;
7. ``lars``           the LARS step, per-parameter loop vs foreach (``benchmarks/lars_step.py``);
8. ``ours_b256``      our ``all_levels`` bf16 step at batch 256 (peak memory: does it fit 80 GB?);
9. ``parity``         ``benchmarks/official_parity.py``: the official and our model on the same weights
   and batch (loss, gradients, BN running statistics), fp32 on the device.

The official code is extracted from ``../shared/official/SoCo-official-*.tar.gz`` into ``.official/``
(git-ignored) and only run, never imported by the project. The JSON (``OUT/gpu_suite.json``) is
rewritten after every part; ``summary`` holds the table (img/s, ratios to the official fp16 step,
memory, end-to-end / synthetic-input ratios).

    python benchmarks/gpu_suite.py --out gpu_suite_out                     # GPU machine, <= 8 min
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/suite    # CPU rehearsal, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
# Where official_step.py / ceiling.py / the tarball may be: ../shared (beside the checkout), shared/
# inside it, or copied into the ignored .official/ (official README: "take that folder along").
OFFICIAL_CANDIDATES = (REPO.parent / "shared" / "official", REPO / "shared" / "official", REPO / ".official")


def default_official_dir() -> str:
    for cand in OFFICIAL_CANDIDATES:
        if (cand / "official_step.py").is_file():
            return str(cand)
    return str(OFFICIAL_CANDIDATES[0])


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = self.out / "work"
        self.work.mkdir(exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.record: dict = {
            "argv": sys.argv[1:],
            "device": args.device,
            "tiny": args.tiny,
            "official_dir": args.official_dir,
            "parts": {},
        }
        self.env = dict(
            os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1"
        )
        if args.device == "cpu":
            self.env.setdefault("OMP_NUM_THREADS", str(args.threads))

    # ----------------------------------------------------------------- plumbing
    def save(self) -> None:
        path = self.out / "gpu_suite.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sh(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> str:
        """Run ``cmd`` (log to OUT/NAME.log); raise on failure or timeout; return its output."""
        timeout = max(1.0, min(timeout, self.left()))
        log = self.out / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                proc = subprocess.run(
                    cmd, cwd=REPO, env=env or self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{name}: no result within {timeout:.0f} s (log: {log.name})") from None
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: exit {proc.returncode}; last lines:\n" + "\n".join(text.splitlines()[-15:]))
        return text

    def part(self, name: str, cap_s: float, fn) -> None:  # noqa: ANN001
        entry: dict = {"cap_s": cap_s}
        self.record["parts"][name] = entry
        if self.left() < 15:
            entry.update(status="skipped", error="no time left in the suite's budget")
            self.save()
            return
        print(f"== {name} (up to {min(cap_s, self.left()):.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            entry["result"] = fn(min(cap_s, self.left()))
            entry["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one part failing must not stop the suite
            entry["status"] = "timeout" if isinstance(exc, TimeoutError) else "error"
            entry["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        print(
            f"   {entry['status']} in {entry['wall_s']} s" + (f": {entry['error'][:300]}" if "error" in entry else ""),
            flush=True,
        )
        self.save()

    # ----------------------------------------------------------------- the official code
    def official_dir(self) -> Path:
        shared = Path(self.args.official_dir).resolve()
        dest = REPO / ".official"
        if not (dest / "SoCo" / "contrast").is_dir():
            tarballs = sorted(shared.glob("SoCo-official-*.tar.gz")) + sorted(dest.glob("SoCo-official-*.tar.gz"))
            if not tarballs:
                raise FileNotFoundError(f"no SoCo-official-*.tar.gz in {shared}")
            dest.mkdir(exist_ok=True)
            with tarfile.open(tarballs[-1]) as tar:
                tar.extractall(dest)
        return shared

    def official_step(self, amp: str, timeout: float) -> dict:
        shared = self.official_dir()
        env = dict(self.env, SOCO_DIR=str(REPO / ".official" / "SoCo"), PEER_DIR=str(REPO / ".official"))
        out = self.work / f"official_{amp}.json"
        a = self.args
        if a.tiny:
            cmd = ["--device", a.device, "--batch", "2", "--steps", "1", "--warmup", "0", "--threads", str(a.threads)]
        else:
            cmd = ["--device", a.device, "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        if amp != "fp32":
            cmd += ["--amp", "--amp-dtype", amp]
        self.sh(
            f"official_{amp}",
            [sys.executable, str(shared / "official_step.py"), *cmd, "--json", str(out)],
            timeout,
            env,
        )
        res = json.loads(out.read_text())
        res.pop("runs", None)
        res["losses"] = res.get("losses", [])[-3:]
        return res

    def ceiling(self, timeout: float) -> dict:
        if self.args.device != "cuda":
            return {"skipped": "ceiling.py needs CUDA"}
        text = self.sh(
            "ceiling",
            [
                sys.executable,
                str(Path(self.args.official_dir) / "ceiling.py"),
                "--batch",
                "256",
                "--steps",
                "30",
                "--warmup",
                "10",
            ],
            timeout,
        )
        m = re.search(r"([\d.]+) ms/step, (\d+) img/s", text)
        line = [row for row in text.splitlines() if "ceiling" in row][-1:]
        return {
            "ms_per_step": float(m.group(1)) if m else None,
            "img_per_s": float(m.group(2)) if m else None,
            "line": line[0] if line else None,
        }

    # ----------------------------------------------------------------- ours
    def ours(
        self,
        timeout: float,
        batch: int | None = None,
        amps=("bf16", "fp16"),  # noqa: ANN001
        modes=("all_levels", "assigned_level"),
        compare=True,
        name: str = "ours",
    ) -> dict:
        a = self.args
        out = self.work / f"{name}.json"
        if a.tiny:
            cmd = [
                "--recipe",
                "tiny_cpu",
                "--batch-size",
                "4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--amp",
                "none",
                "--threads",
                str(a.threads),
            ]
        else:
            cmd = [
                "--recipe",
                "soco_fpn_r50_100ep",
                "--batch-size",
                str(batch or a.batch),
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
                "--amp",
                *amps,
            ]
        cmd += ["--device", a.device, "--roi-modes", *modes, "--json", str(out)]
        if compare:
            cmd.append("--compare-batched")
        self.sh(name, [sys.executable, "benchmarks/train_step.py", *cmd], timeout)
        return json.loads(out.read_text())

    def lars(self, timeout: float) -> dict:
        out = self.work / "lars.json"
        depth = "18" if self.args.tiny else "50"
        self.sh(
            "lars",
            [
                sys.executable,
                "benchmarks/lars_step.py",
                "--device",
                self.args.device,
                "--depth",
                depth,
                "--steps",
                "3" if self.args.tiny else "20",
                "--json",
                str(out),
            ],
            timeout,
        )
        return json.loads(out.read_text())

    def gpu_tests(self, timeout: float) -> dict:
        try:
            text = self.sh(
                "gpu_tests",
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_gpu.py"],
                timeout,
            )
            ok = True
        except RuntimeError as exc:  # failures: keep the counts and the tail
            text, ok = str(exc) + "\n" + (self.out / "gpu_tests.log").read_text(errors="replace"), False
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text)}
        tail = text.splitlines()[-30:]
        if not ok:
            raise RuntimeError(json.dumps({"counts": counts, "tail": tail}))
        return {"counts": counts, "tail": tail[-5:]}

    # ----------------------------------------------------------------- end to end from JPEGs
    def end_to_end(self, timeout: float) -> dict:
        a = self.args
        t_end = time.monotonic() + timeout
        data = self.work / "e2e"
        if a.tiny:
            n, size, recipe, batch, steps, log_every = 48, 96, "tiny_cpu", 4, 6, 2
            extra = []
        else:
            n, size, recipe, batch, steps, log_every = (
                a.batch * (a.e2e_steps + 2),
                375,
                "soco_fpn_r50_100ep",
                a.batch,
                a.e2e_steps,
                5,
            )
            extra = ["train.loop.amp=bf16"]
        images = data / "images" / "unlabeled"
        if not (data / "props").exists():
            shutil.rmtree(data, ignore_errors=True)
            self.sh(
                "e2e_synth",
                [
                    sys.executable,
                    "-m",
                    "soco_det",
                    "synth",
                    "-o",
                    str(data),
                    "--unlabeled",
                    str(n),
                    "--train",
                    "0",
                    "--val",
                    "0",
                    "--size",
                    str(size),
                    "--workers",
                    str(a.workers),
                ],
                t_end - time.monotonic(),
            )
            self.sh(
                "e2e_proposals",
                [
                    sys.executable,
                    "-m",
                    "soco_det",
                    "proposals",
                    str(images),
                    "-o",
                    str(data / "props"),
                    "--method",
                    "random",
                    "--workers",
                    str(a.workers),
                ],
                t_end - time.monotonic(),
            )
        res: dict = {"images": n, "short_side": size, "batch": batch, "steps": steps, "workers": a.workers}
        modes = ("cpu", "device")
        for i, photometric in enumerate(modes):
            share = (t_end - time.monotonic()) / (len(modes) - i)  # each mode gets its share of the time
            run = self.work / f"e2e_run_{photometric}"
            shutil.rmtree(run, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "soco_det",
                "pretrain",
                "--recipe",
                recipe,
                "--images",
                str(images),
                "--proposals",
                str(data / "props"),
                "-o",
                str(run),
                "--device",
                a.device,
                f"data.batch_size={batch}",
                f"data.num_workers={a.workers}",
                f"data.photometric={photometric}",
                f"train.loop.max_steps={steps}",
                f"train.loop.log_every={log_every}",
                "train.loop.ckpt_every=1000000",
                "train.loop.progress=false",
                "train.loop.tensorboard=false",
                "model.sync_bn=false",
                *extra,
            ]
            if a.tiny:
                cmd.append(f"train.loop.cpu_threads={a.threads}")
            try:
                t0 = time.monotonic()
                self.sh(f"e2e_{photometric}", cmd, share)
                rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
                rates = [r["img_per_s"] for r in rows if "img_per_s" in r]
                # the first interval holds the workers' start and cuDNN autotuning
                res[photometric] = {
                    "img_per_s": median(rates[1:] or rates),
                    "per_interval": rates,
                    "wall_s": round(time.monotonic() - t0, 1),
                    "gpu_mem_mib": max((r.get("gpu_mem_mib", 0) for r in rows), default=None),
                    "loss_last": rows[-1].get("loss") if rows else None,
                }
            except Exception as exc:  # noqa: BLE001 - keep the other photometric mode
                res[photometric] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        if all("error" in res[m] for m in modes):
            raise RuntimeError(json.dumps(res))
        return res

    def parity(self, timeout: float) -> dict:
        out = self.work / "parity.json"
        cmd = [
            sys.executable,
            "benchmarks/official_parity.py",
            "--device",
            self.args.device,
            "--batch",
            "2" if self.args.tiny else "16",
            "--official-dir",
            self.args.official_dir,
            "--json",
            str(out),
        ]
        if self.args.device == "cpu":
            cmd += ["--threads", str(self.args.threads)]
        self.sh("parity", cmd, timeout)
        return json.loads(out.read_text())

    # ----------------------------------------------------------------- summary
    def summarise(self) -> None:
        parts = self.record["parts"]
        res = lambda name: parts.get(name, {}).get("result") or {}  # noqa: E731
        summary: dict = {}
        off16 = res("official_fp16").get("images_per_sec")
        off_bf16 = res("official_bf16").get("images_per_sec")
        summary["official"] = {
            "fp16": off16,
            "bf16": off_bf16,
            "fp16_mem_gib": res("official_fp16").get("max_mem_gib"),
            "bf16_mem_gib": res("official_bf16").get("max_mem_gib"),
        }
        ours = []
        for row in res("ours").get("rows", []) + res("ours_b256").get("rows", []):
            item = {
                k: row.get(k)
                for k in ("roi_mode", "batched_calls", "batched_backbone", "amp", "batch", "img_per_s", "peak_mem_mib")
            }
            if off16:
                item["x_official_fp16"] = row["img_per_s"] / off16
            if "batched_over_separate" in row:
                item["batched_over_separate"] = row["batched_over_separate"]
            ours.append(item)
        summary["ours"] = ours
        summary["ceiling_img_per_s"] = res("ceiling").get("img_per_s")
        synth = next(
            (
                r["img_per_s"]
                for r in ours
                if r["roi_mode"] == "all_levels"
                and r["batched_backbone"]
                and r["amp"] in ("bf16", "none")
                and r["batch"] == (4 if self.args.tiny else self.args.batch)
            ),
            None,
        )
        e2e = res("end_to_end")
        summary["end_to_end"] = {
            p: {
                "img_per_s": e2e.get(p, {}).get("img_per_s"),
                "x_synthetic_step": (e2e.get(p, {}).get("img_per_s") or 0) / synth if synth else None,
            }
            for p in ("cpu", "device")
        }
        summary["gpu_tests"] = res("gpu_tests").get("counts") or parts.get("gpu_tests", {}).get("error", "")[:500]
        summary["lars"] = res("lars")
        summary["parity"] = [
            {k: r.get(k) for k in ("ours", "loss_abs_diff", "bn_stat_max_rel", "grad_max_rel")}
            for r in res("parity").get("rows", [])
        ]
        self.record["summary"] = summary
        self.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (gpu_suite.json, one .log per part)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU rehearsal of the whole suite)")
    parser.add_argument("--budget-s", type=float, default=450, help="the whole suite's time budget (default 450 s)")
    parser.add_argument("--batch", type=int, default=128, help="images per step (official: 128 per GPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--e2e-steps", type=int, default=20, help="end-to-end pretraining steps per photometric mode")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader processes for the end-to-end runs (default: CPU count - 2, at most 14)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu)")
    parser.add_argument(
        "--official-dir",
        default=default_official_dir(),
        help="folder with SoCo-official-*.tar.gz, official_step.py, ceiling.py (default: the "
        "first of ../shared/official, shared/official, .official that has them)",
    )
    parser.add_argument("--parts", nargs="+", default=None, help="run only these parts (default: all)")
    parser.add_argument(
        "--cap-scale",
        type=float,
        default=None,
        help="multiply every part's time cap (default 1, 2 with --tiny; more on a busy CPU)",
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 2 if args.tiny else max(1, min(14, (os.cpu_count() or 4) - 2))
    suite = Suite(args)
    try:
        import torch

        suite.record["env"] = {
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpus": os.cpu_count(),
        }
    except Exception as exc:  # noqa: BLE001
        suite.record["env"] = {"error": repr(exc)}
    big = not args.tiny
    plan = [
        ("official_fp16", 90, lambda t: suite.official_step("fp16" if big or args.device == "cuda" else "fp32", t)),
        ("ours", 150, suite.ours),
        ("official_bf16", 75, lambda t: suite.official_step("bf16", t)),
        ("ceiling", 60, suite.ceiling),
        ("gpu_tests", 150, suite.gpu_tests),
        ("end_to_end", 150, suite.end_to_end),
        ("lars", 30, suite.lars),
        (
            "ours_b256",
            60,
            lambda t: suite.ours(
                t, batch=2 * args.batch, amps=("bf16",), modes=("all_levels",), compare=False, name="ours_b256"
            ),
        ),
        ("parity", 60, suite.parity),
    ]
    if args.tiny:  # the rehearsal: every part, tiny; b256 has nothing to add on a CPU
        plan = [p for p in plan if p[0] != "ours_b256"]
    for name, cap, fn in plan:
        if args.parts and name not in args.parts:
            continue
        suite.part(name, cap * (args.cap_scale or (1 if big else 2)), fn)
    suite.summarise()
    print(json.dumps(suite.record["summary"], indent=1, default=str))
    print(f"wrote {suite.out / 'gpu_suite.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
