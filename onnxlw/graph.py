"""Read-only views of an ONNX graph and a few constructors shared by the passes.

A :class:`GraphView` indexes a ``GraphProto`` once (producers, consumers, initializers,
constants). Passes build a new model from it; they never mutate the model they were given.

Every index here is scope-aware: a node inside an If/Loop/Scan body (at any depth) that reads
an outer-scope tensor counts as a consumer of it, and :class:`NameAllocator` reserves the names
of every scope, so a pass never rewires a tensor a body still reads, and a new top-level name
never collides with a body's name.

Hand-written, and why. onnx-graphsurgeon (gs) also indexes readers across scopes, and
``gs.Graph.cleanup()`` drops unused initializers while keeping ``sparse_initializer``. But a
``gs.import_onnx`` / ``gs.export_onnx`` round trip (gs 0.6.1, measured on tests/models.py
fixtures) drops the model's ``doc_string`` and ``metadata_props`` and every node's
``doc_string``. :func:`rebuild` therefore filters the original protos itself: everything it
does not drop on purpose is kept byte for byte, in the original order, so the same input gives
the same output bytes. The allocator has no gs counterpart that guarantees unique names.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class NameAllocator:
    """Allocates tensor and node names that are unique within one model.

    Every new name in a pass or in ``emit`` comes from here, so names never collide and are
    deterministic for a given model.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self._taken: set[str] = set()
        for g in walk_graphs(model.graph):
            self._taken |= _graph_names(g)
        self._taken.discard("")

    def fresh(self, base: str) -> str:
        """A new name derived from ``base``; ``base`` itself if it is still free."""
        name = base
        k = 1
        while name in self._taken:
            name = f"{base}_{k}"
            k += 1
        self._taken.add(name)
        return name


def _graph_names(g: onnx.GraphProto) -> set[str]:
    """Every name one graph (not its bodies) defines or reads, tensors and nodes alike."""
    names: set[str] = {g.name}
    names.update(i.name for i in g.input)
    names.update(o.name for o in g.output)
    names.update(t.name for t in g.initializer)
    names.update(t.values.name for t in g.sparse_initializer)
    names.update(v.name for v in g.value_info)
    for n in g.node:
        names.update(n.input)
        names.update(n.output)
        names.add(n.name)
    return names


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies held by a node's attributes (If branches, Loop/Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        out.extend(a.graphs)
    return out


def walk_graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``g`` and every body nested in it, depth first, in node order."""
    out = [g]
    for n in g.node:
        for sub in subgraphs(n):
            out += walk_graphs(sub)
    return out


def _defined_in(g: onnx.GraphProto) -> set[str]:
    """Tensor names a graph defines itself: inputs, initializers and node outputs."""
    d = {i.name for i in g.input}
    d.update(t.name for t in g.initializer)
    d.update(t.values.name for t in g.sparse_initializer)
    for n in g.node:
        d.update(o for o in n.output if o)
    return d


def outer_reads(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Outer-scope tensors a body reads (at any depth) -> the nodes inside that read them."""
    local = _defined_in(g)
    out: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            if i and i not in local:
                out[i].append(n)
        for sub in subgraphs(n):
            for name, readers in outer_reads(sub).items():
                if name not in local:
                    out[name] += readers
    return dict(out)


def rename_reads(node: onnx.NodeProto, mapping: dict[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` reading ``mapping[x]`` instead of ``x``, also inside its bodies.

    A body that defines ``x`` itself (shadowing, not valid SSA but seen) keeps its own ``x``.
    """
    m = onnx.NodeProto()
    m.CopyFrom(node)
    for k, i in enumerate(m.input):
        if i in mapping:
            m.input[k] = mapping[i]
    for sub in subgraphs(m):
        _rename_in_graph(sub, mapping)
    return m


def _rename_in_graph(g: onnx.GraphProto, mapping: dict[str, str]) -> None:
    local = _defined_in(g)
    live = {k: v for k, v in mapping.items() if k not in local}
    if not live:
        return
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in live:
                n.input[k] = live[i]
        for sub in subgraphs(n):
            _rename_in_graph(sub, live)
    for o in g.output:  # a body output may forward an outer tensor directly
        if o.name in live:
            o.name = live[o.name]


class GraphView:
    """Index of a graph: who produces and who consumes each tensor, and its constants.

    ``consumers[t]`` lists the top-level nodes that read ``t`` and, after them, the nodes inside
    If/Loop/Scan bodies (any depth) that read ``t`` from the outer scope; ``subgraph_readers``
    holds the latter alone. ``initializers`` holds the dense ones; ``sparse_initializers`` the
    ``graph.sparse_initializer`` entries by name (both count as constants).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        self.subgraph_readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
            for sub in subgraphs(n):
                for name, readers in outer_reads(sub).items():
                    self.subgraph_readers[name] += readers
        for name, readers in self.subgraph_readers.items():
            self.consumers[name] += readers
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.sparse_initializers: dict[str, onnx.SparseTensorProto] = {
            t.values.name: t for t in g.sparse_initializer
        }
        self.graph_inputs = [
            i.name
            for i in g.input
            if i.name not in self.initializers and i.name not in self.sparse_initializers
        ]
        self.graph_outputs = [o.name for o in g.output]
        self._const_cache: dict[str, np.ndarray] = {}

    def read_in_subgraph(self, name: str) -> bool:
        """True when a node inside an If/Loop/Scan body reads ``name`` from this scope."""
        return bool(self.subgraph_readers.get(name))

    def is_const(self, name: str) -> bool:
        """True when ``name`` is an initializer (dense or sparse) or a numeric Constant's
        output."""
        if name in self.initializers or name in self.sparse_initializers:
            return True
        p = self.producer.get(name)
        return (
            p is not None
            and p.op_type == "Constant"
            and bool(p.attribute)
            and p.attribute[0].name in _NUMERIC_CONSTANT_ATTRS
        )

    def const(self, name: str) -> np.ndarray:
        """The value of a constant tensor (initializer or Constant node output)."""
        if name not in self._const_cache:
            if name in self.initializers:
                v = numpy_helper.to_array(self.initializers[name])
            elif name in self.sparse_initializers:
                v = sparse_to_dense(self.sparse_initializers[name])
            else:
                p = self.producer[name]
                v = _constant_node_value(p)
            self._const_cache[name] = v
        return self._const_cache[name]

    def const_or_none(self, name: str) -> np.ndarray | None:
        """The constant value of ``name`` or None (also for an empty optional input)."""
        if not name or not self.is_const(name):
            return None
        return self.const(name)

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        """The only consumer of ``name`` if it has exactly one and is not a graph output.

        A tensor read inside an If/Loop/Scan body never has a single consumer.
        """
        cs = self.consumers.get(name, [])
        if len(cs) == 1 and name not in self.graph_outputs and not self.read_in_subgraph(name):
            return cs[0]
        return None


def relu_upper(act: onnx.NodeProto, view: GraphView) -> float | None:
    """The upper bound of ``act`` if it is a Relu (inf) or a Clip with a constant lower bound
    of 0 and a constant (or absent) upper bound; None for anything else."""
    if act.op_type == "Relu":
        return float("inf")
    if act.op_type != "Clip":
        return None
    lo = view.const_or_none(act.input[1]) if len(act.input) > 1 and act.input[1] else None
    has_hi = len(act.input) > 2 and bool(act.input[2])
    hi = view.const_or_none(act.input[2]) if has_hi else None
    if lo is None or float(lo) != 0.0 or (has_hi and hi is None):
        return None
    return float(hi) if hi is not None else float("inf")


def is_depthwise(n: onnx.NodeProto, view: GraphView, c: int) -> bool:
    """True when ``n`` is a Conv with constant weights, ``c`` channels and group ``c``."""
    if n.op_type != "Conv" or not view.is_const(n.input[1]):
        return False
    w = view.const(n.input[1])
    return int(attrs(n).get("group", 1)) == c and w.shape[0] == c and w.shape[1] == 1


_NUMERIC_CONSTANT_ATTRS = (
    "value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "sparse_value",
)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "sparse_value":
        return sparse_to_dense(a.sparse_tensor)
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), dtype=np.int64)
    raise ValueError(f"unsupported Constant attribute {a.name}")


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a ``SparseTensorProto``.

    Hand-written: onnx has no public densifier (``numpy_helper.to_array`` takes dense tensors
    only; the reference evaluator's ``SparseTensor`` is private). Indices are either (NNZ,)
    linear indices or (NNZ, rank) coordinates, as the ONNX spec allows.
    """
    values = numpy_helper.to_array(sp.values)
    shape = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=values.dtype)
    if values.size:
        idx = numpy_helper.to_array(sp.indices).astype(np.int64)
        if idx.ndim == 2:
            idx = np.ravel_multi_index(tuple(idx.T), shape)
        dense[idx.reshape(-1)] = values.reshape(-1)
    return dense.reshape(shape)


def used_names(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, including from inside If/Loop/Scan bodies."""
    out: set[str] = set()
    for n in nodes:
        out.update(i for i in n.input if i)
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                out |= used_names(g.node)
    return out


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and attribute tensors, including inside If/Loop/Scan bodies."""
    return _graph_tensors(model.graph)


def _graph_tensors(g: onnx.GraphProto) -> list[onnx.TensorProto]:
    out = list(g.initializer)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out.append(a.t)
            out.extend(a.tensors)
            if a.type == onnx.AttributeProto.GRAPH:
                out += _graph_tensors(a.g)
            for sub in a.graphs:
                out += _graph_tensors(sub)
    return out


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as plain Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rebuild(
    model: onnx.ModelProto,
    nodes: Iterable[onnx.NodeProto],
    initializers: Iterable[onnx.TensorProto],
    sparse_initializers: Iterable[onnx.SparseTensorProto] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with new nodes and initializers; everything else kept.

    Initializers (dense, and sparse: ``model``'s own unless ``sparse_initializers`` is given)
    that no node reads, in any scope, and that are no graph output are dropped; graph inputs
    that only listed a dropped initializer (IR<4 style) go with them. ``value_info`` entries
    are kept for tensors that still exist (a node output or an initializer) and dropped for
    the others. Nodes are taken as given (no dead-node removal). Every other model and graph
    field (doc strings, metadata, opsets, functions, quantization annotations) is copied
    unchanged, so the output is byte-deterministic for a given input.
    """
    nodes = list(nodes)
    g0 = model.graph
    used = used_names(nodes)
    used.update(o.name for o in g0.output)
    inits = [t for t in initializers if t.name in used]
    init_names = {t.name for t in inits}
    sparse = list(g0.sparse_initializer if sparse_initializers is None else sparse_initializers)
    sparse = [t for t in sparse if t.values.name in used and t.values.name not in init_names]
    init_names.update(t.values.name for t in sparse)
    old_init_names = {t.name for t in g0.initializer}
    old_init_names.update(t.values.name for t in g0.sparse_initializer)
    inputs = [i for i in g0.input if i.name not in old_init_names or i.name in init_names]
    exists = set(init_names)
    exists.update(i.name for i in g0.input)
    for n in nodes:
        exists.update(o for o in n.output if o)
    value_info = [v for v in g0.value_info if v.name in exists]

    m = onnx.ModelProto()
    _copy_fields(model, m, skip={"graph"})
    g = m.graph
    _copy_fields(g0, g, skip={"node", "initializer", "sparse_initializer", "input", "value_info"})
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.sparse_initializer.extend(sparse)
    g.input.extend(inputs)
    g.value_info.extend(value_info)
    return m


def _copy_fields(src, dst, skip: set[str]) -> None:  # noqa: ANN001 - any protobuf message
    """Copy every set field of ``src`` except ``skip`` into the empty ``dst`` (same type),
    without copying the skipped (possibly large) fields first."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; older: label
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def bias_add(node: onnx.NodeProto, bias: str, alloc: NameAllocator) -> onnx.NodeProto:
    """An ``Add`` of ``bias`` after ``node`` (a MatMul has no bias input): ``node`` now writes
    a fresh tensor and the Add writes ``node``'s former output, so readers are unchanged."""
    out = node.output[0]
    node.output[0] = alloc.fresh(f"{out}_nobias")
    return helper.make_node(
        "Add", [node.output[0], bias], [out], name=alloc.fresh(f"{node.name}_bias_add")
    )
