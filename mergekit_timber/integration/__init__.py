"""The method inside mergekit: registration, the seam around `run_merge`, and its checks.

_hook (installed by the .pth file) imports method.adapter and patches when mergekit
imports its registry and its merge; guard checks every mergekit name relied on; seam runs
a Timber merge: preflight, a staged output_dir, hub_layout (the Instruct's tensor names),
quantized inputs, finite outputs, dropin files and the card, then publishes.
Importing this package imports nothing from mergekit.
"""
