"""Local Base/Instruct pairs for the tests, the demo and the benchmarks (not in the wheel).

synthetic: tiny models mergekit and transformers load (`python scripts/make_pair.py --help`);
quantized_pairs: block-FP8 and MXFP4 variants of them; fake_device: tensors that claim
another device, to check the kernel keeps every tensor where its inputs are.
Importable as `pairs` from scripts/ (scripts run from there; tests/conftest.py adds it).
"""
