"""onnxruntime CPU (x86) facts: which QDQ patterns it fuses, dtype rules, the u8s8 pair order.

Everything here is specific to onnxruntime's CPU execution provider and may change with its
version (``TUNED_FOR`` records the version the pair order was checked on):

- a Conv whose input, weight and bias are dequantized and whose output is quantized becomes
  ``QLinearConv``; ``Add``/``Concat``/pools with quantized inputs and output run in integers;
  Reshape-like ops and MaxPool keep their input's quantization parameters;
- a Relu or Clip(0, hi) after a layer is absorbed into the layer's output Q when the Q's range
  lies within the clip;
- activations are uint8 asymmetric, weights int8 symmetric per channel (int4 needs opset 21);
- x86 without VNNI multiplies uint8 x int8 pairs and adds each pair in int16 (VPMADDUBSW);
  the pair order below is the K packing order of its GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import GraphView, relu_upper
from ..ops import LayerRecord

TUNED_FOR = "1.32.0"
"""onnxruntime version on which the u8s8 pair order was verified (fused == simulated)."""

PASS_THROUGH_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool"})
"""Ops whose output keeps its input's quantization parameters (ORT drops their Q/DQ pair)."""

QUANT_IO_OPS = frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool"})
"""Non-layer ops run in integer arithmetic by ORT when their inputs and output are quantized."""

HEAD_OPS = frozenset(
    {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Concat", "Split",
     "Slice", "Sigmoid", "Softmax", "LogSoftmax", "Gather"}
)
"""Ops between a layer and a graph output that make the layer a *head*: its raw output is what
the user reads (logits, boxes). Synthetic inputs do not reach the tails real inputs produce
there (a detector's class logits are almost never positive on noise), so head outputs stay
in float."""

ACT_DTYPE = np.uint8
WEIGHT_DTYPE = np.int8
BIAS_DTYPE = np.int32
INT32_MAX = 2**31 - 1


def weight_dtype(bits: int, opset: int) -> type:
    """numpy dtype of quantized weights in the QDQ graph at ``bits`` (2-8): int8. Below 8 bits
    the levels use a sub-range of int8 and the pack stage stores them in ``bits`` bits each:
    onnxruntime's QLinearConv takes int8 weights only (an int4 DequantizeLinear before a Conv
    is not fused: measured, it runs the float Conv), while a packed tensor expanded to int8 at
    session start is constant-folded and fused."""
    if 2 <= bits <= 8:
        return np.int8
    raise ValueError(f"{bits}-bit weights are not supported by this target (opset {opset})")


PLANES_OPSET = 14
"""First opset whose Add takes int8: widths that do not divide a byte are stored as bit
planes summed in int8 from here on."""


def bit_planes(bits: int) -> tuple[int, ...]:
    """Plane widths (each 1, 2 or 4 bits, so whole values fit in a byte) that store a
    ``bits``-bit weight, widest first: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1."""
    out, left = [], bits
    for w in (4, 2, 1):
        if left >= w:
            out.append(w)
            left -= w
    return tuple(out)


def stored_bits(bits: int, opset: int = PLANES_OPSET) -> int:
    """Bits a weight of ``bits`` levels takes in the file.

    Each width is stored as bit planes of 4, 2 or 1 bits (:func:`bit_planes`), each expanded
    at session start by a 256-entry lookup per byte (Gather) and summed in int8. The
    temporaries are about a byte per weight per plane. A general b-bit unpacking needs per-bit
    integer tensors that onnxruntime's constant folding keeps until it finishes: measured on
    ResNet-50 at 4 bits, 2.9 GB and 4.4 s at session start against 0.1 GB and 0.2 s for int8.
    Below opset 14 (no int8 Add) only the single-plane widths 2 and 4 are packed: 3 bits are
    stored as 4 and 5-7 as 8."""
    if bits >= 8:
        return 8
    if opset >= PLANES_OPSET:
        return max(bits, 2)
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def act_levels(bits: int) -> int:
    """Largest uint8 level of a ``bits``-bit activation grid (255 at 8 bits). Below 8 bits the
    emitter clips the uint8 levels to it with a uint8 Clip between Q and DQ: onnxruntime still
    fuses the Convs on both sides into QLinearConv (measured), which no uint4 Q/DQ allows."""
    return 2**bits - 1


@dataclass
class QTensor:
    """An activation tensor that gets a Q/DQ pair.

    ``lo_bound``/``hi_bound`` come from an absorbed Relu/Clip (the range must lie within).
    ``same_as`` names the tensor whose parameters a pass-through output reuses.
    ``pre`` is the pre-activation tensor the Q reads when the activation node is absorbed.
    """

    name: str
    lo_bound: float | None = None
    hi_bound: float | None = None
    same_as: str | None = None
    pre: str | None = None
    absorbed: tuple[str, ...] = ()


def u8s8_pair_order(rec: LayerRecord) -> np.ndarray | None:
    """K in onnxruntime's x86 u8s8 GEMM packing order, whose consecutive pairs it adds in int16.

    The GEMM packs K in onnxruntime's order: (kh, kw, c) for a conv (its QLinearConv runs
    channels-last at ORT_ENABLE_ALL), plain input order for Gemm/MatMul. Depthwise convs use a
    kernel that accumulates in int32 and need no guard.
    """
    if rec.op_type == "Conv":
        assert rec.geom is not None
        cin_g = rec.weight_shape[1]
        if cin_g == 1 and rec.geom.group > 1:
            return None
        kh, kw = rec.weight_shape[2], rec.weight_shape[3]
        return np.arange(cin_g * kh * kw).reshape(cin_g, kh, kw).transpose(1, 2, 0).ravel()
    k = rec.weight_shape[1] if rec.op_type == "Gemm" else rec.weight_shape[0]
    return np.arange(k)


def absorbable(act: onnx.NodeProto, view: GraphView) -> tuple[float, float] | None:
    """(lo, hi) if ``act`` is Relu or Clip with a lower bound of 0 (its Q can replace it)."""
    hi = relu_upper(act, view)
    return None if hi is None else (0.0, hi)


def channel_clip(node: onnx.NodeProto, view: GraphView) -> float | None:
    """min(c) if ``node`` is Min(x, c) with a positive constant ``c`` (a per-channel clip),
    which a Q whose range tops out at or below min(c) makes a no-op."""
    if node.op_type != "Min" or len(node.input) != 2:
        return None
    c = view.const_or_none(node.input[1])
    if c is None or c.size == 0 or float(np.min(c)) <= 0:
        return None
    if c.ndim > 4 or sum(d > 1 for d in c.shape) > 1:  # a scalar or one value per channel
        return None
    return float(np.min(c))


def is_head(t: str, view: GraphView, depth: int = 12) -> bool:
    """True when tensor ``t`` reaches a graph output through HEAD_OPS only."""
    if t in view.graph_outputs:
        return True
    if depth == 0:
        return False
    cs = view.consumers.get(t, [])
    return any(
        c.op_type in HEAD_OPS and any(is_head(o, view, depth - 1) for o in c.output if o)
        for c in cs
    )


def activation_plan(
    view: GraphView,
    layers: list[LayerRecord],
    is_activation: set[str],
    notes: list[tuple[str, str]],
    heads: bool = True,
) -> dict[str, QTensor]:
    """The activation tensors that get a Q/DQ pair so that every layer fuses.

    ``is_activation``: float tensors synthesis can produce (others are never quantized).
    ``notes`` receives (tensor, reason) for outputs deliberately left in float. ``heads``:
    leave head conv outputs (see HEAD_OPS) in float.
    """
    active = {r.node for r in layers if r.skip is None}
    outputs = set(view.graph_outputs)
    q: dict[str, QTensor] = {}

    def want(t: str, allow_output: bool = False) -> bool:
        return (
            bool(t)
            and t in is_activation
            and not view.is_const(t)
            and (allow_output or t not in outputs)
        )

    def add_output(t: str, allow_output: bool = False) -> None:
        if not want(t, allow_output) or t in q:
            return
        act = view.single_consumer(t)
        bounds = absorbable(act, view) if act is not None else None
        if act is not None and bounds is not None:
            nodes, hi = (act.name,), bounds[1]
            clip = view.single_consumer(act.output[0])
            top = channel_clip(clip, view) if clip is not None else None
            if top is not None:  # Relu -> Min(c): an equalized ReLU6 (passes/equalize.py)
                act, nodes, hi = clip, (*nodes, clip.name), min(hi, top)
            if want(act.output[0], allow_output):
                q[act.output[0]] = QTensor(act.output[0], bounds[0], hi, pre=t, absorbed=nodes)
                return
        q[t] = QTensor(t)

    by_node = {r.node: r for r in layers}
    for n in view.nodes:
        rec = by_node.get(n.name)
        if rec is not None:
            if rec.node not in active:
                continue
            q.setdefault(rec.input, QTensor(rec.input))
            if rec.op_type == "Conv":
                if heads and is_head(rec.output, view):
                    notes.append(
                        (rec.output, "a head output (reaches a graph output through "
                         "shape/sigmoid/softmax ops) stays float: its conv runs in float")
                    )
                else:
                    add_output(rec.output, allow_output=True)
            else:
                add_output(rec.output)
        elif n.op_type in QUANT_IO_OPS:
            ins = [i for i in n.input[: (None if n.op_type == "Concat" else 2)] if i]
            if n.op_type == "Add" and (len(ins) != 2 or any(view.is_const(i) for i in ins)):
                continue
            if (
                all(want(i) for i in ins)
                and want(n.output[0])
                and not (heads and is_head(n.output[0], view))
            ):
                for i in ins:
                    q.setdefault(i, QTensor(i))
                add_output(n.output[0])
        elif n.op_type in PASS_THROUGH_OPS and n.input and n.input[0] in q:
            t = n.output[0]
            if want(t) and t not in q:
                q[t] = QTensor(t, same_as=_root(n.input[0], q))
    return q


def _root(t: str, q: dict[str, QTensor]) -> str:
    while q[t].same_as is not None:
        t = q[t].same_as  # type: ignore[assignment]
    return t
