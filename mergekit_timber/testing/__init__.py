"""Helpers for the tests, the demo and the benchmark (not the product).

Nothing in mergekit_timber outside this sub-package imports it: it builds local
Base/Instruct pairs (`python -m mergekit_timber.testing.synthetic --help`).
"""
