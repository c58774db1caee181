"""Find the compressible layers, the activation tensors to quantize, and their sources.

Analysis creates the records every later stage uses: a layer is identified by its
:class:`LayerRecord` (index and node name), never by tensor-name conventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GraphView, attrs
from .passes import Canonical

SYNTH_SAFE_OPS = frozenset(
    """Conv ConvTranspose Gemm MatMul BatchNormalization Relu Clip LeakyRelu PRelu Sigmoid
    HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Mish Gelu Erf Mul Add Sub Div Pow
    Sqrt Neg Abs Exp Log Reciprocal Min Max Mean Sum Concat Split Slice GlobalAveragePool
    GlobalMaxPool AveragePool MaxPool LpPool Pad Reshape Flatten Squeeze Unsqueeze Transpose
    Shape Size Gather Cast Identity Resize Upsample ReduceMean ReduceMax ReduceMin ReduceSum
    Softmax LogSoftmax Expand Tile Where Equal Greater Less Not And Or ConstantOfShape
    DepthToSpace SpaceToDepth InstanceNormalization LRN Floor Ceil Round Sign ArgMax
    """.split()
)
"""Deterministic standard ops that the synthesis run executes exactly (default domain)."""

PASS_THROUGH_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool"})
"""Ops whose output keeps its input's quantization parameters (ORT drops their Q/DQ pair)."""

QUANT_IO_OPS = frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool"})
"""Non-layer ops run in integer arithmetic by ORT when their inputs and output are quantized."""


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


@dataclass
class QTensor:
    """An activation tensor that gets a Q/DQ pair.

    ``lo_bound``/``hi_bound`` come from an absorbed Relu/Clip (the range must lie within).
    ``same_as`` names the tensor whose parameters a pass-through output reuses.
    ``pre`` is the pre-activation tensor the Q reads when the activation node is absorbed.
    """

    name: str
    lo_bound: float | None = None
    hi_bound: float | None = None
    same_as: str | None = None
    pre: str | None = None
    absorbed_node: str | None = None


@dataclass
class Analysis:
    """Result of analysis: layers, activation tensors to quantize, skips and barriers."""

    layers: list[LayerRecord]
    qtensors: dict[str, QTensor]
    skips: list[tuple[str, str]] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)

    @property
    def active_layers(self) -> list[LayerRecord]:
        """Layers that will be quantized."""
        return [r for r in self.layers if r.skip is None]


def analyze(canon: Canonical, *, quantize_classifier: bool = True) -> Analysis:
    """Walk the canonical graph once and build every record later stages need."""
    model = canon.model
    view = GraphView(model)
    tainted = _tainted_tensors(view)
    unsupported = sorted({_op_id(n) for n in view.nodes if not _synth_safe(n)})
    layers: list[LayerRecord] = []
    skips: list[tuple[str, str]] = []
    q: dict[str, QTensor] = {}
    outputs = set(view.graph_outputs)

    def want(t: str, allow_output: bool = False) -> bool:
        return (
            bool(t)
            and not view.is_const(t)
            and (allow_output or t not in outputs)
            and t not in tainted
        )

    def add_output(t: str, allow_output: bool = False) -> None:
        """Quantize a layer's output (or the Relu/Clip after it). ``allow_output``: also
        when it is a graph output (a Conv must end in a Q to fuse)."""
        if not want(t, allow_output) or t in q:
            return
        act = view.single_consumer(t)
        bounds = _absorbable(act, view) if act is not None else None
        if act is not None and bounds is not None and want(act.output[0], allow_output):
            q[act.output[0]] = QTensor(
                act.output[0], bounds[0], bounds[1], pre=t, absorbed_node=act.name
            )
        else:
            q[t] = QTensor(t)

    for n in view.nodes:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.domain in ("", "ai.onnx"):
            rec = _layer_record(n, len(layers), view, canon)
            if rec is None:
                continue
            if rec.skip is None and rec.input in tainted:
                rec.skip = "its input passes through an op synthesis cannot run: " + ", ".join(
                    sorted(tainted[rec.input])
                )
            if rec.skip is None and rec.input in view.graph_outputs:
                rec.skip = "its input is a graph output"
            if rec.skip is None and view.is_const(rec.input):
                rec.skip = "its input is a constant"
            rec.is_classifier = rec.op_type != "Conv" and _feeds_output(rec.output, view)
            if rec.skip is None and rec.is_classifier and not quantize_classifier:
                rec.skip = "classifier left in float (quantize_classifier=False)"
            layers.append(rec)
            if rec.skip is not None:
                skips.append((rec.node, rec.skip))
                continue
            rec.sources = _sources(rec.input, view, set(canon.bn_stats))
            q.setdefault(rec.input, QTensor(rec.input))
            add_output(rec.output, allow_output=rec.op_type == "Conv")
        elif n.op_type in QUANT_IO_OPS:
            ins = [i for i in n.input[: (None if n.op_type == "Concat" else 2)] if i]
            if n.op_type == "Add" and (len(ins) != 2 or any(view.is_const(i) for i in ins)):
                continue
            if all(want(i) for i in ins) and want(n.output[0]):
                for i in ins:
                    q.setdefault(i, QTensor(i))
                add_output(n.output[0])
        elif n.op_type in PASS_THROUGH_OPS and n.input and n.input[0] in q:
            t = n.output[0]
            if want(t) and t not in q:
                q[t] = QTensor(t, same_as=_root(n.input[0], q))
    return Analysis(layers, q, skips, unsupported)


def _root(t: str, q: dict[str, QTensor]) -> str:
    while q[t].same_as is not None:
        t = q[t].same_as  # type: ignore[assignment]
    return t


def _op_id(n: onnx.NodeProto) -> str:
    return f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type


def _synth_safe(n: onnx.NodeProto) -> bool:
    return n.domain in ("", "ai.onnx") and n.op_type in SYNTH_SAFE_OPS and n.op_type != "Constant"


def _tainted_tensors(view: GraphView) -> dict[str, frozenset[str]]:
    """Tensors downstream of an op synthesis cannot run, with the ops responsible."""
    tainted: dict[str, frozenset[str]] = {}
    for n in view.nodes:
        why = frozenset().union(*(tainted.get(i, frozenset()) for i in n.input))
        if not _synth_safe(n) and n.op_type != "Constant":
            why = why | {_op_id(n)}
        if why:
            tainted.update((o, why) for o in n.output if o)
    return tainted


def _absorbable(act: onnx.NodeProto, view: GraphView) -> tuple[float, float] | None:
    """(lo, hi) if ``act`` is Relu or Clip with a lower bound of 0 (its Q can replace it)."""
    if act.op_type == "Relu":
        return 0.0, float("inf")
    if act.op_type != "Clip":
        return None
    lo = view.const_or_none(act.input[1]) if len(act.input) > 1 and act.input[1] else None
    hi = view.const_or_none(act.input[2]) if len(act.input) > 2 and act.input[2] else None
    if lo is None or float(lo) != 0.0:
        return None
    if len(act.input) > 2 and act.input[2] and hi is None:
        return None
    return 0.0, float(hi) if hi is not None else float("inf")


def _feeds_output(t: str, view: GraphView) -> bool:
    """True when ``t`` reaches a graph output through shape-only or softmax ops."""
    seen = 0
    while seen < 8:
        if t in view.graph_outputs:
            return True
        nxt = view.single_consumer(t)
        if nxt is None or nxt.op_type not in {
            "Reshape",
            "Flatten",
            "Softmax",
            "Squeeze",
            "Identity",
            "LogSoftmax",
        }:
            return False
        t = nxt.output[0]
        seen += 1
    return False


def _sources(t: str, view: GraphView, bn: set[str]) -> tuple[str, ...]:
    """Distribution sources of tensor ``t``: nearest BN outputs or graph inputs upstream."""
    found: list[str] = []
    stack, seen = [t], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur in bn:
            found.append(f"bn:{cur}")
            continue
        if cur in view.graph_inputs:
            found.append(f"input:{cur}")
            continue
        p = view.producer.get(cur)
        if p is None:
            continue
        data_inputs = (
            p.input[:1]
            if p.op_type in ("Conv", "Gemm", "MatMul", "Reshape", "Pad", "Clip", "Expand")
            else p.input
        )
        stack.extend(i for i in data_inputs if i and not view.is_const(i))
    return tuple(sorted(set(found)))


def _layer_record(
    n: onnx.NodeProto, index: int, view: GraphView, canon: Canonical
) -> LayerRecord | None:
    a = attrs(n)
    if len(n.input) < 2 or not view.is_const(n.input[1]):
        return None
    w = view.const(n.input[1])
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    skip = None
    geom = None
    out_axis = 0
    if w.dtype != np.float32:
        skip = f"weight dtype {w.dtype} is not float32"
    if n.op_type == "Conv":
        if w.ndim != 4:
            skip = skip or f"{w.ndim - 2}-D convolution (only 2-D is supported)"
        elif a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            skip = skip or "auto_pad is set"
        else:
            k = tuple(int(x) for x in a.get("kernel_shape", w.shape[2:]))
            geom = ConvGeom(
                int(a.get("group", 1)),
                (k[0], k[1]),
                tuple(int(x) for x in a.get("strides", [1, 1])),  # type: ignore[arg-type]
                tuple(int(x) for x in a.get("pads", [0, 0, 0, 0])),  # type: ignore[arg-type]
                tuple(int(x) for x in a.get("dilations", [1, 1])),  # type: ignore[arg-type]
            )
    elif n.op_type == "Gemm":
        if (
            a.get("transA", 0)
            or not a.get("transB", 0)
            or a.get("alpha", 1.0) != 1.0
            or a.get("beta", 1.0) != 1.0
        ):
            skip = skip or "Gemm is not in normal form (alpha=beta=1, transB=1)"
        if bias is not None and (view.const_or_none(bias) is None or view.const(bias).ndim != 1):
            skip = skip or "Gemm bias is not a constant vector"
    elif n.op_type == "MatMul":
        if w.ndim != 2:
            skip = skip or "MatMul weight is not a matrix"
        out_axis = 1
    if bias is not None and not view.is_const(bias):
        skip = skip or "bias is not constant"
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
        out_axis,
        skip=skip,
    )
