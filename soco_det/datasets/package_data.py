"""Files that an installed package ships, found without importing the package.

A data set that a registry package ships inside its wheel is read from the installed files: the
package's folder comes from :func:`importlib.util.find_spec`, which locates a package without running
its ``__init__`` (``stardist``'s would load csbdeep, numba and compiled extensions). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from soco_det.errors import UserError


def package_folder(package: str, pip_name: str, purpose: str) -> Path:
    """The folder of the installed top-level ``package``; a :class:`UserError` with the pip command
    (``pip install PIP_NAME``) when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(
            f"{purpose} is read from the files of the package {pip_name!r}, which is not installed: "
            f"pip install {pip_name}   (or pip install 'soco-det[datasets]')"
        )
    return Path(locations[0])


def package_file(package: str, relative: str, pip_name: str, purpose: str) -> Path:
    """``relative`` inside the installed ``package``; a :class:`UserError` naming the file when the
    installation lacks it (an incomplete or incompatible version)."""
    path = package_folder(package, pip_name, purpose) / relative
    if not path.is_file():
        raise UserError(
            f"{path}: missing from the installed package {pip_name!r} (needed for {purpose}); "
            f"reinstall it: pip install --force-reinstall {pip_name}"
        )
    return path
