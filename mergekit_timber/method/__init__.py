"""The merge method: Timber's maths and its mergekit adapter.

kernel: pure torch (no mergekit), the eRank head and the rebuild; layout: which tensors
are refined and how each splits into matrices; adapter: `timber` and `timber_l` as
mergekit merge methods (importing it registers them). Importing this package imports
none of them: the kernel is usable without mergekit.
"""
