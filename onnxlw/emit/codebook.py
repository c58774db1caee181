"""Store additive codes and codebooks in the model, rebuilt to weights at session start.

For each layer with a :class:`~onnxlw.solve.problem.CodebookRef` the emitted weight
initializer (float for float output, int8 levels before a DequantizeLinear for QDQ output)
is replaced by its codes (uint8, one byte per code) and a constant subgraph:

    codes of all layers of one codebook set → Cast(int32) → per book m: Gather(axis 0, m)
          → Gather(codebook m) → Add over the books in order → per layer: Slice its vectors
          → Reshape (rows, J*dim) → Slice (drop padding) → Mul(Cast(float16 row scale))
          [QDQ: → Div(int8 scale) → Round → Clip(±127) → Cast(int8)]
          → Reshape / Transpose to the weight's shape and order

Every codebook is one float16 initializer, however many layers read it. Codes of 1, 2 or 4 bits are
stored 8, 4 or 2 to a byte and unpacked by a 256-entry byte table first (other widths: one
byte each). The numpy mirror of the
arithmetic is :func:`onnxlw.solve.additive.decode_matrix` / ``requantize``: the rebuilt
tensor equals the plan's weight exactly (tested). onnxruntime constant-folds the subgraph at
session start, so the model runs at the speed of its float (or QDQ) form, with no custom op.

In float output, layers kept at 8 bits (:class:`QuantEncoding`) are stored the same way:
int8 levels → Cast(float) → Mul(per-channel scale).

Hand-written: no library writes codebook-compressed ONNX weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InternalError
from ..graph import NameAllocator
from ..plan import Plan
from ..solve.problem import CodebookRef, QuantEncoding
from .packed import restore


@dataclass(frozen=True)
class Stored:
    """One weight stored as codes (``form`` "codes") or int8 levels (``form`` "int8"), and
    its bytes before/after (codebooks not counted)."""

    name: str
    form: str
    dense_bytes: int
    bytes: int


def store_codebooks(model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[Stored]]:
    """A copy of ``model`` with each coded layer's weight rebuilt from its codes (and, for
    float output, each 8-bit layer's from int8 levels). Returns the model and what was
    stored."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    alloc = NameAllocator(out)
    by_name = {n.name: n for n in g.node}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    head: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    stored: list[Stored] = []
    coded: dict[tuple[str, int], list[tuple[str, CodebookRef, bool]]] = {}
    books_stored: dict[str, dict[int, str]] = {}
    for i, sol in sorted(plan.layers.items()):
        enc = sol.encoding
        node = by_name.get(plan.layer_names.get(i, ""))
        if node is None:
            raise InternalError(f"layer {plan.layer_names.get(i)!r} is not in the emitted model")
        target = node.input[1]
        qdq = target in producer and producer[target].op_type == "DequantizeLinear"
        if qdq:
            target = producer[target].input[0]
        if target not in inits:
            raise InternalError(f"the weight of {node.name!r} is not an initializer")
        if isinstance(enc, CodebookRef):
            coded.setdefault((enc.book, enc.codes.shape[0]), []).append((target, enc, qdq))
            cb = code_bits(plan.codebooks[enc.book].shape[1])
            stored.append(Stored(target, "codes", inits[target].ByteSize(),
                                 -(-enc.codes.size * cb // 8)))
        elif isinstance(enc, QuantEncoding) and not qdq:
            ti, tn = _int8(enc, inits[target], target, alloc, node.op_type == "MatMul")
            new_inits += ti
            head += tn
            stored.append(Stored(target, "int8", inits[target].ByteSize(), ti[0].ByteSize()))
        else:
            continue
        replaced.add(target)
    for n, ((book, nb), members) in enumerate(coded.items()):
        # layers summing the first nb books of a set are decoded together; the set's
        # codebooks are stored once
        ti, tn = _decode(plan.codebooks[book][:nb], members, _Names(alloc, f"cb{n}"),
                         books_stored.setdefault(book, {}))
        new_inits += ti
        head += tn
    keep = [t for t in g.initializer if t.name not in replaced] + new_inits
    restore(g, keep, head)
    return out, stored


def code_bits(entries: int) -> int:
    """Bits each code is stored in: 1, 2 or 4 (packed) or 8 (a byte)."""
    bits = max(1, int(entries - 1).bit_length())
    return bits if 8 % bits == 0 else 8


class _Names:
    """Short unique names (node and tensor names are a visible share of a 2-bit file)."""

    def __init__(self, alloc: NameAllocator, prefix: str) -> None:
        self.alloc, self.prefix = alloc, prefix

    def __call__(self, x: str) -> str:
        return self.alloc.fresh(f"{self.prefix}_{x}")


def _decode(
    books: np.ndarray,
    members: list[tuple[str, CodebookRef, bool]],
    nm: _Names,
    stored: dict[int, str],
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes that rebuild every member ``(weight name, codes, qdq)`` of one
    codebook set: all codes are decoded together, then each layer's rows are cut out,
    scaled (and requantized) and shaped. ``stored``: book index -> initializer name of the
    set's codebooks written so far (filled in)."""
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(a: np.ndarray, x: str) -> str:
        name = nm(x)
        inits.append(numpy_helper.from_array(a, name))
        return name

    def node(op: str, ins: list[str], x: str, out: str | None = None, **kw) -> str:  # noqa: ANN003
        name = out or nm(x)
        nodes.append(helper.make_node(op, ins, [name], name=nm(op[:2]), **kw))
        return name

    nb, entries, dim = books.shape
    codes = np.concatenate([e.codes.reshape(nb, -1) for _, e, _ in members], axis=1)
    bits = code_bits(entries)
    if bits < 8:  # 8 / bits codes to a byte, unpacked by a byte table
        per = 8 // bits
        flat = codes.ravel().astype(np.uint16)
        pad = np.zeros(-(-flat.size // per) * per, np.uint16)
        pad[: flat.size] = flat
        shifts = (8 - bits * np.arange(1, per + 1)).astype(np.uint16)
        packed = (pad.reshape(-1, per) << shifts).sum(axis=1).astype(np.uint8)
        table = (np.arange(256)[:, None] >> shifts.astype(np.int64)) & (2**bits - 1)
        b32 = node("Cast", [const(packed, "codes")], "b32", to=TensorProto.INT32)
        u = node("Gather", [const(table.astype(np.int32), "table"), b32], "unpacked", axis=0)
        u = node("Reshape", [u, const(np.array([-1], np.int64), "f")], "uflat")
        u = node("Slice", [u, const(np.array([0], np.int64), "u0"),
                           const(np.array([codes.size], np.int64), "u1")], "ucut")
        c32 = node("Reshape", [u, const(np.array(codes.shape, np.int64), "cshape")], "i32")
    else:
        c32 = node("Cast", [const(codes, "codes")], "i32", to=TensorProto.INT32)  # (books, V)
    acc = None
    for m in range(nb):
        idx = node("Gather", [c32, const(np.array(m, np.int64), f"m{m}")], f"idx{m}", axis=0)
        if m not in stored:  # float16 values (see solve.additive.fit), stored as such
            stored[m] = node("Cast", [const(books[m].astype(np.float16), f"book{m}")],
                             f"book{m}f", to=TensorProto.FLOAT)
        v = node("Gather", [stored[m], idx], f"v{m}", axis=0)  # (V, dim)
        acc = v if acc is None else node("Add", [acc, v], f"sum{m}")
    assert acc is not None
    flat = node("Reshape", [acc, const(np.array([-1], np.int64), "flat")], "all")
    start = 0
    lo, hi = const(np.array(-127, np.float32), "lo"), const(np.array(127, np.float32), "hi")
    for name, enc, qdq in members:
        _, rows, j = enc.codes.shape
        shape = enc.weight_shape
        k = int(np.prod(shape)) // rows
        n = rows * j * dim
        w = node("Slice", [flat, const(np.array([start], np.int64), "a"),
                           const(np.array([start + n], np.int64), "b")], "part")
        start += n
        w = node("Reshape", [w, const(np.array([rows, j * dim], np.int64), "rows")], "rows")
        if j * dim > k:
            w = node("Slice", [w, const(np.array([0], np.int64), "c0"),
                               const(np.array([k], np.int64), "c1"),
                               const(np.array([1], np.int64), "ax")], "cut")
        scale = node("Cast", [const(enc.scale.astype(np.float16).reshape(rows, 1), "s")],
                     "s32", to=TensorProto.FLOAT)
        w = node("Mul", [w, scale], "w")
        if qdq:
            assert enc.quant is not None
            qs = const(enc.quant.scale.reshape(rows, 1).astype(np.float32), "qs")
            w = node("Div", [w, qs], "div")
            w = node("Round", [w], "round")
            w = node("Clip", [w, lo, hi], "clip")
            w = node("Cast", [w], "q", to=TensorProto.INT8)
        if enc.transposed:  # MatMul: (K, O)
            node("Transpose", [w], "", out=name, perm=[1, 0])
        elif enc.layout == "channels" and len(shape) == 4:
            o, c, kh, kw = shape
            w = node("Reshape", [w, const(np.array([o, kh, kw, c], np.int64), "khwc")], "khwc")
            node("Transpose", [w], "", out=name, perm=[0, 3, 1, 2])
        else:
            node("Reshape", [w, const(np.array(shape, np.int64), "shape")], "", out=name)
    return inits, nodes


def _int8(
    enc: QuantEncoding, dense: onnx.TensorProto, out: str, alloc: NameAllocator, matmul: bool
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """int8 levels → Cast → Mul(scale): weight-only 8 bits in a float model."""
    shape = tuple(dense.dims)
    g, o, k = enc.q.shape
    if matmul:
        q = enc.q[0].T
        s = enc.scale.reshape(1, -1)
    else:
        q = enc.q.reshape(shape)
        s = enc.scale.reshape((-1,) + (1,) * (len(shape) - 1))
    qn, sn, fn = (alloc.fresh(f"{out}__{x}") for x in ("int8", "scale", "float"))
    inits = [numpy_helper.from_array(q.astype(np.int8), qn),
             numpy_helper.from_array(s.astype(np.float32), sn)]
    nodes = [
        helper.make_node("Cast", [qn], [fn], name=alloc.fresh(f"{out}__Cast"),
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [fn, sn], [out], name=alloc.fresh(f"{out}__Mul")),
    ]
    return inits, nodes
