"""Synthesize every quantized tensor's values from BatchNorm statistics, with no data.

One onnxruntime run of a *synthesis model* derived from the canonical FP32 model:

- ``MATCHED``: graph inputs are drawn from the declared distribution; after every tensor that
  a BatchNorm produced, a moment-matching block re-standardizes each channel over the
  synthetic batch to mean ``B_c`` and std ``|scale_c|``. Everything between BNs (activations,
  residual adds, pads, pools, concats, SE multiplies, the convs themselves) runs as in FP32.
- ``GAUSSIAN``: every BN output is cut and replaced by fresh i.i.d. N(B_c, scale_c^2) samples.

Without BN statistics both modes reduce to propagating the declared input distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..analyze import Analysis
from ..config import Config, Synthesis
from ..errors import OnnxlwError
from ..graph import GraphView, NameAllocator
from ..io import default_opset
from ..ortutil import run_model_batched
from ..passes import Canonical
from .inputs import synthetic_input


@dataclass
class Samples:
    """Synthesized FP32 values: tensor name -> array (N, C, ...). ``inputs`` are the feeds."""

    values: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    mode: str
    fallback: str | None


def input_shapes(model: onnx.ModelProto, config: Config, batch: int) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the graph inputs: pins from the config, else static dims, batch=N."""
    pins = config.input_shape_map()
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, tuple[int, ...]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name in pins:
            dims = list(pins[vi.name])
        else:
            dims = [
                d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim
            ]
        dims[0] = batch
        out[vi.name] = tuple(dims)
    return out


def synthesize(canon: Canonical, analysis: Analysis, config: Config) -> Samples:
    """Run the synthesis model once and return the values of every tensor analysis needs."""
    rng = np.random.default_rng(config.seed)
    model = canon.model
    shapes = input_shapes(model, config, config.samples)
    feeds = {}
    for name, shape in shapes.items():
        et = _elem_type(model, name)
        if et != TensorProto.FLOAT:
            raise OnnxlwError(
                f"input {name!r} has element type {et}, synthesis needs float32",
                "export the model with a float32 image input",
            )
        feeds[name] = synthetic_input(shape, config.input_distribution, rng)
    wanted = [t for t in analysis.qtensors if analysis.qtensors[t].same_as is None]
    for r in analysis.active_layers:
        if r.input not in wanted:
            wanted.append(r.input)
    stats = canon.bn_stats
    mode = config.synthesis
    cut_values: dict[str, np.ndarray] = {}
    if mode is Synthesis.GAUSSIAN and stats:
        shp = _static_shapes(model, shapes)
        for t in sorted(stats):
            if t in shp:
                s = stats[t]
                c = len(s.bias)
                bshape = (1, c) + (1,) * (len(shp[t]) - 2)
                z = rng.standard_normal(shp[t]).astype(np.float32)
                cut_values[t] = (s.out_mean.reshape(bshape) + s.out_std.reshape(bshape) * z).astype(
                    np.float32
                )
    synth_model, out_map, cut_map = build_synthesis_model(
        model, stats if mode is Synthesis.MATCHED else {}, set(cut_values), wanted
    )
    graph_inputs = {i.name for i in synth_model.graph.input}
    feeds_all = {
        **feeds,
        **{cut_map[t]: v for t, v in cut_values.items() if cut_map[t] in graph_inputs},
    }
    names = [out_map[t] for t in wanted if t not in cut_values and t not in feeds]
    values: dict[str, np.ndarray] = {}
    chunked = False
    if names:
        res, chunked = run_model_batched(synth_model, feeds_all, names)
        values.update(zip(names, res, strict=True))
    out = {
        t: values[out_map[t]]
        if out_map[t] in values
        else (cut_values[t] if t in cut_values else feeds[t])
        for t in wanted
    }
    fallback = None if stats else "propagated-input-distribution"
    if chunked:  # a graph with a hard-coded batch: each image was matched on its own
        fallback = (fallback + "+" if fallback else "") + "per-image-batches"
    return Samples(out, feeds, mode.value, fallback)


def _elem_type(model: onnx.ModelProto, name: str) -> int | None:
    for vi in model.graph.input:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    return None


def _static_shapes(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[vi.name], strict=True):
                d.Clear()
                d.dim_value = v
    del m.graph.value_info[:]
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: tensors without a shape are not cut
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def build_synthesis_model(
    model: onnx.ModelProto,
    match: dict[str, object],
    cut: set[str],
    wanted: list[str],
) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str]]:
    """Derive the synthesis model.

    ``match``: BN-output tensors to re-standardize (name -> BNStats). ``cut``: BN-output tensors
    to replace by new graph inputs. Returns the model and a map from each wanted tensor to the
    name that carries its synthetic value (a graph output, or a graph input for cut tensors),
    and a map from each cut tensor to its new graph input. Nodes not needed for the wanted
    tensors are pruned, and so are the cut inputs they do not read.
    """
    view = GraphView(model)
    alloc = NameAllocator(model)
    opset = default_opset(model)
    rename: dict[str, str] = {}
    extra_nodes: dict[str, list[onnx.NodeProto]] = {}
    inits: list[onnx.TensorProto] = []
    new_inputs: list[onnx.ValueInfoProto] = []
    for t, s in match.items():
        if t not in view.producer:
            continue
        nodes, init, out = _moment_match(t, s, alloc, opset)
        extra_nodes[t] = nodes
        inits += init
        rename[t] = out
    for t in sorted(cut):
        new = alloc.fresh(t + "__synth")
        rename[t] = new
        new_inputs.append(helper.make_tensor_value_info(new, TensorProto.FLOAT, None))
    nodes: list[onnx.NodeProto] = []
    for n in view.nodes:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for k, i in enumerate(m.input):
            if i in rename:
                m.input[k] = rename[i]
        nodes.append(m)
        for o in n.output:
            nodes.extend(extra_nodes.get(o, []))
    out_map = {t: rename.get(t, t) for t in wanted}
    targets = {v for v in out_map.values()}
    nodes = _prune(nodes, targets)
    outputs = [
        helper.make_tensor_value_info(v, TensorProto.FLOAT, None)
        for v in dict.fromkeys(out_map.values())
        if v not in {i.name for i in new_inputs} and v not in view.graph_inputs
    ]
    used = {i for n in nodes for i in n.input}
    new_inputs = [i for i in new_inputs if i.name in used]
    g = helper.make_graph(
        nodes,
        "synthesis",
        list(model.graph.input) + new_inputs,
        outputs,
        list(model.graph.initializer) + inits,
    )
    sm = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return sm, out_map, {t: rename[t] for t in cut}


def _prune(nodes: list[onnx.NodeProto], targets: set[str]) -> list[onnx.NodeProto]:
    needed = set(targets)
    keep: list[onnx.NodeProto] = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


def _moment_match(
    t: str,
    s,
    alloc: NameAllocator,
    opset: int,  # noqa: ANN001 - BNStats
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes computing B + |scale| * standardize(t) per channel (axis 1) over the batch."""
    c = len(s.bias)
    n = lambda base: alloc.fresh(f"{t}__mm_{base}")  # noqa: E731
    eps_n = n("eps")
    inits = [numpy_helper.from_array(np.array(1e-12, np.float32), eps_n)]
    # Flatten to (N, C, L) so one set of axes works for any rank >= 2.
    shape_n, x3, m, d, d2, v, ve, sd, z, zs, y3, out = (
        n(k) for k in ("shape", "x3", "m", "d", "d2", "v", "ve", "sd", "z", "zs", "y3", "out")
    )
    shp3 = n("shp3")
    inits.append(numpy_helper.from_array(np.array([0, c, -1], np.int64), shp3))
    nodes = [
        helper.make_node("Shape", [t], [shape_n]),
        helper.make_node("Reshape", [t, shp3], [x3]),
    ]
    axes = [0, 2]
    if opset >= 18:
        ax = n("axes")
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), ax))
        nodes += [helper.make_node("ReduceMean", [x3, ax], [m], keepdims=1)]
    else:
        nodes += [helper.make_node("ReduceMean", [x3], [m], axes=axes, keepdims=1)]
    nodes += [helper.make_node("Sub", [x3, m], [d]), helper.make_node("Mul", [d, d], [d2])]
    if opset >= 18:
        nodes += [helper.make_node("ReduceMean", [d2, ax], [v], keepdims=1)]
    else:
        nodes += [helper.make_node("ReduceMean", [d2], [v], axes=axes, keepdims=1)]
    s3, b3 = n("std3"), n("mean3")
    inits += [
        numpy_helper.from_array(s.out_std.astype(np.float32).reshape(1, c, 1), s3),
        numpy_helper.from_array(s.out_mean.astype(np.float32).reshape(1, c, 1), b3),
    ]
    # Regularize near-dead channels: add 1e-6 of the mean channel variance, so a channel the
    # synthetic input leaves (almost) constant is not amplified into noise.
    vm, vms, vr, rel = n("vmean"), n("vmean_s"), n("vreg"), n("rel")
    inits.append(numpy_helper.from_array(np.array(1e-6, np.float32), rel))
    nodes += [
        helper.make_node("ReduceMean", [v], [vm], keepdims=1),
        helper.make_node("Mul", [vm, rel], [vms]),
        helper.make_node("Add", [v, vms], [vr]),
        helper.make_node("Add", [vr, eps_n], [ve]),
        helper.make_node("Sqrt", [ve], [sd]),
        helper.make_node("Div", [d, sd], [z]),
        helper.make_node("Mul", [z, s3], [zs]),
        helper.make_node("Add", [zs, b3], [y3]),
        helper.make_node("Reshape", [y3, shape_n], [out]),
    ]
    return nodes, inits, out
