"""Give back the pages of memory-mapped input checkpoints once they have been read.

Why: safetensors (0.8) hands mergekit tensors that are views of a private mapping of
the whole shard file, and mergekit keeps a shard open for as long as it reads from it.
Every page a merge has read therefore stays in the process's resident set until the
shard is closed: for a single-file checkpoint, until the end of the merge. Peak RSS then
grows with the model (2.4 GB of file pages for a Qwen3-0.6B pair) although each page is
read once or twice. `release(view)` tells the kernel (madvise MADV_DONTNEED) that the
pages under a view are not needed now: they leave the resident set and, if read again,
come back unchanged from the page cache (a minor fault, no disk read while the page
cache holds them).

Safety: only pages of a file mapping of a ``*.safetensors`` file are released, and only
those that still hold the file's data (per /proc/self/pagemap: a file page, or not
resident and not swapped). A page someone wrote to (a private copy) is kept, and so is
any memory that is not such a mapping. Anything unexpected (not Linux, no /proc,
madvise refused) makes it a no-op. MERGEKIT_TIMBER_KEEP_INPUT_PAGES=1 turns it off.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import sys
from typing import List, Optional, Tuple

import torch

from mergekit_timber.flags import flag

_MADV_DONTNEED = 4
_SUFFIX = ".safetensors"
# "madvise": the libc function (None when unavailable); "spans": the last reading of
# the checkpoint mappings (reading /proc/self/maps costs ~2 ms in a torch process, so
# it is read again only when a tensor lies outside every known mapping).
_STATE: dict = {}


def enabled() -> bool:
    return sys.platform.startswith("linux") and not flag("MERGEKIT_TIMBER_KEEP_INPUT_PAGES")


def _madvise():
    if "madvise" not in _STATE:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _STATE["madvise"] = fn
    return _STATE["madvise"]


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def _checkpoint_mappings() -> List[Tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's mappings of *.safetensors files."""
    spans = []
    with open("/proc/self/maps", "rb") as fh:
        for line in fh:
            if not line.rstrip().endswith(_SUFFIX.encode()):
                continue
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or b"r" not in fields[1]:
                continue
            lo, hi = fields[0].split(b"-")
            spans.append((int(lo, 16), int(hi, 16)))
    return sorted(spans)


def _containing(spans: List[Tuple[int, int]], lo: int, hi: int) -> Optional[Tuple[int, int]]:
    i = bisect.bisect_right(spans, (lo, float("inf"))) - 1
    if i >= 0 and spans[i][0] <= lo and hi <= spans[i][1]:
        return spans[i]
    return None


def _mapping_of(lo: int, hi: int) -> Optional[Tuple[int, int]]:
    """The checkpoint mapping holding [lo, hi), from the cached reading if it is there.

    A cached range may be stale (its file closed, the addresses reused); the pagemap
    check in _droppable_runs still keeps every page holding data of its own.
    """
    found = _containing(_STATE.get("spans", []), lo, hi)
    if found is None:
        _STATE["spans"] = _checkpoint_mappings()
        found = _containing(_STATE["spans"], lo, hi)
    return found


def _byte_span(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """[first, last + 1) byte addresses a strided CPU tensor covers, or None."""
    if t.device.type != "cpu" or t.numel() == 0 or t.is_sparse or t.is_quantized:
        return None
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (extent + 1) * t.element_size()


def _page_flags(first_page: int, pages: int) -> Optional[torch.Tensor]:
    """The /proc/self/pagemap entries (int64) of `pages` pages from `first_page`."""
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(first_page * 8)
        raw = fh.read(pages * 8)
    if len(raw) != pages * 8:
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.int64)


def _bit(flags: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit `bit` of each pagemap entry: 63 resident, 62 swapped, 61 file page."""
    return ((flags >> bit) & 1).bool()


def _droppable_runs(flags: torch.Tensor) -> List[Tuple[int, int]]:
    """Runs (first index, count) of pages that still hold the file's data."""
    present, swapped, file_page = _bit(flags, 63), _bit(flags, 62), _bit(flags, 61)
    keep = (present & ~file_page) | (~present & swapped)  # private copies, swapped-out copies
    if not bool(keep.any()):
        return [(0, flags.numel())]
    runs, start = [], None
    for i, kept in enumerate(keep.tolist()):
        if not kept and start is None:
            start = i
        elif kept and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, flags.numel() - start))
    return runs


def release(*tensors: Optional[torch.Tensor]) -> int:
    """Drop the resident pages under each tensor that is a view of a mapped checkpoint.

    Returns the number of bytes advised away (0 when nothing applied). Never raises.
    """
    if not enabled():
        return 0
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    try:
        page = _page_size()
        for t in tensors:
            span = None if t is None else _byte_span(t)
            if span is None:
                continue
            lo, hi = span[0] // page, -(-span[1] // page)  # whole pages around the view
            flags = _page_flags(lo, hi - lo)
            # Ordinary memory (no resident file page): nothing to do, no maps lookup.
            if flags is None or not bool((_bit(flags, 63) & _bit(flags, 61)).any()):
                continue
            mapping = _mapping_of(*span)
            if mapping is None:
                continue
            # Neighbouring bytes on the edge pages belong to other tensors of the same
            # file: equally safe to drop, but stay inside the mapping.
            first, last = max(lo, mapping[0] // page), min(hi, mapping[1] // page)
            for start, count in _droppable_runs(flags[first - lo : last - lo]):
                if madvise((first + start) * page, count * page, _MADV_DONTNEED) == 0:
                    released += count * page
    except Exception:  # an optimisation: whatever goes wrong, the merge goes on as before
        return released
    return released
