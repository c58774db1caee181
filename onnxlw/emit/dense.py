"""Write a float model whose compressed layers carry their solutions' float weights.

For pruned FP32 output: each compressed layer's weight and bias initializers are replaced by
the plan's (zeros included); a MatMul layer whose bias became non-zero (bias correction) gets
an ``Add`` after it. Everything else is the canonical model unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..analyze import Analysis
from ..graph import GraphView, NameAllocator, bias_add, rebuild
from ..passes import Canonical
from ..plan import Plan


def emit_dense(canon: Canonical, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """A new float model; the canonical model is not modified."""
    model = canon.model
    view = GraphView(model)
    alloc = NameAllocator(model)
    inits: list[onnx.TensorProto] = list(model.graph.initializer)
    layers = {r.node: r for r in analysis.active_layers if r.index in plan.layers}
    nodes: list[onnx.NodeProto] = []
    for n in view.nodes:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        rec = layers.get(n.name)
        if rec is None:
            nodes.append(m)
            continue
        sol = plan.layers[rec.index]
        w = rec.adapter.from_matrix(rec, sol.weight).astype(np.float32)
        wn = alloc.fresh(f"{rec.weight}_pruned")
        inits.append(numpy_helper.from_array(w, wn))
        m.input[1] = wn
        bias = sol.bias.reshape(-1).astype(np.float32)
        bn = alloc.fresh(f"{rec.bias or rec.node + '_bias'}_corrected")
        if rec.op_type == "MatMul":
            nodes.append(m)
            if np.any(bias != 0):
                inits.append(numpy_helper.from_array(bias, bn))
                nodes.append(bias_add(m, bn, alloc))
            continue
        inits.append(numpy_helper.from_array(bias, bn))
        if len(m.input) > 2:
            m.input[2] = bn
        else:
            m.input.append(bn)
        nodes.append(m)
    return rebuild(model, nodes, inits)
