"""Synthesize every quantized tensor's values from BatchNorm statistics, with no data.

One onnxruntime run of a *synthesis model* derived from the canonical FP32 model:

- ``MATCHED``: graph inputs are drawn from the declared distribution; after every tensor that
  a BatchNorm produced, a moment-matching block re-standardizes each channel over the
  synthetic batch to mean ``B_c`` and std ``|scale_c|``. Everything between BNs (activations,
  residual adds, pads, pools, concats, SE multiplies, the convs themselves) runs as in FP32.
- ``GAUSSIAN``: every BN output is cut and replaced by fresh i.i.d. N(B_c, scale_c^2) samples.

Without BN statistics both modes reduce to propagating the declared input distribution.

The synthesis model runs in segments cut in topological order (each extracted as a model of
its own with onnx-graphsurgeon), and each wanted tensor goes to a sink as soon as its segment
ran, so the activations held at once stay under a memory budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..config import Config, Synthesis
from ..graph import GraphView, NameAllocator, used_names
from ..inputspec import InputSpec
from ..io import default_opset
from ..ortutil import release_memory, run_batched
from ..passes import Canonical
from .inputs import synthetic_input

Sink = Callable[[list[tuple[str, np.ndarray]]], None]
"""Receives the synthesized tensors of one segment together: [(name, values (N, C, ...))]."""


@dataclass
class SynthesisInfo:
    """How synthesis ran: mode, fallbacks, segments, and the largest tensor it held."""

    mode: str
    fallback: str | None
    segments: int
    notes: list[str]


def draw_inputs(inputs: InputSpec, config: Config, batch: int, rng: np.random.Generator) -> dict:
    """Seeded synthetic graph inputs of the declared distribution, inside the declared range."""
    return {
        name: synthetic_input(shape, config.input_distribution, rng, inputs.declared_range)
        for name, shape in inputs.shapes(batch).items()
    }


def synthesize(
    canon: Canonical, wanted: list[str], inputs: InputSpec, config: Config, sink: Sink
) -> SynthesisInfo:
    """Synthesize every tensor in ``wanted`` and hand each to ``sink`` once (a segment's
    tensors together), then drop it.

    The synthesis model runs in segments (cut in topological order) so that the wanted
    tensors held at once stay under ``config.memory_budget_mb``; the tensors a later segment
    reads are carried over. Graph inputs reach ``sink`` first.
    """
    rng = np.random.default_rng(config.seed)
    model = canon.model
    feeds = draw_inputs(inputs, config, config.synth_samples, rng)
    stats = canon.bn_stats
    mode = config.synthesis
    notes: list[str] = []
    shapes = inputs.shapes(config.synth_samples)
    shp = _static_shapes(model, shapes)
    cut_values: dict[str, np.ndarray] = {}
    if mode is Synthesis.GAUSSIAN and stats:
        for t in sorted(stats):
            if t in shp:
                cut_values[t] = _gaussian(stats[t], shp[t], rng)
    synth_model, out_map, cut_map = build_synthesis_model(
        model, stats if mode is Synthesis.MATCHED else {}, set(cut_values), wanted
    )
    synth_model, fixed = _unpin_batch_reshapes(synth_model, inputs, config.synth_samples)
    if fixed:
        notes.append(
            f"{fixed} Reshape(s) hard-code the batch size; synthesis copies the batch dim instead"
        )
    sink([(t, feeds[t]) for t in wanted if t in feeds])
    feeds_all = {**feeds, **{cut_map[t]: v for t, v in cut_values.items()}}
    sink([(t, v) for t, v in cut_values.items() if t in wanted])
    targets = {out_map[t]: t for t in wanted if t not in cut_values and t not in feeds}
    chunked = False
    segments = _segments(synth_model, list(targets), shp, config.memory_budget_mb << 20)
    reads = [used_names([n]) for n in synth_model.graph.node]
    graph = gs.import_onnx(synth_model)
    carry: dict[str, np.ndarray] = dict(feeds_all)
    for a, b in segments:
        seg_model, outs, needed_later = _segment_model(
            graph, synth_model, a, b, set(targets), carry, reads
        )
        if not outs:
            continue
        seg_feeds = {i.name: carry[i.name] for i in seg_model.graph.input}
        res, was_chunked = run_batched(
            seg_model, seg_feeds, outs, config.synth_samples, inputs.static_batch
        )
        chunked |= was_chunked
        got = dict(zip(outs, res, strict=True))
        sink([(targets[name], got[name]) for name in outs if name in targets])
        carry = {n: v for n, v in {**carry, **got}.items() if n in needed_later}
        del res, got
        release_memory()
    fallback = None if stats else "propagated-input-distribution"
    if chunked:  # a graph with a hard-coded batch: each image was matched on its own
        fallback = (fallback + "+" if fallback else "") + "per-image-batches"
    return SynthesisInfo(mode.value, fallback, len(segments), notes)


def _gaussian(s, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:  # noqa: ANN001
    c = len(s.bias)
    bshape = (1, c) + (1,) * (len(shape) - 2)
    z = rng.standard_normal(shape).astype(np.float32)
    return (s.out_mean.reshape(bshape) + s.out_std.reshape(bshape) * z).astype(np.float32)


def _unpin_batch_reshapes(
    model: onnx.ModelProto, inputs: InputSpec, batch: int
) -> tuple[onnx.ModelProto, int]:
    """Reshapes whose constant target shape starts with the model's static batch copy dim 0.

    Such a Reshape (``[1, -1, C]`` in a batch-1 export) would mix the synthetic images when
    the batch is made symbolic. Only rewritten where the data's dim 0 is the batch.
    """
    b0 = inputs.static_batch
    if b0 is None or b0 == batch:
        return model, 0
    shp = _static_shapes(model, inputs.shapes(batch))
    inits = {t.name: t for t in model.graph.initializer}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    alloc = NameAllocator(m)
    fixed = 0
    for n in m.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        target = numpy_helper.to_array(inits[n.input[1]])
        data = shp.get(n.input[0])
        if target.ndim != 1 or not target.size or target[0] != b0 or not data or data[0] != batch:
            continue
        new = target.copy()
        new[0] = 0
        name = alloc.fresh(n.input[1] + "__batch")
        m.graph.initializer.append(numpy_helper.from_array(new, name))
        n.input[1] = name
        fixed += 1
    return m, fixed


def _segments(
    model: onnx.ModelProto, targets: list[str], shapes: dict[str, tuple[int, ...]], budget: int
) -> list[tuple[int, int]]:
    """Cut the (topologically ordered) synthesis nodes into consecutive [a, b) ranges whose
    targets together hold about ``budget`` bytes."""
    nodes = model.graph.node
    tset = set(targets)
    unknown = max((int(np.prod(s)) * 4 for s in shapes.values()), default=1 << 20)
    bounds: list[int] = [0]
    acc = 0
    for k, n in enumerate(nodes):
        for o in n.output:
            if o in tset:
                acc += int(np.prod(shapes[o])) * 4 if o in shapes else unknown
        if acc >= budget and k + 1 < len(nodes):
            bounds.append(k + 1)
            acc = 0
    bounds.append(len(nodes))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _segment_model(
    graph: gs.Graph,
    model: onnx.ModelProto,
    a: int,
    b: int,
    targets: set[str],
    carry: dict[str, np.ndarray],
    reads: list[set[str]],
) -> tuple[onnx.ModelProto, list[str], set[str]]:
    """Nodes [a, b) of the synthesis graph as a model of its own (onnx-graphsurgeon).

    Its inputs are what the nodes read from earlier segments (typed from ``carry``) or from
    the graph inputs; its outputs are their targets plus what later nodes read. Also returns
    the names later segments still need.
    """
    tensors = graph.tensors()
    seg = graph.nodes[a:b]
    produced = {t.name for n in seg for t in n.outputs}
    read: set[str] = set().union(*reads[a:b]) if seg else set()
    later: set[str] = set().union(*reads[b:]) if b < len(graph.nodes) else set()
    ins = []
    for name in sorted(read):
        t = tensors[name]
        if name in produced or isinstance(t, gs.Constant):
            continue
        if name in carry and t.dtype is None:
            t.dtype = carry[name].dtype
        ins.append(t)
    outs = [t for n in seg for t in n.outputs if t.name in targets or t.name in later]
    outs = list({t.name: t for t in outs}.values())
    sub = gs.Graph(nodes=seg, inputs=ins, outputs=outs, opset=graph.opset, import_domains=None)
    sm = gs.export_onnx(sub, do_type_check=False)
    del sm.opset_import[:]
    sm.opset_import.extend(model.opset_import)
    sm.ir_version = model.ir_version
    consts = {t.name for t in tensors.values() if isinstance(t, gs.Constant)}
    return sm, [t.name for t in outs], {i for i in later if i not in consts}


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
    batch_stats: set[str] | None = None,
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
        nodes, init, out, shared = _moment_match(t, s, alloc, opset)
        if batch_stats is not None:
            batch_stats.update(shared)
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
            needed.update(used_names([n]))
    return keep[::-1]


def _moment_match(
    t: str,
    s,  # noqa: ANN001 - BNStats
    alloc: NameAllocator,
    opset: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str, tuple[str, str]]:
    """Nodes computing B + |scale| * standardize(t) per channel (axis 1) over the batch.
    Returns the nodes, their constants, the output and the (mean, factor) batch statistics.

    Written to hold few full-size temporaries: the centred tensor d, then d * a + B with the
    per-channel factor a = |scale| / std (the variance comes from ReduceSumSquare of d).
    """
    c = len(s.bias)
    n = lambda base: alloc.fresh(f"{t}__mm_{base}")  # noqa: E731
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        nm = n(name)
        inits.append(numpy_helper.from_array(value, nm))
        return nm

    shp3 = const("shp3", np.array([0, c, -1], np.int64))
    shape_n, x3, m, d, ss, cnt_i, cnt_f, cnt_c, v = (
        n(k) for k in ("shape", "x3", "m", "d", "ss", "cnt_i", "cnt_f", "cnt_c", "v")
    )
    nodes = [
        helper.make_node("Shape", [t], [shape_n]),
        helper.make_node("Reshape", [t, shp3], [x3]),
    ]
    axes = [0, 2]
    if opset >= 18:
        ax = const("axes", np.array(axes, np.int64))
        nodes += [helper.make_node("ReduceMean", [x3, ax], [m], keepdims=1)]
    else:
        nodes += [helper.make_node("ReduceMean", [x3], [m], axes=axes, keepdims=1)]
    nodes += [helper.make_node("Sub", [x3, m], [d])]
    if opset >= 18:
        nodes += [helper.make_node("ReduceSumSquare", [d, ax], [ss], keepdims=1)]
    else:
        nodes += [helper.make_node("ReduceSumSquare", [d], [ss], axes=axes, keepdims=1)]
    # values per channel = Size(x) / C
    nodes += [
        helper.make_node("Size", [x3], [cnt_i]),
        helper.make_node("Cast", [cnt_i], [cnt_f], to=TensorProto.FLOAT),
        helper.make_node("Div", [cnt_f, const("c", np.array(float(c), np.float32))], [cnt_c]),
        helper.make_node("Div", [ss, cnt_c], [v]),
    ]
    s3 = const("std3", s.out_std.astype(np.float32).reshape(1, c, 1))
    b3 = const("mean3", s.out_mean.astype(np.float32).reshape(1, c, 1))
    # Regularize near-dead channels: add 1e-6 of the mean channel variance, so a channel the
    # synthetic input leaves (almost) constant is not amplified into noise.
    vm, vms, vr, ve, sd, a, da, y3, out = (
        n(k) for k in ("vmean", "vmean_s", "vreg", "ve", "sd", "a", "da", "y3", "out")
    )
    nodes += [
        helper.make_node("ReduceMean", [v], [vm], keepdims=1),
        helper.make_node("Mul", [vm, const("rel", np.array(1e-6, np.float32))], [vms]),
        helper.make_node("Add", [v, vms], [vr]),
        helper.make_node("Add", [vr, const("eps", np.array(1e-12, np.float32))], [ve]),
        helper.make_node("Sqrt", [ve], [sd]),
        helper.make_node("Div", [s3, sd], [a]),
        helper.make_node("Mul", [d, a], [da]),
        helper.make_node("Add", [da, b3], [y3]),
        helper.make_node("Reshape", [y3, shape_n], [out]),
    ]
    return nodes, inits, out, (m, a)
