"""Per-tensor asymmetric activation ranges minimizing quantization MSE on samples.

The error of a candidate range [lo, hi] is evaluated on a histogram of the samples: values
outside are clipped (squared distance to the bound), values inside get the uniform rounding
noise step^2 / 12. Zero is always exactly representable (ONNX zero-point convention).
"""

from __future__ import annotations

import numpy as np

from .problem import ActQuant

BINS = 2048
EXACT_CANDIDATES = 24
"""Below 8 bits: best histogram-model candidates re-ranked by the real fake-quant error."""
EXACT_VALUES = 1 << 16
"""Values (a strided subsample) the re-ranking evaluates."""


def affine_params(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """(scale, zero_point) of uint8-style range [lo, hi] containing 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / qmax
    zp = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return float(scale), zp


def fake_quant(x: np.ndarray, scale: float, zp: int, bits: int = 8) -> np.ndarray:
    """Quantize-dequantize ``x`` with round-half-to-even like onnxruntime."""
    qmax = 2**bits - 1
    return ((np.clip(np.rint(x / scale) + zp, 0, qmax) - zp) * scale).astype(x.dtype)


def fake_quant_mean(x: np.ndarray, scale: float, zp: int, bits: int = 8) -> np.ndarray:
    """Mean over axis 0 of ``fake_quant(x, ...)`` without materializing the dequantized copy.

    ``x`` (M, ...) -> (...) float64. Same rounding (half to even) and saturation.
    """
    qmax = 2**bits - 1
    q = x / np.float32(scale)
    np.rint(q, out=q)
    q += np.float32(zp)
    np.clip(q, 0, qmax, out=q)
    return (q.mean(axis=0, dtype=np.float64) - zp) * scale


def choose_range(
    values: np.ndarray,
    *,
    bits: int = 8,
    method: str = "mse",
    lo_bound: float | None = None,
    hi_bound: float | None = None,
    grid: int = 96,
) -> ActQuant:
    """Range for ``values`` (any shape). Bounds come from an absorbed Relu/Clip (lo=0)."""
    v = values.astype(np.float32, copy=False).ravel()
    vmin, vmax = float(v.min()), float(v.max())
    lo_fix = lo_bound is not None and lo_bound >= 0.0
    if lo_fix:
        vmin = max(vmin, 0.0)
    if hi_bound is not None:
        vmax = min(vmax, hi_bound)
    vmin, vmax = min(vmin, 0.0), max(vmax, 0.0)
    if method == "minmax" or vmax - vmin <= 0:
        s, z = affine_params(vmin, vmax, bits)
        return ActQuant(vmin, vmax, s, z, float("nan"), "minmax", bits)
    if method != "mse":
        raise ValueError(f"unknown range method {method}")
    hist, edges = np.histogram(np.clip(v, vmin, vmax), bins=BINS, range=(vmin, vmax))
    c = 0.5 * (edges[:-1] + edges[1:])
    p = hist.astype(np.float64) / v.size
    p0 = np.concatenate([[0.0], np.cumsum(p)])
    p1 = np.concatenate([[0.0], np.cumsum(p * c)])
    p2 = np.concatenate([[0.0], np.cumsum(p * c * c)])
    fr = np.linspace(0.05, 1.0, grid)
    his = (vmax * fr if vmax > 0 else np.array([0.0]))[None, :]  # (1, H)
    los = (np.array([0.0]) if lo_fix or vmin >= 0 else vmin * fr)[:, None]  # (L, 1)
    i_lo = np.searchsorted(c, los)  # bins strictly below lo
    i_hi = np.searchsorted(c, his, side="right")  # bins at or below hi
    below = los**2 * p0[i_lo] - 2 * los * p1[i_lo] + p2[i_lo]
    above = (p2[-1] - p2[i_hi]) - 2 * his * (p1[-1] - p1[i_hi]) + his**2 * (p0[-1] - p0[i_hi])
    step = (his - los) / (2**bits - 1)
    err = below + above + np.clip(p0[i_hi] - p0[i_lo], 0, None) * step**2 / 12
    li, hj = np.unravel_index(int(np.argmin(err)), err.shape)
    best = float(err[li, hj])
    if bits < 8:
        # Few levels: the uniform-noise model (step² / 12) misjudges values that sit on a level
        # (the zeros after a Relu). Re-rank its best candidates by the real fake-quant error.
        sub = v[:: max(1, v.size // EXACT_VALUES)]
        best = float("inf")
        for flat in np.argsort(err, axis=None, kind="stable")[:EXACT_CANDIDATES]:
            a, b = np.unravel_index(int(flat), err.shape)
            s, z = affine_params(float(los[a, 0]), float(his[0, b]), bits)
            e = float(np.mean((fake_quant(sub, s, z, bits) - sub) ** 2, dtype=np.float64))
            if e < best:
                best, li, hj = e, a, b
    lo, hi = float(los[li, 0]), float(his[0, hj])
    s, z = affine_params(lo, hi, bits)
    return ActQuant(lo, hi, s, z, best, "mse", bits)
