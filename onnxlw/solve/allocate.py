"""Data-free allocation of a global sparsity target over layers.

Each layer's sensitivity is read off its synthesized input statistics in one pass: pruning
weight i alone costs about wᵢ² / [H⁻¹]ᵢᵢ of output error (the Optimal Brain Surgeon saliency),
so the cumulative sum of the sorted saliencies, divided by the layer's output energy wᵀHw, is
an estimate of the layer's relative output error at every sparsity. The allocation then gives
every layer the same relative-error budget τ and picks, by bisection on τ, the budget whose
largest admissible per-layer sparsities add up to the global target. Layers whose error rises
fast (a first conv, depthwise convs, a classifier) get less sparsity without a hand rule.
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


def allocate_equal_error(
    curves: dict[int, np.ndarray], sizes: dict[int, int], target: float
) -> dict[int, float]:
    """Per-layer sparsity (a value of ``GRID``) so that the weighted mean reaches ``target``,
    every layer with the same relative-error budget (measured worse than uniform: see
    BENCHMARKS; kept for comparison).

    ``curves``: layer -> relative error at each GRID sparsity (non-decreasing);
    ``sizes``: layer -> number of weights. The result uses the smallest common error budget
    whose per-layer choices reach the target (it may overshoot by one grid step of one layer).
    """
    total = sum(sizes.values())

    def pick(tau: float) -> dict[int, float]:
        out = {}
        for i, c in curves.items():
            ok = np.nonzero(np.maximum.accumulate(c) <= tau)[0]
            out[i] = float(GRID[ok[-1]]) if len(ok) else 0.0
        return out

    def reached(choice: dict[int, float]) -> float:
        return sum(choice[i] * sizes[i] for i in choice) / max(total, 1)

    lo, hi = 0.0, max(float(np.max(c)) for c in curves.values()) + 1.0
    if reached(pick(hi)) < target:
        return pick(hi)  # the target exceeds the grid: every layer at its maximum
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if reached(pick(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return pick(hi)
