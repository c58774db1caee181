"""Data-free allocation of a global sparsity target over layers.

Each layer's sensitivity is read off its synthesized input statistics in one pass: pruning
weight i alone costs about wᵢ² / [H⁻¹]ᵢᵢ of output error (the Optimal Brain Surgeon saliency),
so the cumulative sum of the sorted saliencies, divided by the layer's output energy wᵀHw, is
an estimate of the layer's relative output error at every sparsity. The allocation minimizes
the sum of these errors for the global target: every layer prunes until its marginal error
per removed weight reaches a common price λ, found by bisection. Layers whose error rises fast
(a first conv, depthwise convs, a classifier) get less sparsity without a hand rule.
Giving every layer the same relative-error budget instead was measured worse than uniform
sparsity (BENCHMARKS.md), so it is not offered.
"""

from __future__ import annotations

import numpy as np

from .problem import LayerProblem
from .prune import MAX_OBS_INPUTS, hessian

GRID = np.round(np.arange(0.0, 0.951, 0.025), 3)
"""Per-layer sparsities the allocation chooses from."""


def sensitivity(p: LayerProblem, damping: float = 0.01, magnitude: bool = False) -> np.ndarray:
    """Estimated relative output error at each sparsity of ``GRID`` (shape (len(GRID),)).

    ``magnitude``: saliency w² · diag(H) (no inverse), for the magnitude method and for layers
    too wide to invert.
    """
    w = np.asarray(p.weight, dtype=np.float64)
    g, o, k = w.shape
    h = hessian(p, centered=True)
    diag = np.maximum(np.diagonal(h, axis1=1, axis2=2), 0.0)  # (G, K)
    load = damping * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    if magnitude or k > MAX_OBS_INPUTS or p.cov is None:
        # fewer samples than inputs: H is rank-deficient and its inverse says pruning is free
        sal = w**2 * (diag + load)[:, None, :]
    else:
        hd = h.copy()
        idx = np.arange(k)
        hd[:, idx, idx] = np.where(diag > 0, diag, 1.0) + load
        hinv_diag = np.diagonal(np.linalg.inv(hd), axis1=1, axis2=2)  # (G, K)
        sal = w**2 / hinv_diag[:, None, :]
    energy = float(np.einsum("gok,gkl,gol->", w, h, w))
    cum = np.concatenate([[0.0], np.cumsum(np.sort(sal.ravel()))])
    at = np.round(GRID * sal.size).astype(int)
    return cum[at] / max(energy, 1e-30)


def allocate(
    curves: dict[int, np.ndarray], sizes: dict[int, int], target: float
) -> dict[int, float]:
    """Per-layer sparsity minimizing the sum of relative errors for the target: each layer
    takes the sparsity where its marginal error per removed weight equals a common price λ
    (bisection on λ)."""
    total = sum(sizes.values())

    def pick(lam: float) -> dict[int, float]:
        out = {}
        for i, c in curves.items():
            cost = np.maximum.accumulate(c) - lam * GRID * sizes[i]
            out[i] = float(GRID[int(np.argmin(cost))])
        return out

    def reached(choice: dict[int, float]) -> float:
        return sum(choice[i] * sizes[i] for i in choice) / max(total, 1)

    lo, hi = 0.0, 1.0
    while reached(pick(hi)) < target and hi < 1e12:
        hi *= 4
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if reached(pick(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return _exact(pick(hi), sizes, target)


def _exact(choice: dict[int, float], sizes: dict[int, int], target: float) -> dict[int, float]:
    """Take the grid's overshoot back from the largest pruned layer, so the weighted mean is
    the target (the solver takes any sparsity, not only grid values)."""
    total = sum(sizes.values())
    excess = sum(choice[i] * sizes[i] for i in choice) / max(total, 1) - target
    pruned = [i for i in choice if choice[i] > 0]
    if excess <= 0 or not pruned:
        return choice
    big = max(pruned, key=lambda i: (sizes[i], -i))
    out = dict(choice)
    out[big] = max(0.0, choice[big] - excess * total / sizes[big])
    return out


def allocate_bits(
    errors: dict[int, dict[int, float]], costs: dict[int, dict[int, float]], budget: float
) -> dict[int, int] | None:
    """Per-layer bit widths with the least summed error whose summed cost fits ``budget``
    (a multiple-choice knapsack, solved by its Lagrangian relaxation and a greedy fill).

    ``errors[i][b]``: layer i's predicted relative output error at b bits; ``costs[i][b]``:
    its stored bytes. Each layer takes the width minimizing error + λ · cost for a common
    price λ (bisection: the smallest λ that fits); the bytes left over then upgrade the
    layers with the best error saved per extra byte. None when even the cheapest widths do
    not fit.
    """
    layers = sorted(errors)

    def pick(lam: float) -> dict[int, int]:
        return {
            i: min(errors[i], key=lambda b: (errors[i][b] + lam * costs[i][b], -b))
            for i in layers
        }

    def cost(choice: dict[int, int]) -> float:
        return sum(costs[i][choice[i]] for i in layers)

    cheapest = {i: min(costs[i], key=lambda b: (costs[i][b], b)) for i in layers}
    if cost(cheapest) > budget:
        return None
    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget and hi < 1e30:
        hi *= 4
    if cost(pick(hi)) > budget:
        choice = cheapest
    else:
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if cost(pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        choice = pick(hi)
    spare = budget - cost(choice)
    while True:  # greedy fill: best error saved per extra byte that still fits
        best, best_gain = None, 0.0
        for i in layers:
            b0 = choice[i]
            for b in errors[i]:
                extra = costs[i][b] - costs[i][b0]
                saved = errors[i][b0] - errors[i][b]
                if 0 < extra <= spare and saved > 0 and saved / extra > best_gain:
                    best, best_gain = (i, b), saved / extra
        if best is None:
            return choice
        i, b = best
        spare -= costs[i][b] - costs[i][choice[i]]
        choice[i] = b
