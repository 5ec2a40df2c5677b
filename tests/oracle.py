"""Timber written straight from the paper (arXiv 2509.23595) with a plain float64 SVD: the test oracle.

Deliberately naive and independent of mergekit_timber.method.kernel: full SVD, U S' V^T.
"""

import math

import torch


def erank(s: torch.Tensor) -> float:
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-float((p * torch.log(p)).sum()))


def head_k(s: torch.Tensor, rule: str = "erank", value: float = None) -> int:
    if rule == "erank":
        return math.ceil(erank(s))
    if rule == "rank_ratio":
        return math.ceil(value * s.numel())
    energy = torch.cumsum(s * s, 0) / float((s * s).sum())
    return int((energy < value - 1e-12).sum()) + 1


def timber_matrix(wb, wi, lam, rule="erank", value=None):
    """The paper: D = W_I - W_B; S'_i = S_i (i <= K), lambda*S_i (i > K); W_B + U S' V^T."""
    d = wi.double() - wb.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if float(s.sum()) == 0:
        return wi.double(), s, 0
    k = head_k(s, rule, value)
    scaled = s.clone()
    scaled[k:] *= lam
    return wb.double() + (u * scaled) @ vh, s, k


def timber_tensor(name, wb, wi, lam, rule="erank", value=None):
    """Per checkpoint tensor, as the authors' script does (experts one by one)."""
    if wi.ndim < 2:
        return wi.double()
    if wi.ndim == 3 and ".experts." in name:
        outs = []
        for e in range(wi.shape[0]):
            if name.endswith("gate_up_proj"):
                half = wi.shape[1] // 2
                parts = [
                    timber_matrix(wb[e, sl], wi[e, sl], lam, rule, value)[0]
                    for sl in (slice(0, half), slice(half, None))
                ]
                outs.append(torch.cat(parts, 0))
            else:
                outs.append(timber_matrix(wb[e], wi[e], lam, rule, value)[0])
        return torch.stack(outs)
    out = timber_matrix(wb.reshape(wb.shape[0], -1), wi.reshape(wi.shape[0], -1), lam, rule, value)[0]
    return out.reshape(wi.shape)


def with_spectrum(m, n, s, generator=None):
    """A float64 m x n matrix whose singular values are s (length min(m, n))."""
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=generator))
    return (u * s.to(torch.float64)) @ v.T
