"""Copy the next batch to the GPU while the current step runs.

The trainer asks the loader for step ``t+1`` right after it has queued step ``t`` on the device (no
host synchronisation happens in between), and :class:`CopyStream` issues the batch's host-to-device
copies on a side CUDA stream, so they overlap the step's kernels instead of waiting behind them on
the compute stream. The loader pins its batches (``pin_memory=True`` on CUDA), which the
asynchronous copies need. Off CUDA every method is a no-op.
"""

from __future__ import annotations

from typing import Any

import torch


def _tensors(obj: Any):  # noqa: ANN201
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class CopyStream:
    """A side CUDA stream for batch copies; ``enabled`` is False (and nothing happens) off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def start(self, batches: list, move) -> list:  # noqa: ANN001
        """``[move(b) for b in batches]`` issued on the side stream (asynchronous from pinned memory)."""
        if self.stream is None:
            return batches
        with torch.cuda.stream(self.stream):
            return [move(b) for b in batches]

    def arrived(self, batch: Any) -> Any:
        """Make the compute stream wait for ``batch``'s copies before using it."""
        if self.stream is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in _tensors(batch):
            if t.device.type == "cuda":
                t.record_stream(current)  # its memory is reused only once the compute stream is done
        return batch
