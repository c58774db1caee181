"""Layer problems and their solutions: plain numpy arrays, no ONNX."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantSpec:
    """What to solve for one layer's weights."""

    bits: int = 8
    scale_method: str = "output-mse"  # or "minmax"
    bias_correction: str = "full"  # "none" | "weights" | "full"
    grid: int = 40  # candidate clipping ratios per channel, screened with diag(H)
    exact: int = 4  # best screened candidates per channel ranked with the full H
    pair_limit: int = 128  # max |q_a + q_b| over a same-sign pair: 255 * 128 < 2**15

    @property
    def qmax(self) -> int:
        """Largest symmetric integer level, e.g. 127 for 8 bits (range [-127, 127])."""
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class LayerProblem:
    """One layer's weight-quantization problem.

    ``weight``: (G, O, K) grouped weight matrix (G groups, O outputs per group, K inputs per
    group: Cin/G * kh * kw for a conv). ``x``: (M, G, K) sampled FP32 inputs (im2col columns).
    ``xq``: the same inputs after activation quantization, or None. ``bias``: (G, O) or None.
    ``pair_order``: (K,) permutation of K in the integer kernel's packing order; consecutive
    entries (0,1), (2,3), ... are the input pairs it multiplies and adds in int16 (x86 u8s8
    without VNNI saturates there). None when the kernel accumulates in int32.
    """

    weight: np.ndarray
    x: np.ndarray
    xq: np.ndarray | None
    bias: np.ndarray | None
    spec: QuantSpec
    pair_order: np.ndarray | None = None


@dataclass(frozen=True)
class WeightSolution:
    """What was done to one layer.

    ``q``: (G, O, K) integers in [-qmax, qmax]; ``scale``: (G, O) per output channel;
    ``bias``: (G, O) corrected FP32 bias; ``clip``: (G, O) chosen ratio of max|w|.
    ``saturation_fixes``: weights moved one level toward zero to keep u8s8 pairs in 16 bits.
    ``damping``: relative diagonal load added to H; ``dead_columns``: inputs whose synthetic
    samples were all zero (their weights do not affect the output error).
    ``sqnr_db``: output SQNR of the layer on its samples with the chosen scales, and
    ``sqnr_minmax_db`` with the max|w| reference scales (doubled under the u8s8 pair guard), both
    from weight quantization alone.
    """

    q: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    clip: np.ndarray
    bias_shift: np.ndarray
    damping: float
    dead_columns: int
    sqnr_db: float
    sqnr_minmax_db: float
    method: str
    saturation_fixes: int = 0

    def dequantized(self) -> np.ndarray:
        """q * scale, shape (G, O, K)."""
        return self.q * self.scale[..., None]


@dataclass(frozen=True)
class ActRange:
    """Per-tensor affine quantization of an activation: real = scale * (q - zero_point)."""

    lo: float
    hi: float
    scale: float
    zero_point: int
    mse: float
    method: str
