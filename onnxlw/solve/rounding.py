"""Hessian-aware rounding of a layer's weights for fixed per-channel scales (GPTQ).

For output channel o with weights w (K,) and input covariance H (K, K), rounding to w_q costs
the output error (w - w_q)ᵀ H (w - w_q). Round-to-nearest minimizes it only when H is
diagonal; on correlated inputs the error of each rounded weight can be compensated by the
weights not yet rounded. GPTQ (Frantar et al., arXiv 2210.17323) visits the inputs in order,
rounds one column of all rows at once, and spreads its error over the later columns through
the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U); lazy updates per block of columns keep it
BLAS-bound. Inputs are visited by decreasing diag(H) ("act order" in GPTQ's code), which the
GPTQ authors found to help at low bits.

Written here rather than taken from a library: the published implementations are PyTorch;
this one is numpy only and batched over groups, so depthwise layers run as one problem.
"""

from __future__ import annotations

import numpy as np

MAX_INPUTS = 8192
"""Above this K the (K, K) inverse is too large: such layers keep round-to-nearest."""
BLOCK = 128
"""Columns updated lazily together."""


def gptq_levels(
    w: np.ndarray,
    scale: np.ndarray,
    h: np.ndarray,
    qmax: int,
    damping: float,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Integer levels (G, O, K) in [-qmax, qmax] for weights ``w`` (G, O, K), per-channel
    ``scale`` (G, O) > 0 and input covariance ``h`` (G, K, K) (undamped; ``damping`` times
    its mean diagonal is added, as GPTQ does). Inputs whose variance is zero do not affect
    the output: they are rounded to nearest. ``keep`` (G, O, K) bool: weights outside it are
    pruned and stay exactly zero (their error is compensated like a rounding error, as in
    SparseGPT's joint pruning and quantization).
    """
    g, o, k = w.shape
    w = np.asarray(w, np.float64)
    s = np.where(scale > 0, scale, 1.0).astype(np.float64)[..., None]  # (G, O, 1)
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.diagonal(h, axis1=1, axis2=2).copy()  # (G, K)
    idx = np.arange(k)
    h[:, idx, idx] = np.where(diag > 0, diag, 1.0)
    h[:, idx, idx] += damping * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    perm = np.argsort(-diag, axis=1, kind="stable")  # (G, K): act order
    gi = np.arange(g)[:, None]
    hp = h[gi[..., None], perm[:, :, None], perm[:, None, :]]
    del h  # (K, K) float64 copies dominate the memory of wide layers: hold at most two
    wp = np.take_along_axis(w, perm[:, None, :], axis=2).copy()
    kp = None if keep is None else np.take_along_axis(keep, perm[:, None, :], axis=2)
    hinv = np.linalg.inv(hp)
    del hp
    u = np.linalg.cholesky(hinv).transpose(0, 2, 1)  # upper: H⁻¹ = Uᵀ U
    del hinv
    q = np.empty_like(wp)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = wp[..., i1:i2].copy()
        u1 = u[:, i1:i2, i1:i2]
        err1 = np.empty_like(w1)
        for i in range(i2 - i1):
            col = w1[..., i]
            qi = np.clip(np.rint(col / s[..., 0]), -qmax, qmax)
            if kp is not None:
                qi = np.where(kp[..., i1 + i], qi, 0.0)
            e = (col - qi * s[..., 0]) / u1[:, None, i, i]  # (G, O)
            w1[..., i:] -= e[..., None] * u1[:, None, i, i:]
            q[..., i1 + i] = qi
            err1[..., i] = e
        if i2 < k:
            wp[..., i2:] -= np.matmul(err1, u[:, i1:i2, i2:])
    out = np.empty_like(q)
    np.put_along_axis(out, perm[:, None, :].repeat(o, axis=1), q, axis=2)
    return out
