"""`soco-det demo` rerun in the same folder: earlier results are continued only when they come from
the same settings and scenes; otherwise they are moved aside, never mixed with the new scenes."""

from __future__ import annotations

from pathlib import Path

from soco_det.commands.demo import DemoContext, claim_demo_folder
from soco_det.synth import generate


def _scenes(ctx: DemoContext, seed: int) -> None:
    paths = generate(ctx.out / "scenes", n_unlabeled=2, n_train=2, n_val=1, short_side=64, seed=seed)
    ctx.paths.update({f"scenes_{k}": Path(v) for k, v in paths.items()})


def _results(out: Path) -> Path:
    ckpt = out / "pretrain" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    return ckpt


def test_a_rerun_continues_the_same_demo_and_moves_another_one_aside(tmp_path):
    out = tmp_path / "demo_out"
    ctx = DemoContext(out=out)
    _scenes(ctx, seed=0)
    claim_demo_folder(ctx)  # a first run: nothing to move
    ckpt = _results(out)

    again = DemoContext(out=out)
    _scenes(again, seed=0)
    claim_demo_folder(again)  # same settings, same scenes: the checkpoint is continued
    assert ckpt.is_file() and not list(tmp_path.glob("demo_out.old-*"))

    other = DemoContext(out=out, finetune_iters=40)
    _scenes(other, seed=0)
    claim_demo_folder(other)  # other settings: the old results move aside, the new scenes stay
    (aside,) = tmp_path.glob("demo_out.old-*")
    assert (aside / "pretrain" / "checkpoints" / "last.pt").read_bytes() == b"weights"
    assert not (out / "pretrain").exists() and (out / "scenes" / "train.json").is_file()

    _results(out)
    regenerated = DemoContext(out=out, finetune_iters=40)
    _scenes(regenerated, seed=1)  # the same settings but other scenes (e.g. a new scene generator)
    claim_demo_folder(regenerated)
    assert len(list(tmp_path.glob("demo_out.old-*"))) == 2 and not (out / "pretrain").exists()


def test_the_report_says_where_the_detection_ap_benchmark_is(tmp_path):
    from soco_det.commands.demo import _transfer_report

    ctx = DemoContext(out=tmp_path, finetune_iters=20)
    ctx.paths["pretrain"] = tmp_path / "pretrain"
    ap = {"AP": 0.001, "AP50": 0.004, "AP75": 0.0}
    lines = _transfer_report(
        ctx, [("untrained", {"bbox": ap, "segm": ap}), ("SoCo", {"bbox": ap, "segm": ap})], "x.png"
    )
    text = "\n".join(lines)
    assert (
        "Detection AP: see docs/results.md, section 'Detection AP on two CPU cores' "
        "(python benchmarks/transfer.py --preset cpu_ap)" in text
    )
    assert f"--init untrained:{tmp_path / 'pretrain'}" in text
    assert "| untrained | 0.10 | 0.40 | 0.00 |" in text
