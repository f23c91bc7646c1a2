"""The pmakit benchmarks, a package: run one from the repository root as ``python -m benchmarks.update``."""
