"""Store zero-heavy weights compactly in a form onnxruntime expands at session start.

Pruned weights are mostly zeros. Each such initializer is written in the smallest of:

- ``dense``: as is;
- ``bitmask``: a packed bit per weight (kept or not) plus the kept values, expanded by a
  constant subgraph (bits → Div/Mod → CumSum → Gather → Reshape) that onnxruntime folds into
  a dense initializer at session start, so inference runs at dense speed and a quantized
  Conv still fuses into QLinearConv (measured in the tests);
- ``sparse``: a ``sparse_initializer`` (values plus int64 indices: pays only when almost
  everything is zero).

Each form is built and its serialized bytes counted; the smallest wins (dense on a tie).

Hand-written because no library writes this form; the subgraph uses opset-13 ops only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import NameAllocator

MIN_ELEMENTS = 256
"""Smaller tensors stay dense (the subgraph's constants cost more than they save)."""


@dataclass(frozen=True)
class Choice:
    """The form picked for one initializer and its sizes in bytes."""

    name: str
    form: str
    dense_bytes: int
    bytes: int


def compact_sparse(
    model: onnx.ModelProto, names: set[str] | None = None
) -> tuple[onnx.ModelProto, list[Choice]]:
    """A copy of ``model`` with each zero-heavy initializer (of ``names``, default all) in its
    smallest form. Returns the model and the choice per considered initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    alloc = NameAllocator(out)
    keep: list[onnx.TensorProto] = []
    head: list[onnx.NodeProto] = []
    choices: list[Choice] = []
    for t in g.initializer:
        if (names is not None and t.name not in names) or t.data_type not in _NUMERIC:
            keep.append(t)
            continue
        a = numpy_helper.to_array(t)
        if a.size < MIN_ELEMENTS:
            keep.append(t)
            continue
        flat = a.ravel()
        nz = np.flatnonzero(flat)
        item = a.dtype.itemsize
        dense = t.ByteSize()
        if len(nz) >= a.size * (1 - 1 / (8 * item)):  # the bitmask alone outweighs the zeros
            keep.append(t)
            continue
        # Measure, not estimate: build each form and count its serialized bytes.
        b_inits, b_nodes = _bitmask(t.name, a, alloc)
        bitmask = sum(x.ByteSize() for x in b_inits) + sum(x.ByteSize() for x in b_nodes)
        values = numpy_helper.from_array(flat[nz], t.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), t.name + "_indices")
        sp = helper.make_sparse_tensor(values, indices, list(a.shape))
        sizes = {"dense": dense, "bitmask": bitmask, "sparse": sp.ByteSize()}
        form = min(sizes, key=lambda f: (sizes[f], f != "dense"))
        choices.append(Choice(t.name, form, dense, sizes[form]))
        if form == "dense":
            keep.append(t)
        elif form == "sparse":
            g.sparse_initializer.append(sp)
        else:
            keep += b_inits
            head += b_nodes
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out, choices


_NUMERIC = {TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT16}


def _bitmask(
    name: str, a: np.ndarray, alloc: NameAllocator
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes that rebuild ``a`` under ``name`` from bits and kept values."""
    flat = a.ravel()
    mask = flat != 0
    n = flat.size
    pad = (-n) % 8
    bits = np.packbits(np.concatenate([mask, np.zeros(pad, bool)]))  # most significant first
    vals = np.concatenate([flat[mask], np.zeros(1, a.dtype)])  # index -1 reads the final zero

    def nm(base: str) -> str:
        return alloc.fresh(f"{name}__{base}")

    c = {
        k: nm(k)
        for k in ("bits", "vals", "col", "pow", "two", "nbits", "zero", "len", "ax", "one", "shape")
    }
    inits = [
        numpy_helper.from_array(bits, c["bits"]),
        numpy_helper.from_array(vals, c["vals"]),
        numpy_helper.from_array(np.array([-1, 1], np.int64), c["col"]),
        numpy_helper.from_array(np.array([128, 64, 32, 16, 8, 4, 2, 1], np.int32), c["pow"]),
        numpy_helper.from_array(np.array([2], np.int32), c["two"]),
        numpy_helper.from_array(np.array([n + pad], np.int64), c["nbits"]),
        numpy_helper.from_array(np.array([0], np.int64), c["zero"]),
        numpy_helper.from_array(np.array([n], np.int64), c["len"]),
        numpy_helper.from_array(np.array(0, np.int64), c["ax"]),
        numpy_helper.from_array(np.array(1, np.int64), c["one"]),
        numpy_helper.from_array(np.array(a.shape, np.int64), c["shape"]),
    ]
    t = {k: nm(k) for k in ("b32", "col32", "shifted", "bit", "flat", "mask", "m64", "cs",
                            "csm", "idx", "vals_flat")}
    nodes = [
        helper.make_node("Cast", [c["bits"]], [t["b32"]], to=TensorProto.INT32),
        helper.make_node("Reshape", [t["b32"], c["col"]], [t["col32"]]),
        helper.make_node("Div", [t["col32"], c["pow"]], [t["shifted"]]),
        helper.make_node("Mod", [t["shifted"], c["two"]], [t["bit"]]),
        helper.make_node("Reshape", [t["bit"], c["nbits"]], [t["flat"]]),
        helper.make_node("Slice", [t["flat"], c["zero"], c["len"]], [t["mask"]]),
        helper.make_node("Cast", [t["mask"]], [t["m64"]], to=TensorProto.INT64),
        helper.make_node("CumSum", [t["m64"], c["ax"]], [t["cs"]]),
        helper.make_node("Mul", [t["cs"], t["m64"]], [t["csm"]]),
        helper.make_node("Sub", [t["csm"], c["one"]], [t["idx"]]),
        helper.make_node("Gather", [c["vals"], t["idx"]], [t["vals_flat"]], axis=0),
        helper.make_node("Reshape", [t["vals_flat"], c["shape"]], [name]),
    ]
    for k, node in enumerate(nodes):
        node.name = alloc.fresh(f"{name}__expand_{k}")
    return inits, nodes
