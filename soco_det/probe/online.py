"""The object probe as a pretraining hook (``train.probe.every``): object-level quality as it grows.

Every ``train.probe.every`` steps (a multiple of ``train.loop.log_every``), the online encoder, FPN and
box head are copied, their BatchNorm statistics re-estimated on the probe images, and the
read-outs of :func:`soco_det.probe.probe.run_probe` (``train.probe.tasks``; linear and k-NN top-1
and the effective rank by default: a few seconds on a small set) are logged with the loss as
``probe/<feature>_<score>`` (e.g. ``probe/roi_linear_top1``). The training state is not touched.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from soco_det.logs import get_logger
from soco_det.models.soco import FPN_STRIDES
from soco_det.probe.network import ProbeNetwork
from soco_det.probe.objects import read_objects, spec_from_config
from soco_det.probe.probe import run_probe

log = get_logger(__name__)


class OnlineProbe:
    """A metrics source for :class:`~soco_det.engine.hooks.MetricsHook` (``metrics(trainer)``)."""

    def __init__(self, cfg: Any) -> None:
        probe = cfg.train.probe
        self.every, self.tasks = probe.every, tuple(probe.tasks)
        self.spec = spec_from_config(cfg)
        self.train = read_objects(probe.train_json, probe.images, probe.max_images)
        self.val = read_objects(probe.val_json, probe.images, probe.max_images, categories=self.train.categories)
        log.info(
            "online probe every %d steps: %d train / %d val objects (%s)",
            self.every,
            len(self.train),
            len(self.val),
            " ".join(self.tasks),
        )

    def network(self, model: Any) -> ProbeNetwork:
        online = model.online
        return ProbeNetwork(
            encoder=copy.deepcopy(online["encoder"]),
            neck=copy.deepcopy(online["neck"]),
            head=copy.deepcopy(online["head"]),
            strides=tuple(FPN_STRIDES[: model.cfg.num_levels]),
            roi_size=model.cfg.resolved_roi_output_size(),
            name="online",
        )

    def metrics(self, trainer: Any) -> dict[str, float]:
        if trainer.step % self.every and trainer.step < trainer.stop_step:
            return {}
        result = run_probe(
            self.network(trainer.model),
            self.train,
            self.val,
            self.spec,
            trainer.device,
            task_names=self.tasks,
            copy_network=False,
        )
        record = {
            f"probe/{kind}_{name}": float(np.nanmean(v))
            for kind, scores in result.scores.items()
            for name, v in scores.items()
            if name.endswith("top1")
        }
        for kind, scores in result.scores.items():
            if "loc_err" in scores:
                record[f"probe/{kind}_loc_r2"] = float(
                    1 - scores["loc_err"].sum() / max(scores["loc_dev"].sum(), 1e-12)
                )
        record.update({f"probe/{kind}_effective_rank": r for kind, r in result.ranks.items()})
        record["probe/seconds"] = result.seconds
        return record
