"""soco-det: SoCo (Selective Object COntrastive learning) pretraining for detectors.

The package follows the pipeline: ``proposals`` -> ``data`` -> ``models`` -> ``losses`` ->
``engine`` -> ``export`` / ``transfer``, with one command-line entry point in ``cli``.
"""

__version__ = "0.1.0"
