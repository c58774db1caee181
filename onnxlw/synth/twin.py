"""Network-aware synthesis: the compressed network run beside the original, layer by layer.

The twin model holds the synthesis model (the original network with its BatchNorm outputs
re-standardized per batch) and a copy of it, the compressed branch, fed the same synthetic
images. In the copy:

- each active layer reads its weight and bias from new graph inputs, so the layer's solution
  is fed in as soon as it is solved, with no new model;
- every activation that the output quantizes goes through its quantizer (QuantizeLinear,
  a Clip to the b-bit levels below 8 bits, DequantizeLinear), as in the emitted model;
- the per-batch re-standardization uses the original branch's batch mean and factor: it is
  the same fixed affine map in both branches, as a BatchNorm is, so the copy's errors pass
  through it instead of being normalized away.

:func:`run_twin` cuts the twin into segments at the layers' inputs in topological order and
runs them one after the other (onnx-graphsurgeon extracts each, as in :mod:`onnxlw.synth`).
After each segment, the layers whose inputs are now known are handed to a callback with the
original and compressed inputs, and their solutions are fed to the later segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from ..analyze import Analysis
from ..config import Config, Synthesis
from ..emit.qdq import act_qdq
from ..graph import NameAllocator, bias_add, used_names
from ..inputspec import InputSpec
from ..ops import LayerRecord
from ..ortutil import release_memory, run_batched
from ..passes import Canonical
from ..solve.problem import ActQuant, LayerSolution
from . import (
    _prune,
    _segment_model,
    _unpin_batch_reshapes,
    build_synthesis_model,
    draw_inputs,
)

Group = list[tuple[LayerRecord, np.ndarray, np.ndarray]]
"""Layers whose inputs became known together: (record, original input, compressed input)."""


@dataclass
class Twin:
    """The twin model and, per active layer index, its two input tensors and its weight and
    bias inputs in the compressed branch."""

    model: onnx.ModelProto
    original: dict[int, str]
    compressed: dict[int, str]
    params: dict[int, tuple[str, str]]


def unsupported(inputs: InputSpec, config: Config) -> str | None:
    """Why network-aware synthesis cannot run for this model and config, or None."""
    if config.synthesis is not Synthesis.MATCHED:
        return "it needs the default synthesis (matched)"
    if inputs.static_batch is not None and inputs.static_batch != config.synth_samples:
        return f"the model hard-codes batch size {inputs.static_batch}"
    return None


def build_twin(
    synth: onnx.ModelProto,
    out_map: dict[str, str],
    batch_stats: set[str],
    layers: list[LayerRecord],
    acts: dict[str, ActQuant],
) -> Twin:
    """The twin of synthesis model ``synth`` (see the module docstring). ``out_map``: each
    wanted tensor → the tensor carrying its synthetic value; ``acts``: the activation
    quantizers by tensor name (empty for a float output)."""
    alloc = NameAllocator(synth)
    produced = {o for n in synth.graph.node for o in n.output}
    ren: dict[str, str] = {}

    def cname(t: str) -> str:
        if t not in produced or t in batch_stats or not t:
            return t
        if t not in ren:
            ren[t] = alloc.fresh(f"{t}__c")
        return ren[t]

    reads: dict[str, str] = {}  # tensor of synth -> what the compressed copy reads instead
    inits: list[onnx.TensorProto] = []

    def quantizer(t: str, r: ActQuant) -> list[onnx.NodeProto]:
        src = cname(t)
        s, z = alloc.fresh(f"{src}_scale"), alloc.fresh(f"{src}_zero_point")
        q, dq = alloc.fresh(f"{src}_q"), alloc.fresh(f"{src}_fq")
        inits.extend([
            numpy_helper.from_array(np.array(r.scale, np.float32), s),
            numpy_helper.from_array(np.array(r.zero_point, np.uint8), z),
        ])
        reads[t] = dq
        return act_qdq(src, src, q, dq, s, z, r.bits, alloc, inits)

    fq_at: dict[str, ActQuant] = {}
    for name, r in acts.items():
        fq_at[out_map.get(name, name)] = r
    by_node = {r.node: r for r in layers}
    params: dict[int, tuple[str, str]] = {}
    new_inputs: list[onnx.ValueInfoProto] = []
    nodes: list[onnx.NodeProto] = []
    for t in [i.name for i in synth.graph.input]:
        if t in fq_at:
            nodes += quantizer(t, fq_at[t])
    for n in synth.graph.node:
        nodes.append(n)
        if any(o in batch_stats for o in n.output):
            continue  # the copy reads the original branch's batch statistics
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = alloc.fresh(f"{n.name or n.op_type}__c")
        for k, i in enumerate(c.input):
            c.input[k] = reads.get(i, cname(i))
        for k, o in enumerate(c.output):
            c.output[k] = cname(o)
        extra: list[onnx.NodeProto] = []
        rec = by_node.get(n.name)
        if rec is not None:
            w_in, b_in = alloc.fresh(f"{rec.weight}__solved"), alloc.fresh(f"{rec.node}__bias")
            params[rec.index] = (w_in, b_in)
            n_out = rec.weight_shape[rec.out_axis]
            new_inputs += [
                helper.make_tensor_value_info(w_in, TensorProto.FLOAT, list(rec.weight_shape)),
                helper.make_tensor_value_info(b_in, TensorProto.FLOAT, [n_out]),
            ]
            c.input[1] = w_in
            if c.op_type == "MatMul":
                extra.append(bias_add(c, b_in, alloc))
            elif len(c.input) > 2 and c.input[2]:
                c.input[2] = b_in
            else:
                del c.input[2:]
                c.input.append(b_in)
        nodes.append(c)
        nodes += extra
        for o in n.output:
            if o in fq_at:
                nodes += quantizer(o, fq_at[o])
    original = {r.index: out_map[r.input] for r in layers}
    compressed = {r.index: reads.get(t, cname(t)) for r in layers for t in [out_map[r.input]]}
    targets = set(original.values()) | set(compressed.values())
    nodes = _prune(nodes, targets)
    used = used_names(nodes)
    g = helper.make_graph(
        nodes,
        "twin",
        list(synth.graph.input) + [v for v in new_inputs if v.name in used],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in sorted(targets)
         if t in {o for n in nodes for o in n.output}],
        list(synth.graph.initializer) + inits,
    )
    model = helper.make_model(
        g, opset_imports=list(synth.opset_import), ir_version=synth.ir_version
    )
    return Twin(model, original, compressed, params)


def run_twin(
    canon: Canonical,
    analysis: Analysis,
    inputs: InputSpec,
    config: Config,
    acts: dict[str, ActQuant],
    weights: dict[int, np.ndarray],
    biases: dict[int, np.ndarray | None],
    solve_group: Callable[[Group], dict[int, LayerSolution]],
) -> dict[int, LayerSolution]:
    """Solve every active layer on its network-aware input, in topological order.

    ``weights``/``biases``: each layer's original parameters (fed until it is solved);
    ``solve_group`` solves layers whose inputs became known together. The synthetic images
    are the ones :func:`onnxlw.synth.synthesize` draws with the same seed.
    """
    rng = np.random.default_rng(config.seed)
    n = config.synth_samples
    feeds = draw_inputs(inputs, config, n, rng)
    layers = analysis.active_layers
    wanted = list(dict.fromkeys([r.input for r in layers] + list(acts)))
    stats: set[str] = set()
    synth, out_map, _ = build_synthesis_model(canon.model, canon.bn_stats, set(), wanted, stats)
    synth, _ = _unpin_batch_reshapes(synth, inputs, n)
    twin = build_twin(synth, out_map, stats, layers, acts)
    tm = twin.model
    pos: dict[str, int] = {}
    for k, node in enumerate(tm.graph.node):
        for o in node.output:
            pos[o] = k
    ready: dict[int, list[LayerRecord]] = {}
    for r in layers:
        at = max(pos.get(twin.original[r.index], -1), pos.get(twin.compressed[r.index], -1)) + 1
        ready.setdefault(at, []).append(r)
    params: dict[str, np.ndarray] = {}
    for r in layers:
        if r.index not in twin.params:  # nothing synthesized reads its output (a classifier)
            continue
        w_in, b_in = twin.params[r.index]
        params[w_in] = weights[r.index].astype(np.float32)
        b = biases[r.index]
        n_out = r.weight_shape[r.out_axis]
        params[b_in] = (b if b is not None else np.zeros(n_out)).astype(np.float32).reshape(-1)
    targets = set(twin.original.values()) | set(twin.compressed.values())
    reads = [used_names([node]) for node in tm.graph.node]
    graph = gs.import_onnx(tm)
    carry: dict[str, np.ndarray] = dict(feeds)
    held: dict[str, np.ndarray] = {k: v for k, v in feeds.items() if k in targets}
    out: dict[int, LayerSolution] = {}
    start = 0
    for at in sorted(ready):
        if at > start:
            seg, outs, later = _segment_model(graph, tm, start, at, targets, carry, reads)
            seg_feeds = {
                i.name: carry[i.name] if i.name in carry else params[i.name]
                for i in seg.graph.input
            }
            res, _ = run_batched(seg, seg_feeds, outs, n, None)
            got = dict(zip(outs, res, strict=True))
            held.update({k: v for k, v in got.items() if k in targets})
            carry = {k: v for k, v in {**carry, **got}.items() if k in later}
            del res, got
            start = at
        group = [(r, held[twin.original[r.index]], held[twin.compressed[r.index]])
                 for r in ready[at]]
        solved = solve_group(group)
        del group
        for r in ready[at]:
            sol = solved[r.index]
            out[r.index] = sol
            if r.index in twin.params:
                w_in, b_in = twin.params[r.index]
                params[w_in] = r.adapter.from_matrix(r, sol.weight).astype(np.float32)
                params[b_in] = sol.bias.reshape(-1).astype(np.float32)
        still = {t for idx in (r.index for rs in ready.values() for r in rs if r.index not in out)
                 for t in (twin.original[idx], twin.compressed[idx])}
        held = {k: v for k, v in held.items() if k in still}
        release_memory()
    return out
