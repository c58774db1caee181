"""Find the compressible layers, what synthesis can run, and each layer's distribution sources.

Analysis creates the records every later stage uses: a layer is identified by its
:class:`~onnxlw.ops.LayerRecord` (index and node name), never by tensor-name conventions.
Where activations get Q/DQ pairs is a backend fact (:mod:`onnxlw.targets.ort_cpu`).
Every Conv/Gemm/MatMul of the graph gets a record; one that is not compressed carries the
reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import onnx
from onnx import shape_inference

from .graph import GraphView
from .ops import OPS, ConvGeom, LayerRecord
from .passes import Canonical
from .targets import ort_cpu
from .targets.ort_cpu import QTensor

__all__ = ["Analysis", "ConvGeom", "LayerRecord", "QTensor", "analyze"]

UNSYNTHESIZABLE_OPS = frozenset(
    """RandomNormal RandomUniform RandomNormalLike RandomUniformLike Multinomial Bernoulli
    """.split()
)
"""Standard ops whose output is not a function of their inputs: synthesis cannot match them.
Every other op of the default domain runs in the synthesis session as in FP32."""

INT_OUTPUT_OPS = frozenset(
    "Shape Size NonZero ArgMax ArgMin TopK NonMaxSuppression Equal Greater Less GreaterOrEqual "
    "LessOrEqual Not And Or Xor IsNaN IsInf".split()
)


@dataclass
class Analysis:
    """Result of analysis: layers, activation tensors to quantize, skips and notes."""

    layers: list[LayerRecord]
    qtensors: dict[str, QTensor]
    skips: list[tuple[str, str]] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)
    float_outputs: list[tuple[str, str]] = field(default_factory=list)
    """(tensor, reason) for layer outputs deliberately left in float."""
    input_data: frozenset[str] = frozenset()
    """The graph inputs and the tensors computed from one of them alone by layout ops and
    constant arithmetic (an NHWC Transpose, an in-graph normalization): data, not
    activations a layer produced (their grid is ``Config.input_bits``)."""

    @property
    def active_layers(self) -> list[LayerRecord]:
        """Layers that will be compressed."""
        return [r for r in self.layers if r.skip is None]


def analyze(
    canon: Canonical,
    *,
    quantize_classifier: bool = True,
    exclude: tuple[str, ...] = (),
    float_heads: bool = True,
) -> Analysis:
    """Walk the canonical graph once and build every record later stages need."""
    model = canon.model
    view = GraphView(model)
    tainted = _tainted_tensors(view)
    unsupported = sorted({_op_id(n) for n in view.nodes if not _synth_safe(n)})
    floats = float_tensors(model, view)
    dynamic = _dynamic_tensors(view)
    layers: list[LayerRecord] = []
    for n in view.nodes:
        if n.op_type not in OPS or n.domain not in ("", "ai.onnx"):
            continue
        rec = _record(n, len(layers), view, dynamic)
        if rec.skip is None and rec.input in tainted:
            rec.skip = "its input passes through an op synthesis cannot run: " + ", ".join(
                sorted(tainted[rec.input])
            )
        if rec.skip is None and rec.input in view.graph_outputs:
            rec.skip = "its input is a graph output"
        if rec.skip is None and view.is_const(rec.input):
            rec.skip = "its input is a constant"
        if rec.skip is None and rec.input not in floats:
            rec.skip = "its input is not a float32 tensor"
        rec.is_classifier = rec.op_type != "Conv" and _feeds_output(rec.output, view)
        if rec.skip is None and rec.is_classifier and not quantize_classifier:
            rec.skip = "classifier left in float (quantize_classifier=False)"
        if rec.skip is None and exclude:
            hit = next(
                (
                    p
                    for p in exclude
                    if any(fnmatch.fnmatchcase(s, p) for s in (rec.node, rec.weight, rec.op_type))
                ),
                None,
            )
            if hit is not None:
                rec.skip = f"excluded by pattern {hit!r}"
        if rec.skip is None:
            rec.sources = _sources(rec.input, view, set(canon.bn_stats))
        layers.append(rec)
    skips = [(r.node, r.skip) for r in layers if r.skip is not None]
    is_act = {t for t in floats if t not in tainted}
    float_outputs: list[tuple[str, str]] = []
    q = ort_cpu.activation_plan(view, layers, is_act, float_outputs, heads=float_heads)
    return Analysis(layers, q, skips, unsupported, float_outputs, _input_data(view))


INPUT_DATA_OPS = frozenset({
    "Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice",
    "Pad", "Add", "Sub", "Mul", "Div",
})
"""Ops whose output is still the input data when every other operand is a constant."""


def _input_data(view: GraphView) -> frozenset[str]:
    """Graph inputs and what layout ops and constant arithmetic make of one of them alone."""
    data = set(view.graph_inputs)
    todo = list(data)
    while todo:
        t = todo.pop()
        for n in view.consumers.get(t, []):
            if n.op_type not in INPUT_DATA_OPS or not n.output or n.output[0] in data:
                continue
            others = [i for i in n.input if i and i != t]
            if all(view.is_const(i) for i in others):
                data.add(n.output[0])
                todo.append(n.output[0])
    return frozenset(data)


def _record(
    n: onnx.NodeProto, index: int, view: GraphView, dynamic: set[str]
) -> LayerRecord:
    """The op registry's record, or a record that says why the weight is not usable."""
    adapter = OPS[n.op_type]
    if len(n.input) >= 2 and view.is_const(n.input[1]):
        return adapter.record(n, index, view)
    w = n.input[1] if len(n.input) > 1 else ""
    p = view.producer.get(w)
    if p is None:
        why = "its weight is a graph input, not a constant"
    elif p.op_type == "DequantizeLinear":
        why = (
            f"its weight is computed at run time by DequantizeLinear {p.name!r} (an already "
            "quantized model? pass the FP32 model)"
        )
    elif w in dynamic:
        why = (
            f"its second operand is an activation (from {p.op_type} {p.name!r}): an "
            "activation-by-activation product such as attention, not a layer with weights"
        )
    else:
        why = (
            f"its weight is computed at run time by {p.op_type} {p.name!r} from constants "
            "that were not folded (over the folding size limit)"
        )
    return LayerRecord(
        index, n.name, n.op_type, n.input[0], n.output[0], w, None, (), None, (),
        adapter.out_axis, skip=why,
    )


def float_tensors(model: onnx.ModelProto, view: GraphView) -> set[str]:
    """Names of float32 tensors (by shape inference, else by the producing op)."""
    def known(g: onnx.GraphProto) -> dict[str, int]:
        return {
            vi.name: vi.type.tensor_type.elem_type
            for vi in list(g.value_info) + list(g.input) + list(g.output)
        }

    types = known(model.graph)  # load inferred shapes and the passes keep value_info
    if any(o and o not in types for n in view.nodes for o in n.output):
        try:  # a full copy of the model: only when the kept value_info is incomplete
            types = known(shape_inference.infer_shapes(model, strict_mode=False).graph)
        except Exception:  # noqa: BLE001 - best effort; fall back to the op rule
            pass
    out: set[str] = set()
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            out.add(vi.name)
    for n in view.nodes:
        for o in n.output:
            if not o:
                continue
            t = types.get(o, 0)
            if t == onnx.TensorProto.FLOAT or (t == 0 and n.op_type not in INT_OUTPUT_OPS
                                               and n.op_type != "Cast"):
                out.add(o)
    return out


def _dynamic_tensors(view: GraphView) -> set[str]:
    """Tensors that depend on a graph input (not constant expressions)."""
    out = set(view.graph_inputs)
    for n in view.nodes:
        if any(i in out for i in n.input if i):
            out.update(o for o in n.output if o)
    return out


def _op_id(n: onnx.NodeProto) -> str:
    return f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type


def _synth_safe(n: onnx.NodeProto) -> bool:
    return n.domain in ("", "ai.onnx") and n.op_type not in UNSYNTHESIZABLE_OPS


def _tainted_tensors(view: GraphView) -> dict[str, frozenset[str]]:
    """Tensors downstream of an op synthesis cannot run, with the ops responsible."""
    tainted: dict[str, frozenset[str]] = {}
    for n in view.nodes:
        why = frozenset().union(*(tainted.get(i, frozenset()) for i in n.input))
        if not _synth_safe(n):
            why = why | {_op_id(n)}
        if why:
            tainted.update((o, why) for o in n.output if o)
    return tainted


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
