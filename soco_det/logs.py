"""Logging set-up and progress reporting.

``setup_logging`` configures the ``soco_det`` logger once per process; under torchrun only rank 0
logs at INFO, other ranks log warnings and errors. ``progress`` wraps a loop in a progress bar with
rate and ETA when stderr is a terminal, and otherwise logs a short line every ``log_every_s``
seconds (10 by default), so CI logs and batch jobs stay readable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

LOGGER_NAME = "soco_det"


def get_rank() -> int:
    """The process's global rank from the torchrun environment (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int | str = logging.INFO, rank: int | None = None) -> logging.Logger:
    """Route the package's log records to stderr with a compact format; non-zero ranks only warn."""
    rank = get_rank() if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    logger.setLevel(level if rank == 0 else max(logging.WARNING, level))
    if not any(getattr(h, "_soco_det", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank{rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._soco_det = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the package logger (pass ``__name__``)."""
    if not name.startswith(LOGGER_NAME):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def format_duration(seconds: float) -> str:
    """``42s``, ``25m22s``, ``3h05m22s``: a duration that cannot be read as a time of day (log lines
    start with one)."""
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h:d}h{m:02d}m{s:02d}s"
    return f"{m:d}m{s:02d}s" if m else f"{s:d}s"


class Progress:
    """A progress reporter usable as an iterator wrapper or updated by hand.

    On a TTY (and rank 0) it draws a tqdm bar with rate and ETA; otherwise it logs
    ``desc: n/total (rate unit/s, ETA 25m22s) postfix`` at most every ``log_every_s`` seconds.
    ``disable`` turns both off. The postfix (:meth:`set_postfix`) may be a function, called only
    when a log line is written: the line then shows the value of that moment (the loss of the
    latest step, say) at the cost of one call per line, not one per update.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        log_every_s: float = 10.0,
        initial: int = 0,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self._start_n = initial
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self.log_every_s = log_every_s
        self._postfix: str | Callable[[], str] = ""
        self._logger = get_logger("progress")
        self._bar = None
        self._quiet = disable or get_rank() != 0
        if not self._quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        return (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return (self.total - self.n) / self.rate

    @property
    def is_bar(self) -> bool:
        """Whether a terminal bar is drawn (else log lines, or nothing)."""
        return self._bar is not None

    def set_postfix(self, text: str | Callable[[], str]) -> None:
        """Text after the rate: a string, or a function of none that gives it when a log line is
        written (a bar keeps the last string it was given)."""
        self._postfix = text
        if self._bar is not None and isinstance(text, str):
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if not self._quiet and now - self._last_log >= self.log_every_s:
            self._last_log = now
            self._logger.info(self.line())

    def line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        eta = self.eta()
        eta_text = f", ETA {format_duration(eta)}" if eta is not None else ""
        postfix = self._postfix() if callable(self._postfix) else self._postfix
        post = f" {postfix}" if postfix else ""
        return f"{self.desc}: {self.n}{total} ({self.rate:.2f} {self.unit}/s{eta_text}){post}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False
) -> Iterator[T]:
    """Iterate ``iterable`` while reporting progress (see :class:`Progress`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, desc=desc, unit=unit, disable=disable) as bar:
        for item in iterable:
            yield item
            bar.update(1)
