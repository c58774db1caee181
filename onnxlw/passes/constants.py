"""Constant folding: Constant nodes become initializers; all-constant subgraphs are evaluated.

Exporters emit Clip bounds and Pad amounts as Constant/Cast chains; folding them lets later
rules read them as plain arrays. A Constant holding strings stays a node.

Hand-written, one node at a time with onnx's ReferenceEvaluator: ``gs.Graph.fold_constants``
would fold with onnxruntime's semantics instead, but it needs the gs round trip that
:mod:`onnxlw.graph` avoids (it drops doc strings and metadata).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from ..graph import GraphView, rebuild, used_names
from .base import Note, PassResult

_NEVER_FOLD = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
}
_MAX_FOLD_ELEMENTS = 1 << 20


def fold_constants(model: onnx.ModelProto) -> PassResult:
    """Replace Constant nodes and nodes whose inputs are all constant by initializers."""
    view = GraphView(model)
    consts: dict[str, np.ndarray] = {}
    inits = list(model.graph.initializer)
    init_names = {t.name for t in inits} | set(view.sparse_initializers)
    nodes: list[onnx.NodeProto] = []
    notes: list[Note] = []
    folded = 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for n in view.nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and view.is_const(n.output[0]):
            consts[n.output[0]] = view.const(n.output[0])
            folded += 1
            continue
        ins = [i for i in n.input if i]
        if (
            ins
            and n.domain in ("", "ai.onnx")
            and n.op_type not in _NEVER_FOLD
            and all(i in consts or i in init_names for i in ins)
            and all(o for o in n.output)
        ):
            values = {i: consts[i] if i in consts else view.const(i) for i in ins}
            if sum(v.size for v in values.values()) <= _MAX_FOLD_ELEMENTS:
                out = _evaluate(n, values, opset)
                if out is not None and sum(o.size for o in out) <= _MAX_FOLD_ELEMENTS:
                    consts.update(zip(n.output, out, strict=True))
                    folded += 1
                    continue
        nodes.append(n)
    used = used_names(nodes) | set(view.graph_outputs)
    dense_names = {t.name for t in inits}
    for name, v in consts.items():
        if name in used and name not in dense_names and name not in view.sparse_initializers:
            inits.append(numpy_helper.from_array(np.asarray(v), name))
    notes.append(
        Note(
            "fold_constants",
            "constant",
            "graph",
            folded > 0,
            f"folded {folded} constant nodes" if folded else "no constant subgraph",
        )
    )
    return PassResult(rebuild(model, nodes, inits), notes)


def _evaluate(
    node: onnx.NodeProto, values: dict[str, np.ndarray], opset: int
) -> list[np.ndarray] | None:
    inputs = [
        onnx.helper.make_tensor_value_info(
            k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape
        )
        for k, v in values.items()
    ]
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output]
    g = onnx.helper.make_graph([node], "fold", inputs, outputs)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        res = ReferenceEvaluator(m).run(None, values)
    except Exception:  # noqa: BLE001 - an op the reference runtime lacks stays in the graph
        return None
    return [np.asarray(r) for r in res]
