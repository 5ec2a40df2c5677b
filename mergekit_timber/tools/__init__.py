"""Tools built on the method: analysis (eRank per matrix, plots), sweep (several lambdas
in one pass), search (lambda by Pass@k with lm-eval and Ray) and passk (Pass@k curves).

They import the method and its integration; nothing in those imports a tool. Plots and
Pass@k need the `[tools]` extra (matplotlib, numpy).
"""
