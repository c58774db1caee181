"""Read-only views of an ONNX graph and a few constructors shared by the passes.

A :class:`GraphView` indexes a ``GraphProto`` once (producers, consumers, initializers,
constants). Passes build a new model from it; they never mutate the model they were given.
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
        g = model.graph
        taken: set[str] = set()
        taken.update(i.name for i in g.input)
        taken.update(o.name for o in g.output)
        taken.update(t.name for t in g.initializer)
        taken.update(v.name for v in g.value_info)
        for n in g.node:
            taken.update(n.input)
            taken.update(n.output)
            taken.add(n.name)
        self._taken = taken

    def fresh(self, base: str) -> str:
        """A new name derived from ``base``; ``base`` itself if it is still free."""
        name = base
        k = 1
        while name in self._taken:
            name = f"{base}_{k}"
            k += 1
        self._taken.add(name)
        return name


class GraphView:
    """Index of a graph: who produces and who consumes each tensor, and its constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in g.output]
        self._const_cache: dict[str, np.ndarray] = {}

    def is_const(self, name: str) -> bool:
        """True when ``name`` is an initializer or a numeric Constant node's output."""
        if name in self.initializers:
            return True
        p = self.producer.get(name)
        return (
            p is not None
            and p.op_type == "Constant"
            and bool(p.attribute)
            and p.attribute[0].name
            in ("value", "value_float", "value_floats", "value_int", "value_ints")
        )

    def const(self, name: str) -> np.ndarray:
        """The value of a constant tensor (initializer or Constant node output)."""
        if name not in self._const_cache:
            if name in self.initializers:
                v = numpy_helper.to_array(self.initializers[name])
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
        """The only consumer of ``name`` if it has exactly one and is not a graph output."""
        cs = self.consumers.get(name, [])
        if len(cs) == 1 and name not in self.graph_outputs:
            return cs[0]
        return None


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), dtype=np.int64)
    raise ValueError(f"unsupported Constant attribute {a.name}")


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
) -> onnx.ModelProto:
    """A copy of ``model`` with new nodes and initializers; inputs/outputs/metadata kept.

    Initializers no node uses are dropped; graph inputs that only listed initializers (IR<4
    style) are dropped with them.
    """
    nodes = list(nodes)
    used = used_names(nodes)
    used.update(o.name for o in model.graph.output)
    inits = [t for t in initializers if t.name in used]
    init_names = {t.name for t in inits}
    old_init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in old_init_names or i.name in init_names]
    g = helper.make_graph(
        nodes,
        model.graph.name,
        inputs,
        list(model.graph.output),
        inits,
        value_info=[],
        doc_string=model.graph.doc_string,
    )
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.CopyFrom(g)
    return m
