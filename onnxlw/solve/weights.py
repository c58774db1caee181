"""Per-output-channel symmetric weight quantization chosen for the layer's output error.

For output channel o with weights w (K,) and input second moment H = E[x x^T] (K, K), the
output error of a quantized w_q is (w - w_q)^T H (w - w_q). With bias correction, the mean
part of the error is removed afterwards, so the covariance Cov[x] replaces H. The clipping
ratio of each channel's scale is searched on a grid, all channels at once.
"""

from __future__ import annotations

import numpy as np

from .problem import LayerProblem, QuantSpec, WeightSolution

DAMPING = 1e-6


def quantize(w: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Round-to-nearest symmetric quantization. ``w`` (..., K), ``scale`` (...,) -> ints."""
    s = np.where(scale > 0, scale, 1.0)[..., None]
    return np.clip(np.rint(w / s), -qmax, qmax)


def limit_pairs(
    q: np.ndarray, r: np.ndarray, pairs: np.ndarray, limit: int, qmax: int
) -> tuple[np.ndarray, int]:
    """Keep every same-sign pair of integer weights within ``limit`` in magnitude sum.

    ``q``: (G, O, K) integers; ``r``: (G, O, K) the unrounded values w / scale; ``pairs``:
    (P, 2) indices into K, each index at most once. With uint8 inputs up to 255, a pair's
    partial sum stays within int16 when its positive part and its negative part are each at
    most 128 in magnitude. A pair over the limit (its two weights then share a sign) is set
    to the closest integer pair whose magnitudes sum to exactly ``limit``: the excess is split
    evenly over the two unrounded magnitudes. Returns the new ``q`` and the pairs changed.
    """
    ia, ib = pairs[:, 0], pairs[:, 1]
    a, b = q[..., ia], q[..., ib]
    over = np.abs(a + b) > limit  # over the limit implies a and b share a sign
    if not over.any():
        return q, 0
    sign = np.sign(a + b)
    ma, mb = np.abs(r[..., ia]), np.abs(r[..., ib])
    t = (ma + mb - limit) / 2
    na = np.clip(np.rint(ma - t), limit - qmax, qmax)
    q = q.copy()
    q[..., ia] = np.where(over, sign * na, a)
    q[..., ib] = np.where(over, sign * (limit - na), b)
    return q, int(over.sum())


def second_moment(x: np.ndarray, centered: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-group H = E[x x^T] (or covariance) and mean. ``x`` (M, G, K) -> (G, K, K), (G, K)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    if centered:
        x64 = x64 - mean
    h = np.einsum("mgk,mgl->gkl", x64, x64, optimize=True) / max(len(x), 1)
    return h, mean


def output_error(d: np.ndarray, h: np.ndarray) -> np.ndarray:
    """d^T H d per channel. ``d`` (G, O, K), ``h`` (G, K, K) -> (G, O)."""
    return np.einsum("gok,gok->go", np.einsum("gok,gkl->gol", d, h, optimize=True), d)


def solve_weights(p: LayerProblem) -> WeightSolution:
    """Choose scales, round, and correct the bias for one layer."""
    spec: QuantSpec = p.spec
    w = p.weight.astype(np.float64)
    g, o, k = w.shape
    centered = spec.bias_correction != "none"
    h, mean_x = second_moment(p.x, centered)
    diag = np.einsum("gkk->gk", h)
    dead = int((diag <= 0).sum())
    load = DAMPING * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    h = h + load[..., None] * np.eye(k)
    wmax = np.abs(w).max(axis=2)
    base = wmax / spec.qmax
    guard = p.pairs is not None and len(p.pairs) > 0

    def levels(scale: np.ndarray) -> tuple[np.ndarray, int]:
        q = quantize(w, scale, spec.qmax)
        if not guard:
            return q, 0
        r = w / np.where(scale > 0, scale, 1.0)[..., None]
        return limit_pairs(q, r, p.pairs, spec.pair_limit, spec.qmax)

    def error(scale: np.ndarray) -> np.ndarray:
        return output_error(w - levels(scale)[0] * scale[..., None], h)

    # The reference: max|w| scales (guarded: halved, so no pair can exceed the limit).
    ref_ratio = 2.0 if guard else 1.0
    ref_err = error(base * ref_ratio)
    signal = output_error(w, h)
    best_err, best_ratio = ref_err.copy(), np.full((g, o), ref_ratio)
    if spec.scale_method == "output-mse":
        ratios = np.geomspace(0.5, 2.0, 2 * spec.grid) if guard else np.linspace(
            1.0, 0.5, spec.grid)
        for r in ratios:
            err = error(base * r)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_ratio = np.where(better, r, best_ratio)
    elif spec.scale_method != "minmax":
        raise ValueError(f"unknown scale method {spec.scale_method}")
    scale = base * best_ratio
    q, fixes = levels(scale)
    wq = q * scale[..., None]
    bias = np.zeros((g, o)) if p.bias is None else p.bias.astype(np.float64)
    shift = np.zeros((g, o))
    if spec.bias_correction == "weights":
        shift = np.einsum("gok,gk->go", w - wq, mean_x)
    elif spec.bias_correction == "full":
        mq = p.xq.astype(np.float64).mean(axis=0) if p.xq is not None else mean_x
        shift = np.einsum("gok,gk->go", w, mean_x) - np.einsum("gok,gk->go", wq, mq)
    elif spec.bias_correction != "none":
        raise ValueError(f"unknown bias correction {spec.bias_correction}")
    tot_sig = float(signal.sum())
    return WeightSolution(
        q=q.astype(np.int8 if spec.bits <= 8 else np.int16),
        scale=np.where(scale > 0, scale, 1.0).astype(np.float32),
        bias=(bias + shift).astype(np.float32),
        clip=best_ratio.astype(np.float32),
        bias_shift=shift.astype(np.float32),
        damping=DAMPING,
        dead_columns=dead,
        sqnr_db=_db(tot_sig, float(best_err.sum())),
        sqnr_minmax_db=_db(tot_sig, float(ref_err.sum())),
        method=spec.scale_method,
        saturation_fixes=fixes,
    )


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))
