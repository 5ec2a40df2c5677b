"""Checks before the first tensor of a Timber merge (placeholder: the preflight branch fills it)."""

from __future__ import annotations


def check(merge_config, options) -> None:
    """Raise a TimberError subclass naming the culprit if the merge cannot succeed.

    Called by mergekit_timber.seam for every Timber merge before any work and before
    the output directory is touched.
    """
    return None
