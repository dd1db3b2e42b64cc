"""The SoCo data stream: epochs of the dataset, ``accum_steps`` micro-batches per optimizer step.

:class:`EpochStream` owns where the run is in its data: the epoch, the position in it
(``sampler.position``, resumable mid-epoch), the loader iterator of the epoch under way and, on
CUDA, the next step's batches already being copied to the device (:mod:`soco_det.engine.prefetch`).
An epoch's tail that cannot fill a step is skipped, as is an epoch whose remaining micro-batches
cannot. The trainer asks it for a step's micro-batches (:meth:`EpochStream.next`) and tells it when
the step is queued (:meth:`EpochStream.advance`); the stream never sees the model.
"""

from __future__ import annotations

from typing import Any

import torch

from soco_det.data.device_photometric import apply_device_photometric
from soco_det.engine.distributed import ResumableSampler
from soco_det.engine.loop import move_to
from soco_det.engine.prefetch import CopyStream


class EpochStream:
    """``accum_steps`` micro-batches at a time from ``loader`` (over ``sampler``, a
    :class:`~soco_det.engine.distributed.ResumableSampler` of ``dataset``), moved to ``device``.

    ``steps_per_epoch``: optimizer steps in one epoch of this process; ``images_per_step``: images of
    one optimizer step over all processes. ``channels_last`` stores 4-D batches NHWC;
    ``device_photometric`` (``data.photometric=device``) runs the views' colour, blur, solarize,
    normalisation and cutout on the device (the loader sent uint8 views).
    """

    def __init__(
        self,
        *,
        loader: torch.utils.data.DataLoader,
        sampler: ResumableSampler,
        dataset: Any,
        accum_steps: int,
        steps_per_epoch: int,
        images_per_step: int,
        device: torch.device,
        channels_last: bool = False,
        device_photometric: bool = False,
    ) -> None:
        self.loader, self.sampler, self.dataset = loader, sampler, dataset
        self.accum_steps, self.steps_per_epoch, self.images_per_step = accum_steps, steps_per_epoch, images_per_step
        self.device, self.channels_last, self.device_photometric = device, channels_last, device_photometric
        self.epoch = 0
        self.skipped_images = 0  # bad images replaced, in this process since the start (or resume) of the run
        self._copies = CopyStream(device)  # the next batch's host-to-device copies (CUDA only)
        self._iterator: Any = None  # over the loader, for the epoch under way
        self._pending: list | None = None  # the next step's micro-batches, already being copied
        self._done_micro = 0  # micro-batches of this epoch consumed on this process

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum_steps

    # ------------------------------------------------------------------ batches
    def prepare(self, batch: dict) -> dict:
        """A collated batch on the device, as the model reads it (device photometric applied)."""
        if self.device_photometric:
            batch = apply_device_photometric(move_to(batch, self.device))
        return move_to(batch, self.device, self.channels_last)

    def _fetch(self) -> list:
        """The next ``accum_steps`` micro-batches; on CUDA their copies to the device have started."""
        micro = [next(self._iterator) for _ in range(self.accum_steps)]
        # bad images the dataset replaced (counted in the workers, reported here)
        self.skipped_images += sum(int(b["skipped"].sum()) for b in micro if "skipped" in b)
        return self._copies.start(micro, lambda b: move_to(b, self.device))

    def _start_epoch(self) -> None:
        """Iterate the epoch ``self.epoch`` from ``sampler.position`` (skipping an epoch whose
        remaining micro-batches cannot fill a step)."""
        batch_size = self.loader.batch_size
        while True:
            self.sampler.set_epoch(self.epoch, self.sampler.position)
            self.dataset.set_epoch(self.epoch)
            self._done_micro = self.sampler.position // batch_size
            if self.micro_per_epoch - self._done_micro >= self.accum_steps:
                break
            self.epoch, self.sampler.position = self.epoch + 1, 0
        self._iterator = iter(self.loader)

    def next(self) -> list[dict]:
        """The micro-batches of the next optimizer step, on the device."""
        if self._iterator is None:
            self._start_epoch()
        micro = self._pending if self._pending is not None else self._fetch()
        self._pending = None
        return [self.prepare(self._copies.arrived(b)) for b in micro]

    def advance(self, more_steps: bool) -> bool:
        """The step that :meth:`next` fed is queued on the device: count it, and (on CUDA, when
        ``more_steps`` follow in this epoch) load and start copying the next one meanwhile.
        Returns whether that step ended the epoch."""
        more = self._done_micro + 2 * self.accum_steps <= self.micro_per_epoch and more_steps
        self._pending = self._fetch() if more and self._copies.enabled else None
        self._done_micro += self.accum_steps
        self.sampler.position = self._done_micro * self.loader.batch_size
        ended = self._done_micro + self.accum_steps > self.micro_per_epoch
        if ended:
            self.epoch, self.sampler.position = self.epoch + 1, 0
            self._iterator = None  # the loader's workers end with it
        return ended

    def close(self) -> None:
        """Drop the loader iterator (its workers exit) and any prefetched batches."""
        self._iterator = self._pending = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``sampler`` entry: ``{"epoch", "global_position", "seed"}``."""
        return {**self.sampler.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, sampler_state: dict[str, Any], epoch: int) -> None:
        self.epoch = epoch
        self.sampler.load_state_dict(sampler_state)
