"""Layer-wise pruning solved on the layer's input statistics: masks, least-squares refit, bias.

For output channel o with weights w (K,) and input covariance H (K, K), pruning to ŵ costs the
output error (w - ŵ)ᵀ H (w - ŵ); the mean part of the error goes into the bias afterwards (bias
correction), so the centred covariance is the right H.

``obs`` follows the Optimal Brain Surgeon recursion in the lazy-batch form of SparseGPT
(Frantar & Alistarh, arXiv 2301.00774): columns are visited in order; within a block of
columns the mask is chosen by the saliency w² / [H⁻¹]ᵢᵢ² (of the weights as already updated),
and every pruned weight's error is spread over the not-yet-visited columns through the
Cholesky factor of H⁻¹. That update freezes a column's kept weights once visited, so the kept
weights are then refit by least squares for the final mask (conjugate gradients on the masked,
damped H, warm-started from the OBS solution). N:M masks
are chosen the same way, N kept out of each M consecutive inputs (in the kernel's K order).
``magnitude`` keeps the largest |w| and does not refit (the baseline).

Written here rather than taken from a library: the published implementations are PyTorch;
this one is numpy only (batched over groups, so depthwise layers run as one problem).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import LayerProblem, LayerSolution, SparseEncoding

REFIT_ITERS = 64
"""Conjugate-gradient steps of the final least-squares refit (it stops earlier once converged)."""
MAX_OBS_INPUTS = 8192
"""Above this K the (K, K) inverse is too large: such layers fall back to magnitude masks."""


@dataclass(frozen=True)
class PruneSpec:
    """What to solve for one layer.

    ``sparsity``: fraction of the layer's weights set to zero (unstructured), or ``n``/``m``
    for N:M (``n`` kept out of every ``m`` consecutive inputs; 0 = unstructured).
    ``method``: ``obs`` (saliency masks and least-squares refit) or ``magnitude``.
    ``refit``: with ``obs``, update the kept weights (False: OBS masks only, an ablation).
    ``damping``: added to H's diagonal, relative to its mean (reported in the stats).
    """

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    method: str = "obs"
    refit: bool = True
    bias_correction: bool = True
    damping: float = 0.01
    block: int = 128

    @property
    def pattern(self) -> str:
        """``unstructured`` or ``N:M``."""
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def hessian(p: LayerProblem, centered: bool) -> np.ndarray:
    """H (G, K, K) float64 of the problem: the input covariance, or E[x xᵀ] uncentred."""
    if p.cov is not None:
        h = np.asarray(p.cov, dtype=np.float64)
    else:
        assert p.x is not None
        x = np.asarray(p.x, dtype=np.float64).transpose(1, 0, 2)  # (G, M, K)
        x = x - p.mean[:, None, :]
        h = np.matmul(x.transpose(0, 2, 1), x) / max(x.shape[1], 1)
    if not centered:
        h = h + p.mean[:, :, None] * p.mean[:, None, :]
    return h


def prune_layer(
    p: LayerProblem,
    spec: PruneSpec,
    order: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> LayerSolution:
    """Prune one layer. ``order``: permutation of K giving the N:M grouping order. ``mask``
    (G, O, K) bool: keep this mask (chosen before) and only refit the kept weights.

    Returns the pruned float weight (G, O, K), the corrected bias (G, O), a
    :class:`SparseEncoding` mask and stats (sparsity, sqnr_db, damping, method).
    """
    w = np.asarray(p.weight, dtype=np.float64)
    g, o, k = w.shape
    h = hessian(p, centered=spec.bias_correction)
    if order is not None:
        w, h = w[..., order], h[:, order][:, :, order]
        mask = mask[..., order] if mask is not None else None
    method = spec.method
    if method == "obs" and k > MAX_OBS_INPUTS:
        method = "magnitude"
    if mask is not None:
        wp = w * mask
        damping = 0.0
        if method == "obs" and spec.refit:
            wp, damping = _ls_refit(w, wp, mask, _damped(h, spec.damping)), spec.damping
    elif method == "magnitude":
        mask = _magnitude_mask(w, spec)
        wp = w * mask
        damping = 0.0
    elif method == "obs":
        wp, mask, damping = _obs(w, h, spec)
    else:
        raise ValueError(f"unknown pruning method {method}")
    if order is not None:
        inv = np.argsort(order)
        w, wp, mask, h = w[..., inv], wp[..., inv], mask[..., inv], h[:, inv][:, :, inv]
    bias = np.zeros((g, o)) if p.bias is None else np.asarray(p.bias, np.float64)
    shift = np.zeros((g, o))
    if spec.bias_correction:
        shift = np.einsum("gok,gk->go", w - wp, p.mean)
    d = w - wp
    err = float(np.einsum("gok,gkl,gol->", d, h, d))  # centred H: what the bias cannot absorb
    sig = float(np.einsum("gok,gkl,gol->", w, h, w))
    stats = {
        "sparsity": float(1.0 - mask.mean()),
        "sqnr_db": _db(sig, err),
        "damping": damping,
        "refit": float(method == "obs" and spec.refit),
        "obs": float(method == "obs"),
        "bias_shift_rms": float(np.sqrt(np.mean(shift**2))) if shift.size else 0.0,
    }
    return LayerSolution(
        weight=wp.astype(np.float32),
        bias=(bias + shift).astype(np.float32),
        encoding=SparseEncoding(mask.astype(bool), spec.pattern),
        stats=stats,
    )


def _magnitude_mask(w: np.ndarray, spec: PruneSpec) -> np.ndarray:
    """Keep the largest |w|: per layer (unstructured) or per group of m inputs (N:M)."""
    g, o, k = w.shape
    a = np.abs(w)
    if spec.m:
        return _nm_mask(a, spec.n, spec.m)
    drop = int(round(spec.sparsity * a.size))
    mask = np.ones(a.size, bool)
    if drop:
        mask[np.argsort(a.ravel(), kind="stable")[:drop]] = False
    return mask.reshape(g, o, k)


def _nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` highest scores of every ``m`` consecutive inputs (a trailing partial
    group is kept whole)."""
    *lead, k = score.shape
    full = (k // m) * m
    mask = np.ones(score.shape, bool)
    if full:
        s = score[..., :full].reshape(*lead, full // m, m)
        drop = np.argsort(s, axis=-1, kind="stable")[..., : m - n]
        mk = np.ones(s.shape, bool)
        np.put_along_axis(mk, drop, False, axis=-1)
        mask[..., :full] = mk.reshape(*lead, full)
    return mask


def _obs(w: np.ndarray, h: np.ndarray, spec: PruneSpec) -> tuple[np.ndarray, np.ndarray, float]:
    """SparseGPT-style pruning with refit, batched over groups. Returns (ŵ, mask, damping)."""
    g, o, k = w.shape
    w0 = w
    w = w.copy()
    h = _damped(h, spec.damping)
    # U: upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), as in OBS/SparseGPT.
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky(hinv).transpose(0, 2, 1)
    mask = np.ones((g, o, k), bool)
    keep_all = not spec.m and spec.sparsity <= 0
    block = max(spec.m, (spec.block // spec.m) * spec.m) if spec.m else spec.block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[..., i1:i2].copy()
        u1 = u[:, i1:i2, i1:i2]
        d1 = np.diagonal(u1, axis1=1, axis2=2)[:, None, :]  # (G, 1, B)
        err1 = np.zeros_like(w1)
        m1 = np.ones(w1.shape, bool)
        if not spec.m and not keep_all:
            sal = w1**2 / d1**2  # (G, O, B)
            flat = sal.reshape(g, -1)
            drop = int(round(spec.sparsity * flat.shape[1]))
            if drop:
                cut = np.argsort(flat, axis=1, kind="stable")[:, :drop]
                mf = np.ones(flat.shape, bool)
                np.put_along_axis(mf, cut, False, axis=1)
                m1 = mf.reshape(w1.shape)
        for i in range(i2 - i1):
            if spec.m and i % spec.m == 0 and i + spec.m <= i2 - i1:
                sal = w1[..., i : i + spec.m] ** 2 / d1[..., i : i + spec.m] ** 2
                m1[..., i : i + spec.m] = _nm_mask(sal, spec.n, spec.m)
            col = w1[..., i]
            q = np.where(m1[..., i], col, 0.0)
            e = (col - q) / u1[:, None, i, i]  # (G, O)
            if spec.refit:
                w1[..., i:] -= e[..., None] * u1[:, None, i, i:]
            w1[..., i] = q
            err1[..., i] = e
        w[..., i1:i2] = w1
        mask[..., i1:i2] = m1
        if spec.refit and i2 < k:
            w[..., i2:] -= np.matmul(err1, u[:, i1:i2, i2:])
    w = np.where(mask, w, 0.0)
    if spec.refit:
        w = _ls_refit(w0, w, mask, h)
    return w, mask, float(spec.damping)


def _damped(h: np.ndarray, damping: float) -> np.ndarray:
    """A copy of H (G, K, K) with ``damping`` × its mean diagonal added to the diagonal; inputs
    that never vary (diagonal 0: their weights do not affect the output) get a unit diagonal."""
    h = h.copy()
    k = h.shape[-1]
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    idx = np.arange(k)
    h[:, idx, idx] = np.where(diag <= 0, 1.0, diag)
    h[:, idx, idx] += damping * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    return h


def _ls_refit(
    w: np.ndarray, v: np.ndarray, mask: np.ndarray, h: np.ndarray, iters: int = REFIT_ITERS
) -> np.ndarray:
    """Least-squares refit of the kept weights for a fixed mask, all rows at once.

    Minimizes (w - v)ᵀ H (w - v) over v with v = 0 off the mask: conjugate gradients on the
    masked H, warm-started from the OBS solution ``v`` (which freezes a column's kept
    weights once it has been visited, so it stops short of the optimum on correlated inputs).
    ``w``, ``v``, ``mask``: (G, O, K); ``h``: (G, K, K), damped. Returns the refit v.
    """
    m = mask.astype(np.float64)
    r = np.matmul(w - v, h) * m  # minus half the gradient, on the kept weights only
    p = r.copy()
    rs = np.sum(r * r, axis=-1, keepdims=True)
    rs0 = np.maximum(rs, 1e-300)
    for _ in range(iters):
        hp = np.matmul(p, h) * m
        alpha = rs / np.maximum(np.sum(p * hp, axis=-1, keepdims=True), 1e-300)
        v = v + alpha * p
        r = r - alpha * hp
        rs_new = np.sum(r * r, axis=-1, keepdims=True)
        if float(np.max(rs_new / rs0)) < 1e-12:
            break
        p = r + (rs_new / np.maximum(rs, 1e-300)) * p
        rs = rs_new
    return v * m


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))
