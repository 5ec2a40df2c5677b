"""Build a local Base/Instruct pair (and a Timber YAML for it) that mergekit can merge.

    python scripts/make_pair.py pair/ --arch qwen3 --layers 2 --yaml timber-local.yml

Prints the base and instruct directories; `--help` lists the shapes and options
(scripts/pairs/synthetic.py builds them).
"""

import sys

from pairs.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
