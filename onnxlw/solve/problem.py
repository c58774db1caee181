"""Layer problems and their solutions: plain numpy arrays, no ONNX.

A :class:`LayerProblem` is what one layer's solve needs and nothing else: the grouped weight
matrix and sufficient statistics of its synthesized input. It is picklable, so one problem
can be solved several times (bit-width sweeps) or in another process. Every solver returns a
:class:`LayerSolution`: the float weight and bias the layer computes with, an encoding
(method-specific), and stats. Later stages (report, validation) read only ``weight``,
``bias`` and ``stats``; only the emitter of a format reads the encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def input_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(mean, cov, samples) of sampled columns ``x`` (M, G, K).

    ``mean`` (G, K) float64. When M >= K: ``cov`` (G, K, K) float64 = Cov[x] (centered second
    moment, summed in float32 like the im2col samples) and ``samples`` None; when M < K the
    covariance would be rank-deficient and larger than the samples, so ``cov`` is None and
    ``samples`` is ``x`` itself.
    """
    m, _, k = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    if m < k:
        return mean, None, x
    xt = x.transpose(1, 0, 2) - mean[:, None, :].astype(np.float32)  # (G, M, K)
    cov = np.matmul(xt.transpose(0, 2, 1), xt).astype(np.float64) / max(m, 1)
    return mean, cov, None


@dataclass(frozen=True)
class QuantSpec:
    """What to solve for one layer's weights."""

    bits: int = 8
    scale_method: str = "output-mse"  # or "minmax"
    bias_correction: str = "full"  # "none" | "weights" | "full"
    grid: int = 40  # candidate clipping ratios per channel, screened with diag(H)
    exact: int = 4  # best screened candidates per channel ranked with the full H
    pair_limit: int = 128  # max |q_a + q_b| over a same-sign pair: 255 * 128 < 2**15
    bias_bits: int = 32  # the quantized bias's width; its scale is x_scale * w_scale
    rounding: str = "nearest"  # or "gptq": Hessian-aware rounding for the chosen scales
    damping: float = 0.01  # GPTQ's load on diag(H), relative to its mean
    keep_zeros: bool = False  # zero weights stay zero (pruned): GPTQ compensates, not refills

    @property
    def qmax(self) -> int:
        """Largest symmetric integer level, e.g. 127 for 8 bits (range [-127, 127])."""
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class LayerProblem:
    """One layer's compression problem.

    ``weight``: (G, O, K) grouped weight matrix (G groups, O outputs per group, K inputs per
    group: Cin/G * kh * kw for a conv). ``bias``: (G, O) or None.
    Input statistics over ``count`` sampled columns of the synthesized input:
    ``mean`` (G, K) E[x]; ``cov`` (G, K, K) Cov[x], or None when there are fewer samples than
    inputs, and then ``x`` (M, G, K) holds the samples themselves.
    ``xq_mean``: (G, K) E[Q(x)] after activation quantization, or None.
    ``x_scale``: the input's activation scale (the int32 bias's scale is x_scale * w_scale).
    ``pair_order``: (K,) permutation of K in the integer kernel's packing order; consecutive
    entries (0,1), (2,3), ... are the input pairs it multiplies and adds in int16 (x86 u8s8
    without VNNI saturates there). None when the kernel accumulates in int32.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    mean: np.ndarray
    cov: np.ndarray | None
    x: np.ndarray | None
    count: int
    xq_mean: np.ndarray | None = None
    x_scale: float | None = None
    pair_order: np.ndarray | None = None
    name: str = ""

    @classmethod
    def from_samples(
        cls,
        weight: np.ndarray,
        x: np.ndarray,
        *,
        bias: np.ndarray | None = None,
        xq: np.ndarray | None = None,
        xq_mean: np.ndarray | None = None,
        x_scale: float | None = None,
        pair_order: np.ndarray | None = None,
        name: str = "",
    ) -> LayerProblem:
        """Build from sampled columns ``x`` (M, G, K) and their quantized copy ``xq`` (or
        just its mean ``xq_mean`` (G, K))."""
        mean, cov, samples = input_stats(x)
        if xq is not None:
            xq_mean = xq.mean(axis=0, dtype=np.float64)
        return cls(weight, bias, mean, cov, samples, x.shape[0], xq_mean, x_scale, pair_order, name)

    @property
    def nbytes(self) -> int:
        """Memory held by the problem's arrays."""
        return sum(
            a.nbytes for a in (self.weight, self.mean, self.cov, self.x) if a is not None
        )


@dataclass(frozen=True)
class QuantEncoding:
    """Integer weights: real = scale * (q - zero_point) per output channel.

    ``q`` (G, O, K) integers; ``scale`` (G, O) float32; ``zero_point`` (G, O) integers.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    signed: bool = True

    kind = "quant"


@dataclass(frozen=True)
class SparseEncoding:
    """A pruning mask (G, O, K) bool (True = kept), e.g. ``pattern`` "unstructured" or "2:4"."""

    mask: np.ndarray
    pattern: str

    kind = "sparse"


@dataclass(frozen=True)
class CodebookRef:
    """Additive codes into the plan's codebook set ``book`` (shared across layers or the
    layer's own).

    ``codes`` (books, R, J) uint8: R = G*O weight rows, J = ceil(K / dim) vectors per row;
    row r decodes to ``scale[r] * (sum_m books[m][codes[m, r]]).ravel()[:K]`` in code order
    ``layout``: ``channels`` ((kh, kw, c) for a conv) or ``kernel`` (the weight's own order).
    ``scale`` (R,) float32 holding float16 values (stored as float16). ``weight_shape``: the
    ONNX weight tensor's shape; ``transposed``: the tensor is (K, O) (MatMul).
    ``quant``: the decoded weight requantized to int8 for QDQ output (levels rebuilt from the
    codes at session start), or None for float output."""

    codes: np.ndarray
    book: str
    dim: int
    scale: np.ndarray
    layout: str
    weight_shape: tuple[int, ...]
    transposed: bool = False
    quant: QuantEncoding | None = None

    kind = "codebook"


Encoding = QuantEncoding | SparseEncoding | CodebookRef


@dataclass(frozen=True)
class LayerSolution:
    """What one layer computes with after compression, however it was compressed.

    ``weight``: (G, O, K) float32, the effective (dequantized, pruned, decoded) weights;
    ``bias``: (G, O) float32, the corrected bias; ``encoding``: how the emitter stores them;
    ``stats``: numbers for the report (sqnr_db, damping, saturation_fixes, ...).
    """

    weight: np.ndarray
    bias: np.ndarray
    encoding: Encoding | None
    stats: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor affine quantization of an activation: real = scale * (q - zero_point)."""

    lo: float
    hi: float
    scale: float
    zero_point: int
    mse: float
    method: str
    bits: int = 8


ActRange = ActQuant
"""Former name of :class:`ActQuant`."""
