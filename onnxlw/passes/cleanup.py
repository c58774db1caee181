"""Drop inference no-ops (Identity, Dropout) and normalize Gemm, Conv padding and Pad.

All hand-written: onnx_ir's IdentityEliminationPass could drop Identity, but onnxscript's
Dropout rule misses the unused-mask case, no library gives Gemm the transB=1/alpha=beta=1 form,
onnxscript's Pad fusion did not fire on a TF-SAME Pad (review of 2026-11-30, section 2), and
none turns ``auto_pad`` into explicit pads.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..graph import GraphView, NameAllocator, attrs, rebuild, rename_reads
from .base import Note, PassResult


def drop_noops(model: onnx.ModelProto) -> PassResult:
    """Remove Identity and inference-mode Dropout, rewiring their consumers.

    A no-op whose output is a graph output is removed only when the tensor it forwards (after
    following earlier removed no-ops) can take the output's name: it is produced by a node,
    is not a graph output itself, and has no other name claim. Readers inside If/Loop/Scan
    bodies are renamed with the top-level ones.
    """
    view = GraphView(model)
    rename: dict[str, str] = {}
    drop: set[int] = set()
    notes: list[Note] = []
    out_rename: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for n in view.nodes:
        if n.op_type not in ("Identity", "Dropout") or n.domain not in ("", "ai.onnx"):
            continue
        where = n.name or n.output[0]
        if n.op_type == "Dropout":
            if len(n.input) > 2 and n.input[2]:
                tm = view.const_or_none(n.input[2])
                if tm is None or bool(tm):
                    notes.append(
                        Note(
                            "drop_noops",
                            "Dropout",
                            where,
                            False,
                            "training_mode is not constant false",
                        )
                    )
                    continue
            if (
                len(n.output) > 1
                and n.output[1]
                and (view.consumers.get(n.output[1]) or n.output[1] in view.graph_outputs)
            ):
                notes.append(Note("drop_noops", "Dropout", where, False, "mask output is used"))
                continue
        src, dst = resolve(n.input[0]), n.output[0]
        if dst in view.graph_outputs:
            if src in view.producer and src not in view.graph_outputs and src not in out_rename:
                out_rename[src] = dst
            else:
                if src in out_rename:
                    why = f"the tensor it forwards already takes graph output {out_rename[src]!r}"
                elif src in view.graph_outputs:
                    why = "its output is a graph output and so is the tensor it forwards"
                else:
                    why = "its output is a graph output fed by an input or constant"
                notes.append(Note("drop_noops", n.op_type, where, False, why))
                continue
        else:
            rename[dst] = src
        drop.add(id(n))
        notes.append(Note("drop_noops", n.op_type, where, True))

    mapping = {k: out_rename.get(resolve(k), resolve(k)) for k in rename}
    mapping.update(out_rename)
    nodes = []
    for n in view.nodes:
        if id(n) in drop:
            continue
        m = rename_reads(n, mapping)
        for k, o in enumerate(m.output):
            m.output[k] = out_rename.get(o, o)
        nodes.append(m)
    if not notes:
        notes.append(Note("drop_noops", "Identity/Dropout", "graph", False, "none present"))
    return PassResult(rebuild(model, nodes, model.graph.initializer), notes)


def normalize_gemm(model: onnx.ModelProto) -> PassResult:
    """Rewrite Gemm with a constant B as alpha=1, beta=1, transB=1, and a 1-D bias C.

    The weight matrix is then (out, in), so per-channel weight quantization uses axis 0.
    """
    view = GraphView(model)
    alloc = NameAllocator(model)
    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    notes: list[Note] = []
    for n in view.nodes:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        where = n.name or n.output[0]
        a = attrs(n)
        b = view.const_or_none(n.input[1])
        c = view.const_or_none(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        has_c = len(n.input) > 2 and bool(n.input[2])

        def keep(reason: str, n: onnx.NodeProto = n, where: str = where) -> None:
            notes.append(Note("normalize_gemm", "Gemm", where, False, reason))
            nodes.append(n)

        if b is None or a.get("transA", 0):
            keep("B is not constant" if b is None else "transA=1")
            continue
        if has_c and c is None:
            keep("C is not constant")
            continue
        alpha = float(a.get("alpha", 1.0))
        beta = float(a.get("beta", 1.0))
        w = b.T if not a.get("transB", 0) else b
        w = (alpha * w).astype(np.float32)
        nout = w.shape[0]
        if c is not None:
            if c.size not in (1, nout) or (c.ndim == 2 and c.shape[0] != 1):
                keep(f"C of shape {list(c.shape)} is not a per-output bias")
                continue
            bias = np.broadcast_to(beta * c.reshape(-1), (nout,)).astype(np.float32)
        else:
            bias = np.zeros(nout, np.float32)
        if (
            a.get("transB", 0) == 1
            and alpha == 1.0
            and beta == 1.0
            and c is not None
            and c.shape == (nout,)
        ):
            keep("already normal")
            continue
        wname = alloc.fresh(n.input[1] + "_t" if not a.get("transB", 0) else n.input[1])
        bname = alloc.fresh((n.input[2] if has_c else n.output[0]) + "_bias")
        new_inits += [numpy_helper.from_array(w, wname), numpy_helper.from_array(bias, bname)]
        nodes.append(
            helper.make_node(
                "Gemm", [n.input[0], wname, bname], list(n.output), name=n.name, transB=1
            )
        )
        notes.append(Note("normalize_gemm", "Gemm", where, True))
    if not notes:
        notes.append(Note("normalize_gemm", "Gemm", "graph", False, "no Gemm"))
    return PassResult(rebuild(model, nodes, list(model.graph.initializer) + new_inits), notes)


def fuse_pad_into_conv(model: onnx.ModelProto) -> PassResult:
    """Merge a zero, constant-mode Pad on the spatial dims into the pads of its Conv consumers."""
    view = GraphView(model)
    nodes: list[onnx.NodeProto] = []
    notes: list[Note] = []
    merged: dict[str, tuple[str, np.ndarray]] = {}  # pad output -> (pad input, spatial pads)
    for n in view.nodes:
        if n.op_type != "Pad":
            continue
        where = n.name or n.output[0]
        reason = _pad_unfusable(n, view)
        if reason:
            notes.append(Note("fuse_pad_into_conv", "Pad", where, False, reason))
            continue
        pads = view.const(n.input[1]).astype(np.int64)
        r = len(pads) // 2
        merged[n.output[0]] = (n.input[0], np.concatenate([pads[2:r], pads[r + 2 :]]))
        notes.append(Note("fuse_pad_into_conv", "Pad", where, True))
    for n in view.nodes:
        if n.op_type == "Pad" and n.output[0] in merged:
            continue
        if n.op_type == "Conv" and n.input[0] in merged:
            src, extra = merged[n.input[0]]
            a = attrs(n)
            k = len(extra) // 2
            pads = np.asarray(a.get("pads", [0] * (2 * k)), np.int64) + extra
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[0] = src
            del m.attribute[:]
            for key, val in a.items():
                if key not in ("pads", "auto_pad"):
                    m.attribute.append(helper.make_attribute(key, val))
            m.attribute.append(helper.make_attribute("pads", [int(p) for p in pads]))
            nodes.append(m)
        else:
            nodes.append(n)
    if not notes:
        notes.append(Note("fuse_pad_into_conv", "Pad", "graph", False, "no Pad"))
    return PassResult(rebuild(model, nodes, model.graph.initializer), notes)


def _pad_unfusable(n: onnx.NodeProto, view: GraphView) -> str:
    a = attrs(n)
    mode = a.get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        return f"mode {mode!r} is not constant"
    if len(n.input) < 2 or view.const_or_none(n.input[1]) is None:
        return "pads are not constant"
    if len(n.input) > 2 and n.input[2]:
        v = view.const_or_none(n.input[2])
        if v is None or np.any(v != 0):
            return "pad value is not zero"
    if len(n.input) > 3 and n.input[3]:
        return "Pad has an axes input"
    pads = view.const(n.input[1])
    r = len(pads) // 2
    if r < 3 or np.any(pads[:2] != 0) or np.any(pads[r : r + 2] != 0) or np.any(pads < 0):
        return "pads touch the batch or channel dims, or are negative"
    cons = view.consumers.get(n.output[0], [])
    if not cons or n.output[0] in view.graph_outputs:
        return "its output is a graph output or unused"
    for c in cons:
        ca = attrs(c)
        if c.op_type != "Conv" or c.input[0] != n.output[0]:
            return f"consumer {c.op_type} is not a Conv data input"
        if ca.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "the Conv uses auto_pad"
    return ""


_AUTO_PADS = ("SAME_UPPER", "SAME_LOWER", "VALID")


def explicit_conv_pads(model: onnx.ModelProto) -> PassResult:
    """Rewrite Conv ``auto_pad=SAME_UPPER/SAME_LOWER/VALID`` as explicit ``pads``.

    The SAME pads depend on the input's spatial size, read from the model's value_info and
    graph inputs, or from shape inference when those lack it. A Conv whose input spatial size
    is not known stays as it is, with a note. Explicit pads let ``fuse_pad_into_conv`` and the
    im2col geometry read one padding convention.
    """
    view = GraphView(model)
    targets = [n for n in view.nodes if n.op_type == "Conv" and _auto_pad(n) != "NOTSET"]
    if not targets:
        return PassResult(
            rebuild(model, model.graph.node, model.graph.initializer),
            [Note("explicit_conv_pads", "auto_pad", "graph", False, "no Conv with auto_pad")],
        )
    shapes = _known_shapes(model)
    if any(_spatial(shapes.get(n.input[0])) is None for n in targets if _auto_pad(n) != "VALID"):
        try:
            shapes = _known_shapes(shape_inference.infer_shapes(model, strict_mode=False))
        except Exception:  # noqa: BLE001 - e.g. a > 2 GB proto: keep what value_info says
            pass
    notes: list[Note] = []
    rewrite: dict[int, onnx.NodeProto] = {}
    for n in targets:
        where = n.name or n.output[0]
        mode = _auto_pad(n)
        pads, why = _explicit_pads(n, mode, shapes, view)
        if pads is None:
            notes.append(Note("explicit_conv_pads", "auto_pad", where, False, why))
            continue
        m = onnx.NodeProto()
        m.CopyFrom(n)
        del m.attribute[:]
        for a in n.attribute:
            if a.name not in ("auto_pad", "pads"):
                m.attribute.append(a)
        m.attribute.append(helper.make_attribute("pads", pads))
        rewrite[id(n)] = m
        notes.append(Note("explicit_conv_pads", "auto_pad", where, True, f"{mode} -> {pads}"))
    nodes = [rewrite.get(id(n), n) for n in view.nodes]
    return PassResult(rebuild(model, nodes, model.graph.initializer), notes)


def _auto_pad(n: onnx.NodeProto) -> str:
    v = attrs(n).get("auto_pad", b"NOTSET")
    return v.decode() if isinstance(v, bytes) else str(v)


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where symbolic) from value_info, graph inputs and outputs."""
    g = model.graph
    out: dict[str, list[int | None]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return out


def _spatial(dims: list[int | None] | None) -> list[int] | None:
    if dims is None or len(dims) < 3 or any(d is None for d in dims[2:]):
        return None
    return [int(d) for d in dims[2:]]  # type: ignore[arg-type]


def _explicit_pads(
    n: onnx.NodeProto, mode: str, shapes: dict[str, list[int | None]], view: GraphView
) -> tuple[list[int] | None, str]:
    """ONNX Conv auto_pad: out = ceil(in / stride); the total pad is split evenly, the odd
    unit at the end (SAME_UPPER) or at the start (SAME_LOWER)."""
    a = attrs(n)
    kernel = a.get("kernel_shape")
    if kernel is None:
        w = view.const_or_none(n.input[1])
        wdims = list(w.shape) if w is not None else shapes.get(n.input[1])
        if wdims is None or any(d is None for d in wdims[2:]):
            return None, "kernel_shape is not given and the weight shape is unknown"
        kernel = wdims[2:]
    k = len(kernel)
    if mode == "VALID":
        return [0] * (2 * k), ""
    spatial = _spatial(shapes.get(n.input[0]))
    if spatial is None or len(spatial) != k:
        return None, f"input spatial shape unknown ({mode} pads depend on it)"
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    begin, end = [], []
    for size, kk, st, d in zip(spatial, kernel, strides, dil, strict=True):
        out = -(-size // st)
        total = max((out - 1) * st + (kk - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return [int(p) for p in begin + end], ""
