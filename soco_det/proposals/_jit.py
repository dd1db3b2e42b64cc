"""``njit`` with an on-disk cache that degrades gracefully.

Compiled kernels are cached next to the source (``__pycache__``) so tests and loader workers do not
recompile on every start. When no cache location is writable (a read-only install and no writable
home), numba refuses ``cache=True`` at decoration time; we then compile in memory instead of failing.
"""

from __future__ import annotations

import warnings

import numba


def njit(fn):
    """``numba.njit(cache=True)(fn)``, or ``numba.njit(fn)`` where caching is impossible."""
    try:
        return numba.njit(cache=True)(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        warnings.warn(f"numba cache unavailable ({exc}); compiling {fn.__name__} in memory", RuntimeWarning)
        return numba.njit(fn)
