#!/usr/bin/env python
"""Build the README's local Base/Instruct pair (random weights, a real pair's files) and,
with --yaml, a Timber recipe for it.

    python scripts/make_pair.py pair/ --arch qwen3 --layers 2 --yaml timber-local.yml

Provisional: it runs the synthetic pair builder's own command line with the same
arguments (`--help` lists them).
"""

import sys

from mergekit_timber.testing.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
