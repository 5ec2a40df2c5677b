"""mergekit's options in its worker threads, for the length of a Timber merge.

`mergekit-yaml --multi-gpu` runs tensors in worker threads. mergekit's `LoaderCache`
is a singleton per thread whose options (`trust_remote_code`, the cache folders,
`lazy_unpickle`, `lora_merge_dtype`) `run_merge` sets up on the main thread only: a
worker's instance starts from the class defaults, so a worker that reads a model's
config (layout.architecture_of_model) would do it with `trust_remote_code=False` and a
remote-code model would fail there. `options_in_every_thread` makes the options the
class defaults while a Timber merge runs, so every thread's instance starts with them,
and puts mergekit's defaults back afterwards. What `LoaderCache.setup` sets is taken
from mergekit itself (it runs on a scratch instance), so an option mergekit adds is
carried too.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_LOCK = threading.Lock()


def loader_options(options) -> dict:
    """The attributes mergekit's `LoaderCache.setup(options)` sets, and their values."""
    from mergekit.io.tasks import LoaderCache

    scratch = object.__new__(LoaderCache)  # not the per-thread singleton: setup only fills it
    LoaderCache.setup(scratch, options)
    return dict(vars(scratch))


@contextlib.contextmanager
def options_in_every_thread(options) -> Iterator[None]:
    """Within: a `LoaderCache()` made in any thread starts with `options` (module docstring)."""
    from mergekit.io.tasks import LoaderCache

    values = loader_options(options)
    with _LOCK:
        previous = {name: LoaderCache.__dict__[name] for name in values if name in LoaderCache.__dict__}
        for name, value in values.items():
            setattr(LoaderCache, name, value)
    try:
        yield
    finally:
        with _LOCK:
            for name in values:
                if name in previous:
                    setattr(LoaderCache, name, previous[name])
                else:
                    delattr(LoaderCache, name)
