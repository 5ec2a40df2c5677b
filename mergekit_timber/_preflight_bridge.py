"""TEMPORARY bridge (issue 11): run preflight.check before mergekit.merge.run_merge.

mergekit reads model configs and every safetensors header (get_architecture_info, the
loader-cache warm-up) before it plans anything, so the earliest point that sees a
missing path or a garbled file is run_merge itself. This module wraps it for Timber
merges until `mergekit_timber.seam` (issue 10) does and calls `preflight.check` there;
then this module and its FOLLOW_UP entry in _hook.py go. Imported right after mergekit
executed mergekit.merge, so `from mergekit.merge import run_merge` (mergekit-yaml, the
sweep, the Python API) gets the wrapper.
"""

import functools

import mergekit.merge as _merge

from mergekit_timber import preflight


def _wrap(run_merge):
    @functools.wraps(run_merge)
    def checked(merge_config, out_path, options, config_source=None):
        preflight.check(merge_config, options, source=config_source)
        return run_merge(merge_config, out_path, options=options, config_source=config_source)

    checked._timber_preflight = True
    return checked


if not getattr(_merge.run_merge, "_timber_preflight", False):
    _merge.run_merge = _wrap(_merge.run_merge)
