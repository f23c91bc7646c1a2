"""The pmakit examples, a package so that they share code by import: run one from the repository root as
``python -m examples.pretrain_pma`` (likewise every script here).

`examples.models` (the shared Llama builder) is imported by the benchmarks and the test helpers too.
"""
