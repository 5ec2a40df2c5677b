"""Bytes of tensors alive at once, as torch allocates them for Python code (test helper).

Every tensor an op returns under `LiveBytes` is counted by its storage from the moment
it is returned until the last Python reference to that storage's tensors dies.
Storages of `outside` tensors (the inputs, caller-made outputs) are never counted.
Memory an op uses inside itself (a solver's workspace) is not seen: the kernel's memory
model counts that separately (its `fixed` term).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, outside=()):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in outside}
        self.refs = {}  # storage pointer -> [live tensors, bytes]
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.outside or storage.nbytes() == 0:
            return
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [0, storage.nbytes()]
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.refs[key]
