"""Harvest BatchNormalization statistics, then fold BN into the preceding Conv/ConvTranspose/Gemm.

After the fold, the layer writes the BN's output tensor name, so the statistics stay keyed by
that tensor: its channel c is distributed with mean ``B[c]`` and std ``|scale[c]|``. A layer
whose pre-BN output is read anywhere else, including inside an If/Loop/Scan body, is not folded
(the fold removes that tensor).

Hand-written: onnxscript's BN fusion rules match these folds, but only on top of onnx_ir, which
drops sparse initializers; the harvest and the per-rule reasons are onnxlw's either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import GraphView, NameAllocator, attrs, rebuild
from .base import Note, PassResult


@dataclass(frozen=True)
class BNStats:
    """Statistics of one BatchNormalization, keyed by its output tensor.

    All arrays have shape (C,). The output channel c is modelled as N(bias[c], out_std[c]**2).
    """

    tensor: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    folded_into: str | None

    @property
    def out_mean(self) -> np.ndarray:
        """Mean of the BN output per channel, shape (C,)."""
        return self.bias

    @property
    def out_std(self) -> np.ndarray:
        """Std of the BN output per channel, shape (C,): |scale| * sqrt(var / (var + eps)).

        A channel whose input barely varies (var << eps, a dead channel) has std near 0.
        """
        return np.abs(self.scale) * np.sqrt(self.var / (self.var + self.epsilon))

    def scaled(self, factor: np.ndarray | float) -> BNStats:
        """The statistics of ``factor * tensor`` (per channel, shape (C,) or scalar).

        For a pass that rescales this tensor's channels (cross-layer equalization): the output
        mean and std scale by ``factor`` and ``|factor|``; ``mean``/``var`` describe the BN's
        input and stay. The tensor is no longer the plain BN output, so ``folded_into`` stays
        as it was (the layer that writes it).
        """
        f = np.broadcast_to(np.asarray(factor, np.float64), self.scale.shape)
        return dataclasses.replace(self, scale=self.scale * f, bias=self.bias * f)


@dataclass
class FoldResult(PassResult):
    """PassResult plus the harvested statistics (tensor name -> stats)."""

    stats: dict[str, BNStats] | None = None


_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorm(model: onnx.ModelProto) -> FoldResult:
    """Record every inference BN's statistics and fold it into its producer when safe."""
    view = GraphView(model)
    alloc = NameAllocator(model)
    stats: dict[str, BNStats] = {}
    notes: list[Note] = []
    replace: dict[int, onnx.NodeProto] = {}  # id(producer) -> folded node
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    for bn in view.nodes:
        if bn.op_type != "BatchNormalization":
            continue
        where = bn.name or bn.output[0]
        a = attrs(bn)
        params = [view.const_or_none(i) for i in bn.input[1:5]]
        if (
            a.get("training_mode", 0)
            or any(p is None for p in params)
            or len([o for o in bn.output if o]) > 1
        ):
            notes.append(
                Note(
                    "fold_batchnorm",
                    "harvest",
                    where,
                    False,
                    "training mode or non-constant statistics",
                )
            )
            continue
        scale, b, mean, var = (np.asarray(p, np.float64) for p in params)
        eps = float(a.get("epsilon", 1e-5))
        prod = view.producer.get(bn.input[0])
        reason = _unfoldable(prod, bn, view)
        folded_into = None
        if not reason:
            assert prod is not None
            k = scale / np.sqrt(var + eps)
            node, inits = _fold(prod, bn, k, b - mean * k, view, alloc)
            replace[id(prod)] = node
            drop.add(id(bn))
            new_inits += inits
            folded_into = prod.name or prod.output[0]
            notes.append(Note("fold_batchnorm", "fold", where, True, f"into {folded_into}"))
        else:
            notes.append(Note("fold_batchnorm", "fold", where, False, reason))
        stats[bn.output[0]] = BNStats(bn.output[0], scale, b, mean, var, eps, folded_into)
    nodes = [replace.get(id(n), n) for n in view.nodes if id(n) not in drop]
    if not notes:
        notes.append(
            Note("fold_batchnorm", "harvest", "graph", False, "no BatchNormalization node")
        )
    res = FoldResult(rebuild(model, nodes, list(model.graph.initializer) + new_inits), notes)
    res.stats = stats
    return res


def _unfoldable(prod: onnx.NodeProto | None, bn: onnx.NodeProto, view: GraphView) -> str:
    if prod is None:
        return "input is a graph input"
    if prod.op_type not in _FOLDABLE:
        return f"producer is {prod.op_type}, not Conv/ConvTranspose/Gemm"
    if view.read_in_subgraph(prod.output[0]):
        return "the layer output (before BN) is also read inside an If/Loop/Scan body"
    if view.single_consumer(prod.output[0]) is not bn:
        return "the layer output has other consumers"
    for i in prod.input[1:]:
        if not i:
            continue
        if not view.is_const(i):
            return f"{prod.op_type} input {i!r} is not constant"
        if any(c is not prod for c in view.consumers.get(i, [])):
            return f"weight {i!r} is shared with another node"
    w = view.const(prod.input[1])
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} is not float32"
    if prod.op_type == "Gemm":
        a = attrs(prod)
        if a.get("transA", 0):
            return "Gemm has transA=1"
        nout = w.shape[0] if a.get("transB", 0) else w.shape[1]
        if len(prod.input) > 2 and prod.input[2]:
            c = view.const(prod.input[2])
            if c.size not in (1, nout) or (c.size == nout and c.shape not in ((nout,), (1, nout))):
                return f"Gemm C of shape {list(c.shape)} is not a per-output bias"
    return ""


def _fold(
    prod: onnx.NodeProto,
    bn: onnx.NodeProto,
    k: np.ndarray,
    shift: np.ndarray,
    view: GraphView,
    alloc: NameAllocator,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """Fold y = k * layer(x) + shift. ``k``, ``shift``: (C_out,)."""
    w = view.const(prod.input[1]).astype(np.float64)
    has_b = len(prod.input) > 2 and bool(prod.input[2])
    a = attrs(prod)
    if prod.op_type == "Conv":
        w2 = w * k.reshape(-1, *([1] * (w.ndim - 1)))
        cout = w.shape[0]
    elif prod.op_type == "ConvTranspose":
        g = int(a.get("group", 1))
        cin, cpg = w.shape[0], w.shape[1]
        w2 = (
            w.reshape(g, cin // g, cpg, *w.shape[2:]) * k.reshape(g, 1, cpg, *([1] * (w.ndim - 2)))
        ).reshape(w.shape)
        cout = g * cpg
    else:  # Gemm: y = alpha * A @ B' + beta * C
        alpha = float(a.get("alpha", 1.0))
        wt = w if a.get("transB", 0) else w.T  # (out, in)
        w2 = alpha * wt * k[:, None]
        cout = wt.shape[0]
    if has_b:
        b = view.const(prod.input[2]).astype(np.float64)
        if prod.op_type == "Gemm":
            b = float(attrs(prod).get("beta", 1.0)) * np.broadcast_to(b.reshape(-1), (cout,))
        b2 = b * k + shift
    else:
        b2 = shift
    wname = alloc.fresh(prod.input[1] + "_bnfold")
    bname = alloc.fresh((prod.input[2] if has_b else prod.input[1]) + "_bnfold_bias")
    inits = [
        numpy_helper.from_array(w2.astype(np.float32), wname),
        numpy_helper.from_array(b2.astype(np.float32), bname),
    ]
    if prod.op_type == "Gemm":
        node = helper.make_node(
            "Gemm", [prod.input[0], wname, bname], [bn.output[0]], name=prod.name, transB=1
        )
    else:
        node = onnx.NodeProto()
        node.CopyFrom(prod)
        del node.input[:]
        node.input.extend([prod.input[0], wname, bname])
        node.output[0] = bn.output[0]
    return node, inits
