"""Write the QDQ model that onnxruntime fuses into integer kernels.

Conventions (x86 CPU, from :mod:`onnxlw.targets.ort_cpu`): uint8 asymmetric per-tensor
activations; int8 symmetric per-channel weights in [-127, 127] on the output-channel axis;
int32 bias whose scale is the input scale times the weight scale. Every quantized Conv reads
``DQ(x)``, ``DQ(w)``, ``DQ(b)`` and feeds one ``Q``, so onnxruntime rewrites it as
QLinearConv. A Relu/Clip(0, hi) after a layer is absorbed into that Q when the Q's range lies
within the clip.

Below 8 bits: weights are int8 tensors whose levels lie in [-(2**(b-1) - 1), 2**(b-1) - 1]
(the pack stage stores them in b bits); activations keep uint8 Q/DQ with a uint8 Clip to
[0, 2**b - 1] between them, which onnxruntime runs between its fused integer kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analyze import Analysis
from ..errors import InternalError
from ..graph import GraphView, NameAllocator, bias_add, rebuild
from ..io import default_opset
from ..passes import Canonical
from ..plan import Plan
from ..solve.problem import CodebookRef, QuantEncoding
from ..targets.ort_cpu import ACT_DTYPE, BIAS_DTYPE, INT32_MAX, act_levels, weight_dtype


def act_qdq(
    name: str,
    src: str,
    q_out: str,
    dq_out: str,
    scale: str,
    zero_point: str,
    bits: int,
    alloc: NameAllocator,
    inits: list[onnx.TensorProto],
) -> list[onnx.NodeProto]:
    """QuantizeLinear(src) -> [uint8 Clip to the ``bits``-bit levels] -> DequantizeLinear
    writing ``dq_out``: an activation quantizer as onnxruntime runs it. The Clip's bounds are
    appended to ``inits``; new names derive from ``name``."""
    nodes = [
        helper.make_node(
            "QuantizeLinear", [src, scale, zero_point], [q_out],
            name=alloc.fresh(f"{name}_QuantizeLinear"),
        ),
    ]
    if bits < 8:  # b-bit grid: the uint8 levels clipped to [0, 2**b - 1]
        lo_n, hi_n = alloc.fresh(f"{name}_level_min"), alloc.fresh(f"{name}_level_max")
        inits += [
            numpy_helper.from_array(np.array(0, ACT_DTYPE), lo_n),
            numpy_helper.from_array(np.array(act_levels(bits), ACT_DTYPE), hi_n),
        ]
        q_clip = alloc.fresh(f"{name}_quantized_{bits}bit")
        nodes.append(
            helper.make_node("Clip", [q_out, lo_n, hi_n], [q_clip], name=alloc.fresh(
                f"{name}_Clip"))
        )
        q_out = q_clip
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [q_out, scale, zero_point], [dq_out],
            name=alloc.fresh(f"{name}_DequantizeLinear"),
        )
    )
    return nodes


def emit_qdq(canon: Canonical, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """A new QDQ model; the canonical FP32 model is not modified."""
    model = canon.model
    opset = default_opset(model)
    view = GraphView(model)
    alloc = NameAllocator(model)
    inits: list[onnx.TensorProto] = list(model.graph.initializer)
    absorbed = {n for qt in analysis.qtensors.values() for n in qt.absorbed}
    rewire: dict[str, str] = {}  # FP tensor -> its dequantized replacement for consumers
    after: dict[str, list[onnx.NodeProto]] = {}  # producer-output -> Q/DQ nodes to insert
    head: list[onnx.NodeProto] = []

    outputs = set(view.graph_outputs)
    renamed_out: dict[str, str] = {}  # graph output written by a DQ: producer writes this
    for name, qt in analysis.qtensors.items():
        r = plan.activations[name]
        s_name, z_name = alloc.fresh(f"{name}_scale"), alloc.fresh(f"{name}_zero_point")
        inits += [
            numpy_helper.from_array(np.array(r.scale, np.float32), s_name),
            numpy_helper.from_array(np.array(r.zero_point, ACT_DTYPE), z_name),
        ]
        src = qt.pre if qt.pre is not None else name
        q_out, dq_out = alloc.fresh(f"{name}_quantized"), alloc.fresh(f"{name}_dequantized")
        if name in outputs:  # the DQ writes the graph output; the producer gets a new name
            dq_out = name
            if qt.pre is None:
                src = renamed_out[name] = alloc.fresh(f"{name}_float")
        nodes = act_qdq(name, src, q_out, dq_out, s_name, z_name, r.bits, alloc, inits)
        if src in view.graph_inputs:
            head += nodes
        else:
            after.setdefault(qt.pre if qt.pre is not None else name, []).extend(nodes)
        if name not in outputs:
            rewire[name] = dq_out

    layer_inputs: dict[str, tuple[str, str]] = {}
    for rec in analysis.active_layers:
        sol = plan.layers[rec.index]
        enc = sol.encoding
        if isinstance(enc, CodebookRef) and enc.quant is not None:
            enc = enc.quant  # int8 levels, rebuilt from the codes by the store stage
        if not isinstance(enc, QuantEncoding):
            raise InternalError(f"layer {rec.node!r} has no quantized encoding for the QDQ format")
        x_scale = np.float32(plan.activations[rec.input].scale)
        w_scale = enc.scale.reshape(-1).astype(np.float32)
        wdt = weight_dtype(enc.bits, opset)
        q = rec.adapter.from_matrix(rec, enc.q).astype(wdt)
        axis = rec.out_axis
        wq, ws, wz = (
            alloc.fresh(f"{rec.weight}_quantized"),
            alloc.fresh(f"{rec.weight}_scale"),
            alloc.fresh(f"{rec.weight}_zero_point"),
        )
        wdq = alloc.fresh(f"{rec.weight}_dequantized")
        inits += [
            numpy_helper.from_array(q, wq),
            numpy_helper.from_array(w_scale, ws),
            numpy_helper.from_array(np.zeros_like(w_scale, wdt), wz),
        ]
        deq = [
            helper.make_node(
                "DequantizeLinear",
                [wq, ws, wz],
                [wdq],
                axis=axis,
                name=alloc.fresh(f"{rec.weight}_DequantizeLinear"),
            )
        ]
        b_scale = (x_scale * w_scale).astype(np.float32)
        bias_f = sol.bias.reshape(-1).astype(np.float64)
        bq = np.rint(bias_f / b_scale.astype(np.float64))
        if np.any(np.abs(bq) > INT32_MAX):  # the solver raises the weight scale to prevent it
            raise InternalError(f"the int32 bias of layer {rec.node!r} overflows")
        base = rec.bias or f"{rec.node}_bias"
        bqn, bsn, bzn = (
            alloc.fresh(f"{base}_quantized"),
            alloc.fresh(f"{base}_scale"),
            alloc.fresh(f"{base}_zero_point"),
        )
        bdq = alloc.fresh(f"{base}_dequantized")
        inits += [
            numpy_helper.from_array(bq.astype(BIAS_DTYPE), bqn),
            numpy_helper.from_array(b_scale, bsn),
            numpy_helper.from_array(np.zeros(len(b_scale), BIAS_DTYPE), bzn),
        ]
        deq.append(
            helper.make_node(
                "DequantizeLinear",
                [bqn, bsn, bzn],
                [bdq],
                axis=0,
                name=alloc.fresh(f"{base}_DequantizeLinear"),
            )
        )
        head += deq
        layer_inputs[rec.node] = (wdq, bdq)

    out_nodes: list[onnx.NodeProto] = list(head)
    for n in view.nodes:
        if n.name in absorbed:
            continue
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for k, i in enumerate(m.input):
            if i in rewire:
                m.input[k] = rewire[i]
        for k, o in enumerate(m.output):
            if o in renamed_out:
                m.output[k] = renamed_out[o]
        if n.name in layer_inputs:
            wdq, bdq = layer_inputs[n.name]
            m.input[1] = wdq
            if n.op_type != "MatMul":  # MatMul has no bias input; _matmul_bias adds it
                if len(m.input) > 2:
                    m.input[2] = bdq
                else:
                    m.input.append(bdq)
        out_nodes.append(m)
        for o in n.output:
            out_nodes.extend(after.get(o, []))
    out_nodes = _matmul_bias(out_nodes, analysis, layer_inputs, alloc)
    return rebuild(model, out_nodes, inits)


def _matmul_bias(
    nodes: list[onnx.NodeProto],
    analysis: Analysis,
    layer_inputs: dict[str, tuple[str, str]],
    alloc: NameAllocator,
) -> list[onnx.NodeProto]:
    """MatMul has no bias input: add the corrected bias with an Add after it."""
    mm = {r.node: r for r in analysis.active_layers if r.op_type == "MatMul"}
    if not mm:
        return nodes
    out: list[onnx.NodeProto] = []
    for n in nodes:
        if n.name in mm:
            add = bias_add(n, layer_inputs[n.name][1], alloc)
            out += [n, add]
        else:
            out.append(n)
    return out
