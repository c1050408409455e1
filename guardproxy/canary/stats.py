"""Exact one-sided binomial tails, in log space so that tiny p-values stay exact."""

from __future__ import annotations

import math


def binom_logsf(k: int, n: int, p: float = 0.5) -> float:
    """ln P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    lp, lq = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(0.0, top + math.log(sum(math.exp(t - top) for t in terms)))


def log10_p(k: int, n: int, p: float = 0.5) -> float:
    return binom_logsf(k, n, p) / math.log(10)


def format_p(log10: float) -> str:
    if log10 >= -4:
        return f"{10 ** log10:.4f}"
    return f"1e{log10:.1f}"


def z_score(k: int, n: int, p: float = 0.5) -> float:
    return (k - n * p) / math.sqrt(n * p * (1 - p)) if n else 0.0
