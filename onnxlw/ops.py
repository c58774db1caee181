"""The op registry: how each compressible op's weight maps to a grouped matrix and back.

Every stage that touches a layer's weight goes through an :class:`OpAdapter` from ``OPS``:
analysis builds :class:`LayerRecord` s with it, problem building samples input columns with
it, emitters turn solved matrices back into weight tensors, and channel pruning drops input
or output channels with it. The grouped matrix is (G, O, K): G groups, O outputs per group,
K inputs per group (Cin/G * kh * kw for a conv, in the weight's (c, kh, kw) order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphView, attrs
from .solve.patches import conv_patches, dense_rows


@dataclass(frozen=True)
class ConvGeom:
    """Convolution geometry of a 2-D Conv layer."""

    group: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]


@dataclass
class LayerRecord:
    """One compressible layer. Created once by analysis; referred to by ``index``."""

    index: int
    node: str
    op_type: str  # Conv | Gemm | MatMul
    input: str
    output: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    geom: ConvGeom | None
    sources: tuple[str, ...]
    out_axis: int  # output-channel axis of the weight tensor (0 for Conv/Gemm, 1 for MatMul)
    is_classifier: bool = False
    skip: str | None = None

    @property
    def params(self) -> int:
        """Number of weights."""
        return int(np.prod(self.weight_shape))

    @property
    def adapter(self) -> OpAdapter:
        """The registry entry for this layer's op."""
        return OPS[self.op_type]

    @property
    def groups(self) -> int:
        """G of the grouped matrix."""
        return self.geom.group if self.geom is not None else 1


class OpAdapter:
    """Weight layout of one op type. Subclasses fill in the op-specific parts."""

    op_type = ""

    def record(self, n: onnx.NodeProto, index: int, view: GraphView) -> LayerRecord:
        """The layer record of node ``n``, with ``skip`` set when it cannot be compressed."""
        w = view.const(n.input[1])
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        skip = None
        if w.dtype != np.float32:
            skip = f"weight dtype {w.dtype} is not float32"
        if bias is not None and not view.is_const(bias):
            skip = skip or "bias is not constant"
        geom, why = self.geometry(n, w, view)
        return LayerRecord(
            index,
            n.name,
            n.op_type,
            n.input[0],
            n.output[0],
            n.input[1],
            bias,
            tuple(w.shape),
            geom,
            (),
            self.out_axis,
            skip=skip or why,
        )

    out_axis = 0

    def geometry(
        self, n: onnx.NodeProto, w: np.ndarray, view: GraphView
    ) -> tuple[ConvGeom | None, str | None]:
        """(geometry, reason the layer is skipped or None)."""
        return None, None

    def to_matrix(self, rec: LayerRecord, w: np.ndarray) -> np.ndarray:
        """Weight tensor -> grouped matrix (G, O, K)."""
        return w[None]

    def from_matrix(self, rec: LayerRecord, m: np.ndarray) -> np.ndarray:
        """Grouped matrix (G, O, K) -> weight tensor of ``rec.weight_shape``."""
        return m.reshape(rec.weight_shape)

    def columns(
        self, rec: LayerRecord, x: np.ndarray, positions: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Sampled input columns (M, G, K) of the layer for its input tensor ``x``."""
        return dense_rows(x, positions, rng)

    def positions(self, rec: LayerRecord, max_positions: int) -> int:
        """How many input columns to sample for this layer."""
        return max_positions

    def input_order(self, rec: LayerRecord) -> np.ndarray:
        """K in "input dimension" order, the order N:M groups run along: (kh, kw, c) for a
        conv (consecutive inputs are channels at one kernel position), plain for dense ops."""
        k = int(np.prod(rec.weight_shape)) // rec.weight_shape[rec.out_axis]
        return np.arange(k)

    def drop_outputs(self, rec: LayerRecord, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The weight with only output channels ``keep`` (indices)."""
        return np.take(w, keep, axis=rec.out_axis)

    def drop_inputs(self, rec: LayerRecord, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The weight with only input channels ``keep`` (indices)."""
        return np.take(w, keep, axis=1 - rec.out_axis)


class ConvAdapter(OpAdapter):
    """2-D Conv; weight (O, Cin/G, kh, kw)."""

    op_type = "Conv"

    def geometry(
        self, n: onnx.NodeProto, w: np.ndarray, view: GraphView
    ) -> tuple[ConvGeom | None, str | None]:
        a = attrs(n)
        if w.ndim != 4:
            return None, f"{w.ndim - 2}-D convolution (only 2-D is supported)"
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None, "auto_pad is set and the input shape is unknown (no explicit pads)"
        k = tuple(int(x) for x in a.get("kernel_shape", w.shape[2:]))  # type: ignore[union-attr]
        geom = ConvGeom(
            int(a.get("group", 1)),  # type: ignore[arg-type]
            (k[0], k[1]),
            tuple(int(x) for x in a.get("strides", [1, 1])),  # type: ignore[arg-type, union-attr]
            tuple(int(x) for x in a.get("pads", [0, 0, 0, 0])),  # type: ignore[arg-type, union-attr]
            tuple(int(x) for x in a.get("dilations", [1, 1])),  # type: ignore[arg-type, union-attr]
        )
        return geom, None

    def to_matrix(self, rec: LayerRecord, w: np.ndarray) -> np.ndarray:
        g = rec.groups
        return w.reshape(g, w.shape[0] // g, -1)

    def positions(self, rec: LayerRecord, max_positions: int) -> int:
        k = rec.weight_shape[1] * rec.weight_shape[2] * rec.weight_shape[3]
        return min(max_positions, max(1024, 8 * k))

    def columns(
        self, rec: LayerRecord, x: np.ndarray, positions: int, rng: np.random.Generator
    ) -> np.ndarray:
        gm = rec.geom
        assert gm is not None
        return conv_patches(
            x,
            group=gm.group,
            kernel=gm.kernel,
            strides=gm.strides,
            pads=gm.pads,
            dilations=gm.dilations,
            positions=positions,
            rng=rng,
        )

    def input_order(self, rec: LayerRecord) -> np.ndarray:
        cin_g, kh, kw = rec.weight_shape[1], rec.weight_shape[2], rec.weight_shape[3]
        return np.arange(cin_g * kh * kw).reshape(cin_g, kh, kw).transpose(1, 2, 0).ravel()

    def drop_inputs(self, rec: LayerRecord, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
        if rec.groups != 1:
            raise ValueError("input channels of a grouped conv go with its output channels")
        return w[:, keep]


class GemmAdapter(OpAdapter):
    """Gemm in normal form (transB=1, alpha=beta=1); weight (O, K)."""

    op_type = "Gemm"

    def geometry(
        self, n: onnx.NodeProto, w: np.ndarray, view: GraphView
    ) -> tuple[ConvGeom | None, str | None]:
        a = attrs(n)
        if (
            a.get("transA", 0)
            or not a.get("transB", 0)
            or a.get("alpha", 1.0) != 1.0
            or a.get("beta", 1.0) != 1.0
        ):
            return None, "Gemm is not in normal form (alpha=beta=1, transB=1)"
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if bias is not None and (view.const_or_none(bias) is None or view.const(bias).ndim != 1):
            return None, "Gemm bias is not a constant vector"
        return None, None


class MatMulAdapter(OpAdapter):
    """MatMul with a constant right-hand matrix; weight (K, O)."""

    op_type = "MatMul"
    out_axis = 1

    def geometry(
        self, n: onnx.NodeProto, w: np.ndarray, view: GraphView
    ) -> tuple[ConvGeom | None, str | None]:
        return None, None if w.ndim == 2 else "MatMul weight is not a matrix"

    def to_matrix(self, rec: LayerRecord, w: np.ndarray) -> np.ndarray:
        return w.T[None]

    def from_matrix(self, rec: LayerRecord, m: np.ndarray) -> np.ndarray:
        return m[0].T


OPS: dict[str, OpAdapter] = {
    "Conv": ConvAdapter(),
    "Gemm": GemmAdapter(),
    "MatMul": MatMulAdapter(),
}
"""The compressible ops (default ONNX domain). ConvTranspose comes later."""
