"""Session-wide test settings.

Tests run with one intra-op thread by default: several tests start 2-process DDP groups or proposal
worker pools, and oversubscribed cores make small convolutions many times slower. Set
``SOCO_TEST_THREADS`` to change it.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SOCO_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
