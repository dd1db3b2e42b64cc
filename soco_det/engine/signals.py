"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (cluster preemption), for the training loops.

``with GracefulStop() as stop:`` installs handlers for both signals (main thread only). The first
signal only sets ``stop.signum``: the loop finishes its current step, saves a checkpoint and raises
:class:`~soco_det.errors.Interrupted`. A second signal exits at once (``KeyboardInterrupt`` for SIGINT,
``SystemExit(128 + signum)`` for SIGTERM). Under ``torchrun`` every process asks
:meth:`GracefulStop.requested`, which all-reduces the flag, so all ranks stop after the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from soco_det.logs import get_logger

log = get_logger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(*_: Any) -> None:
    """``worker_init_fn`` for data-loader workers: leave SIGINT/SIGTERM to the main process (a
    terminal's Ctrl-C reaches the whole process group; the workers exit with their parent)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class GracefulStop:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            log.warning("second %s: exiting now without saving", signal.Signals(signum).name)
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then saving a checkpoint (send it again to exit at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self) -> bool:
        """Whether any process got a stop signal (a collective call under torch.distributed)."""
        # lazy: this module stays torch-free (loader workers import it for ignore_stop_signals)
        from soco_det.engine import distributed as dist_utils

        flag = self.signum is not None
        if dist_utils.is_initialized() and dist_utils.world_size() > 1:
            import torch
            import torch.distributed as dist

            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.signum is None:
                self.signum = int(signal.SIGTERM)
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
