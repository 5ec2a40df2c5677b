"""Pin the CPU math code paths of the toy studies, so any x86-64 CPU gives the same bits.

Import this module before torch (the toy scripts do, as their first import). Training the
toy pair is chaotic: the last bit of one matrix product, changed by the instruction set a
library picks for the CPU it finds (AVX-512 here, AVX2 there), grows into other weights and
other Pass@k. These settings make every library take the same path on every x86-64 CPU:

- MKL_CBWR=COMPATIBLE,STRICT: MKL's conditional numerical reproducibility, its code path
  for any x86-64 CPU (SSE2), Intel or AMD, whatever MKL_ENABLE_INSTRUCTIONS says; STRICT
  also makes the results independent of how the arrays happen to be aligned in memory.
- ATEN_CPU_CAPABILITY=default: torch's own kernels (attention, norms, softmax, AdamW)
  in their baseline build instead of the AVX2/AVX-512 one chosen for this CPU.
- ONEDNN_MAX_CPU_ISA=SSE41 and torch.backends.mkldnn off: oneDNN picks its kernels by
  CPU too; the toy's float32 ops do not need it.
- one thread (MKL, OpenMP, torch): a sum split over threads adds in another order.

They are set, not defaulted: a value the caller's environment holds would make the run
differ from the README's. Child processes (mergekit-yaml, mergekit-timber, Ray workers)
inherit them. Imported by a program that already runs torch (the test suite building a
pair in-process), it changes nothing: too late for this process, and not its business to
change the environment of that program's other children.
Cost: training takes about 1.5x as long as on this CPU's fastest paths.
"""

from __future__ import annotations

import os
import platform
import sys

PINNED = {
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "DNNL_MAX_CPU_ISA": "SSE41",  # the older name of the same setting
    "MKL_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
# Too late once torch is imported: it has read its capability, and MKL may be set up.
ACTIVE = "torch" not in sys.modules
if ACTIVE:
    os.environ.update(PINNED)


def pin_torch(threads: int = 1) -> None:
    """The settings torch reads at run time; call in each process that computes. More than
    one thread is allowed (the toy scripts' --threads) but gives other numbers."""
    import torch

    torch.set_num_threads(threads)
    if ACTIVE:
        torch.backends.mkldnn.enabled = False


def cpu_model() -> str:
    """The CPU's model and vendor, as /proc/cpuinfo names them (or what platform knows)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    about = [fields.get("vendor_id") or platform.machine()]
    if "cpu family" in fields:
        about.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    flags = set(fields.get("flags", "").split())
    widest = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2"))
                   if flag in flags), None)
    about += [f"with {widest}"] if widest else []
    return f"{model} ({', '.join(about)})"


def describe(threads: int = 1) -> str:
    """What is pinned, for a summary (the same on every machine)."""
    shown = ", ".join(f"{k}={v}" for k, v in PINNED.items() if not k.endswith("_THREADS") and k != "DNNL_MAX_CPU_ISA")
    return f"CPU math pinned: {shown}, oneDNN off, {threads} thread{'s' * (threads > 1)}"
