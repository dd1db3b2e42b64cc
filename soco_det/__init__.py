"""soco-det: SoCo (Selective Object COntrastive learning) pretraining for detectors.

The package follows the pipeline: ``synth`` (sample scenes) -> ``proposals`` -> ``data`` (views) ->
``models`` and ``losses`` -> ``engine`` (pretraining) -> ``export`` / ``probe`` / ``transfer``, with
the command line in ``commands`` (docs/architecture.md, "A one-page tour").
"""

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic), and so
# does `soco-det --version`.
__version__ = "0.1.0"
