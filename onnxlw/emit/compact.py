"""Store zero-heavy weights compactly in a form onnxruntime expands at session start.

Pruned weights are mostly zeros. Each such initializer is written in the smallest of:

- ``dense``: as is;
- ``bitmask``: a bit per weight (kept or not) plus the kept values. All bitmask tensors of one
  dtype share one constant expansion subgraph (bits → Div/Mod → CumSum → Gather), and each
  tensor is a Slice → Reshape of its result. onnxruntime folds the whole subgraph into dense
  initializers at session start, so inference runs at dense speed and a quantized Conv still
  fuses into QLinearConv (measured in the tests). Sharing the subgraph makes a tensor's
  overhead a few dozen bytes, so small layers pay too;
- ``sparse``: a ``sparse_initializer`` (values plus int64 indices: pays only when almost
  everything is zero).

Each tensor's dense, sparse and bitmask bytes are counted from serialized protos (the bitmask
share: its bits, its kept values and its Slice/Reshape with their constants); the smallest
wins (dense on a tie). A group is capped at ``GROUP_ELEMENTS`` weights so the transient int64
arrays of the expansion stay small at session start on large models.

Hand-written because no library writes this form; the subgraph uses opset-13 ops only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import NameAllocator
from .packed import restore, slice_members

MIN_ELEMENTS = 256
"""Smaller tensors stay dense."""

GROUP_ELEMENTS = 1 << 22
"""At most this many weights share one expansion (its int64 temporaries are 8 B per weight)."""


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
    choices: list[Choice] = []
    groups: dict[int, list[list[tuple[str, np.ndarray]]]] = {}
    pending: list[tuple[int, str, np.ndarray, int, int]] = []
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
        dense = t.ByteSize()
        if len(nz) >= a.size * (1 - 1 / (8 * a.dtype.itemsize)):  # bits alone outweigh zeros
            keep.append(t)
            continue
        values = numpy_helper.from_array(flat[nz], t.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), t.name + "_indices")
        sp = helper.make_sparse_tensor(values, indices, list(a.shape))
        sizes = {
            "dense": dense,
            "bitmask": _share_bytes(t.name, a, len(nz)),
            "sparse": sp.ByteSize(),
        }
        form = min(sizes, key=lambda f: (sizes[f], f != "dense"))
        choices.append(Choice(t.name, form, dense, sizes[form]))
        if form == "dense":
            keep.append(t)
        elif form == "sparse":
            g.sparse_initializer.append(sp)
        else:
            pending.append((t.data_type, t.name, a, dense, sizes[form]))
    for dtype, name, a, _, _ in pending:
        chunks = groups.setdefault(dtype, [[]])
        if chunks[-1] and sum(x.size for _, x in chunks[-1]) + a.size > GROUP_ELEMENTS:
            chunks.append([])
        chunks[-1].append((name, a))
    head: list[onnx.NodeProto] = []
    for chunks in groups.values():
        for members in chunks:
            inits, nodes = _expansion(members, alloc)
            keep += inits
            head += nodes
    restore(g, keep, head)
    return out, choices


_NUMERIC = {TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT16}


def _share_bytes(name: str, a: np.ndarray, kept: int) -> int:
    """Serialized bytes one tensor adds to a shared expansion: its packed bits, its kept values
    and its Slice/Reshape nodes with their three int64 constants."""
    bits = -(-a.size // 8)
    consts = [
        numpy_helper.from_array(np.zeros(1, np.int64), f"{name}__s"),
        numpy_helper.from_array(np.zeros(1, np.int64), f"{name}__e"),
        numpy_helper.from_array(np.zeros(a.ndim, np.int64), f"{name}__shape"),
    ]
    nodes = [
        helper.make_node("Slice", ["all", f"{name}__s", f"{name}__e"], [f"{name}__flat"],
                         name=f"{name}__slice"),
        helper.make_node("Reshape", [f"{name}__flat", f"{name}__shape"], [name],
                         name=f"{name}__reshape"),
    ]
    return (
        bits + kept * a.dtype.itemsize + sum(c.ByteSize() for c in consts)
        + sum(n.ByteSize() for n in nodes)
    )


def _expansion(
    members: list[tuple[str, np.ndarray]], alloc: NameAllocator
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes that rebuild every ``(name, array)`` of ``members`` (one dtype)
    from one packed bit string and one array of kept values.

    Each tensor's bits start on a byte boundary (its last byte is padded with zero bits), so
    tensor ``k`` is bits ``[start_k, start_k + size_k)`` of the unpacked mask. The value index
    of a kept weight is its running count of kept weights minus one; a dropped weight reads
    index -1, the zero appended after all values."""
    dtype = members[0][1].dtype
    masks, vals, starts = [], [], []
    offset = 0
    for _, a in members:
        m = a.ravel() != 0
        pad = (-m.size) % 8
        masks.append(np.concatenate([m, np.zeros(pad, bool)]))
        vals.append(a.ravel()[m])
        starts.append(offset)
        offset += m.size + pad
    bits = np.packbits(np.concatenate(masks))  # most significant bit first
    values = np.concatenate(vals + [np.zeros(1, dtype)])

    def nm(base: str) -> str:
        return alloc.fresh(f"onnxlw_sparse__{base}")

    c = {k: nm(k) for k in ("bits", "vals", "col", "pow", "two", "nbits", "ax", "one")}
    inits = [
        numpy_helper.from_array(bits, c["bits"]),
        numpy_helper.from_array(values, c["vals"]),
        numpy_helper.from_array(np.array([-1, 1], np.int64), c["col"]),
        numpy_helper.from_array(np.array([128, 64, 32, 16, 8, 4, 2, 1], np.int32), c["pow"]),
        numpy_helper.from_array(np.array([2], np.int32), c["two"]),
        numpy_helper.from_array(np.array([offset], np.int64), c["nbits"]),
        numpy_helper.from_array(np.array(0, np.int64), c["ax"]),
        numpy_helper.from_array(np.array(1, np.int64), c["one"]),
    ]
    t = {k: nm(k) for k in ("b32", "col32", "shifted", "bit", "mask", "m64", "cs", "csm", "idx",
                            "all")}
    nodes = [
        helper.make_node("Cast", [c["bits"]], [t["b32"]], to=TensorProto.INT32),
        helper.make_node("Reshape", [t["b32"], c["col"]], [t["col32"]]),
        helper.make_node("Div", [t["col32"], c["pow"]], [t["shifted"]]),
        helper.make_node("Mod", [t["shifted"], c["two"]], [t["bit"]]),
        helper.make_node("Reshape", [t["bit"], c["nbits"]], [t["mask"]]),
        helper.make_node("Cast", [t["mask"]], [t["m64"]], to=TensorProto.INT64),
        helper.make_node("CumSum", [t["m64"], c["ax"]], [t["cs"]]),
        helper.make_node("Mul", [t["cs"], t["m64"]], [t["csm"]]),
        helper.make_node("Sub", [t["csm"], c["one"]], [t["idx"]]),
        helper.make_node("Gather", [c["vals"], t["idx"]], [t["all"]], axis=0),
    ]
    for node in nodes:
        node.name = alloc.fresh(f"onnxlw_sparse__{node.op_type}")
    si, sn = slice_members(members, starts, t["all"], alloc)
    return inits + si, nodes + sn
