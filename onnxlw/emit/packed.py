"""Store 2- to 7-bit integer weights packed, expanded to int8 at session start.

A weight quantized to b < 8 bits is an int8 tensor in the QDQ graph (onnxruntime's
QLinearConv takes int8 weights; an int4 DequantizeLinear before a Conv is not fused). Stored
as int8 it weighs as much as an 8-bit one. This stage rewrites every int8 initializer read by
a DequantizeLinear whose levels fit in b < 8 bits as b bits per weight, in bit planes of 4, 2
or 1 bits (5 bits = a 4-bit and a 1-bit plane; see :func:`onnxlw.targets.ort_cpu.stored_bits`;
below opset 14 only 2 and 4 bits, 3 stored as 4), plus a constant subgraph that rebuilds it:

    per plane: bytes → Cast(int32) → Gather(a 256-entry table of the values each byte holds,
               shifted into place) → Reshape → Slice
    planes → Add (int8) → Slice (per tensor) → Reshape

All tensors of one width share one expansion. onnxruntime constant-folds it at session start
(its temporaries are a few bytes per weight), so the DequantizeLinear reads an int8
initializer again and the Conv still fuses into QLinearConv (tested). The levels are
lossless; a group is packed only when its serialized bytes, subgraph included, are fewer than
the int8 tensors'. Opset-13 ops only, so the model's opset is kept.

Hand-written because no library writes this form (onnx's int4 type needs opset 21 and is not
fused by onnxruntime's CPU kernels before a Conv).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import NameAllocator
from ..io import default_opset
from ..targets.ort_cpu import bit_planes, stored_bits

MIN_ELEMENTS = 64
"""Smaller tensors stay int8."""
GROUP_ELEMENTS = 1 << 22
"""At most this many weights share one expansion (its int32 temporaries are 4 B per bit)."""


@dataclass(frozen=True)
class Packed:
    """One packed initializer: its bits per weight and bytes before/after (the share of the
    expansion subgraph not counted)."""

    name: str
    bits: int
    dense_bytes: int
    bytes: int


def level_bits(a: np.ndarray) -> int:
    """Fewest bits (2-8) whose offset-binary range [-2**(b-1), 2**(b-1) - 1] holds ``a``."""
    lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
    for b in range(2, 8):
        if -(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1:
            return b
    return 8


def pack_lowbit(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Packed]]:
    """A copy of ``model`` with each int8 DequantizeLinear weight that fits in fewer than 8
    bits stored packed. Returns the model and what was packed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    dq_inputs = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
    alloc = NameAllocator(out)
    opset = default_opset(out)
    keep: list[onnx.TensorProto] = []
    groups: dict[int, list[list[tuple[str, np.ndarray]]]] = {}
    packed: list[Packed] = []
    for t in g.initializer:
        if t.data_type != TensorProto.INT8 or t.name not in dq_inputs:
            keep.append(t)
            continue
        a = numpy_helper.to_array(t)
        b = stored_bits(level_bits(a), opset)
        if a.size < MIN_ELEMENTS or b >= 8:
            keep.append(t)
            continue
        chunks = groups.setdefault(b, [[]])
        if chunks[-1] and sum(x.size for _, x in chunks[-1]) + a.size > GROUP_ELEMENTS:
            chunks.append([])
        chunks[-1].append((t.name, a))
        packed.append(Packed(t.name, b, t.ByteSize(), -(-a.size * b // 8)))
    head: list[onnx.NodeProto] = []
    dense = {t.name: t for t in g.initializer}
    for b in sorted(groups):
        for members in groups[b]:
            inits, nodes = _expansion(members, b, alloc)
            new_bytes = sum(x.ByteSize() for x in inits) + sum(x.ByteSize() for x in nodes)
            if new_bytes >= sum(dense[name].ByteSize() for name, _ in members):
                # the shared subgraph costs more than it saves (a few small tensors)
                keep += [dense[name] for name, _ in members]
                names = {name for name, _ in members}
                packed = [p for p in packed if p.name not in names]
                continue
            keep += inits
            head += nodes
    restore(g, keep, head)
    return out, packed


def restore(g: onnx.GraphProto, inits: list[onnx.TensorProto], head: list[onnx.NodeProto]) -> None:
    """Make ``inits`` the initializers of ``g`` and put the expansion nodes ``head`` first."""
    del g.initializer[:]
    g.initializer.extend(inits)
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def slice_members(
    members: list[tuple[str, np.ndarray]], starts: list[int], source: str, alloc: NameAllocator
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes that cut each ``(name, array)`` of ``members`` out of the flat
    tensor ``source`` (at ``starts``) and give it its shape under its own name."""
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for (name, a), s in zip(members, starts, strict=True):
        k = {x: alloc.fresh(f"{name}__{x}") for x in ("s", "e", "shape", "flat")}
        inits += [
            numpy_helper.from_array(np.array([s], np.int64), k["s"]),
            numpy_helper.from_array(np.array([s + a.size], np.int64), k["e"]),
            numpy_helper.from_array(np.array(a.shape, np.int64), k["shape"]),
        ]
        nodes += [
            helper.make_node("Slice", [source, k["s"], k["e"]], [k["flat"]],
                             name=alloc.fresh(f"{name}__slice")),
            helper.make_node("Reshape", [k["flat"], k["shape"]], [name],
                             name=alloc.fresh(f"{name}__reshape")),
        ]
    return inits, nodes


def _expansion(
    members: list[tuple[str, np.ndarray]], b: int, alloc: NameAllocator
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Packed bit planes of every member (int8 levels fitting in ``b`` bits, concatenated;
    see :func:`~onnxlw.targets.ort_cpu.bit_planes`) and the nodes that rebuild each one.

    A level v is stored offset-binary, u = v + 2**(b-1), split into planes of 4, 2 or 1 bits
    (highest bits first); each plane holds 8 / width values per byte, the first in the byte's
    high bits. A plane's 256-entry int8 table maps a byte to its values already shifted into
    place (the first plane's table also subtracts the offset), so the planes add up to v in
    int8 without overflow."""
    flat = np.concatenate([a.ravel().astype(np.int16) for _, a in members])
    starts = list(np.cumsum([0] + [a.size for _, a in members[:-1]]).astype(int))
    n = flat.size
    off = 2 ** (b - 1)
    u = (flat + off).astype(np.uint16)

    def nm(base: str) -> str:
        return alloc.fresh(f"onnxlw_w{b}__{base}")

    c = {k: nm(k) for k in ("flat", "zero", "n")}
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), c["flat"]),
        numpy_helper.from_array(np.array([0], np.int64), c["zero"]),
        numpy_helper.from_array(np.array([n], np.int64), c["n"]),
    ]
    nodes: list[onnx.NodeProto] = []
    planes: list[str] = []
    shift = b
    for k, w in enumerate(bit_planes(b)):
        shift -= w
        per = 8 // w
        vals = np.zeros(-(-n // per) * per, np.uint16)  # padding is cut off by the Slice
        vals[:n] = (u >> shift) & (2**w - 1)
        pos = (8 - w * np.arange(1, per + 1)).astype(np.uint16)  # (per,)
        data = (vals.reshape(-1, per) << pos).sum(axis=1).astype(np.uint8)
        table = ((np.arange(256, dtype=np.int16)[:, None] >> pos.astype(np.int16))
                 & (2**w - 1)) << shift  # (256, per): each byte's values, shifted in place
        if k == 0:
            table = table - off
        bn, tn = nm(f"plane{k}_bytes"), nm(f"plane{k}_table")
        inits += [numpy_helper.from_array(data, bn),
                  numpy_helper.from_array(table.astype(np.int8), tn)]
        t = {x: nm(f"plane{k}_{x}") for x in ("i32", "vals", "padded", "levels")}
        nodes += [
            helper.make_node("Cast", [bn], [t["i32"]], to=TensorProto.INT32),
            helper.make_node("Gather", [tn, t["i32"]], [t["vals"]], axis=0),
            helper.make_node("Reshape", [t["vals"], c["flat"]], [t["padded"]]),
            helper.make_node("Slice", [t["padded"], c["zero"], c["n"]], [t["levels"]]),
        ]
        planes.append(t["levels"])
    levels = planes[0]
    for k, plane in enumerate(planes[1:], 1):
        summed = nm(f"sum{k}")
        nodes.append(helper.make_node("Add", [levels, plane], [summed]))
        levels = summed
    for node in nodes:
        node.name = alloc.fresh(f"onnxlw_w{b}__{node.op_type}")
    si, sn = slice_members(members, starts, levels, alloc)
    return inits + si, nodes + sn
