"""Cross-layer equalization and high-bias absorption that keep ReLU6.

A *pair* is a conv P whose output channels reach exactly one conv C, directly or through one
Relu or Clip(0, hi): P -> [act] -> C. The pass needs the BN statistics of P's output (channel i
is modelled as N(mu_i, sigma_i^2), the BN's own moments); without them no pair fires.

**Equalization.** For s (C,) > 0, dividing P's output channel i (weight row and bias) by s_i
and multiplying C's input channel i by s_i keeps the function: Relu is positively homogeneous,
and a Clip(0, hi) becomes a per-channel clip at hi / s_i, written as ``Relu -> Min(c)`` with
``c`` of shape (C, 1, 1), so the FP32 model computes what it did (tested to float rounding).
The quantized graph needs no Min: the activation Q clips at the top of its range, which is kept
at or below min(c), and the Q/DQ emitter absorbs Relu and Min into it as it absorbs a ReLU6, so
every conv still fuses into QLinearConv.

DFQ (Nagel et al., arXiv 1906.04721) equalizes the two weight ranges and replaces ReLU6 by
ReLU; the issue measured that replacement at −28.7 pt on EfficientNet-Lite0 in FP32. Here the
scales serve the grids onnxruntime actually uses:

- C depthwise: C's weights are quantized per channel, so moving scale into them is free, and
  s_i = top_i / max(top) makes every channel's range equal for the per-tensor activation grid
  (top_i = min(hi, max(mu_i + K_SIGMA sigma_i, 0)), the channel's range top after the act).
- C dense (group 1): C's input columns share one scale per output row, so s_i balances the
  activation range against C's column range as SmoothQuant does (Xiao et al., arXiv 2211.10438):
  s_i = (top_i / max top)^ALPHA / (w_i / max w)^(1 - ALPHA), w_i = max |C[:, i]|.

Channels that saturate a ReLU6 all take the largest scale, so they reach the clip together, and
no channel's clip may fall below another channel's scaled range (``keep_clips_above_range``):
the Q clips the whole tensor at min(c), so nothing is clipped harder than the range model says.

**Residual streams.** Tensors joined by Adds (MobileNetV2's bottleneck outputs and their sums)
share one per-tensor grid and carry no activation, so one s per stream applies to all of them:
every conv writing into the stream divides its rows by s, every conv reading it multiplies its
columns (rows, if depthwise) by s. A stream fires only when every writer is a conv with BN
statistics and every reader a conv or one of its Adds (a ResNet's post-Add Relu or a padded
shortcut stops it, with the reason). Measured on MobileNetV2 (seed 0): W8A6 83.3 -> 86.0 %
agreement, W6A6 82.6 -> 83.8 % over the conv pairs alone; EfficientNet-Lite0 unchanged.

**High-bias absorption** (DFQ section 4.1). A channel with mu_i - ABSORB_SIGMA sigma_i = b_i > 0
is (under the Gaussian model) never below b_i, so Relu(x) = Relu(x - b_i) + b_i: b_i leaves P's
bias and enters C's bias through C's weights. This is exact only where the channel stays above
b_i (a Gaussian tail of 0.13 %) and where C adds the constant everywhere, so it fires only for
unpadded C (a padded C would see b_i inside the image and 0 on the border). It narrows the
channel's range from [b_i, top_i] to [0, top_i - b_i].

**Caveat (measured).** The scales trust the BN statistics' per-channel ranges. They hold on
MobileNetV2 (real 99.99th percentile within 0.8-2x of mean + 5 std for most channels, at most
12x) but not on EfficientNet-Lite0's depthwise outputs, where channels reach 3-45x the
predicted top and some that BN calls dead fire on real images; amplified, those channels are
clipped by the shared grid, which is why no clip may cut another channel's range. Measured
(seed 0, conv pairs only): W4A8 MobileNetV2 −8.9 -> −7.1 pt, EfficientNet-Lite0 −8.5 -> −6.8,
ResNet-56 −1.0 -> −0.6; but W8A8 EfficientNet-Lite0 99.0 -> 97.4 % agreement, so
``Config.equalize`` turns it on only below 8-bit weights.

Hand-written: no maintained library equalizes ONNX convs through ReLU6 exactly (AIMET and NNCF
work on their own framework graphs; onnxruntime's quantizer has no equalization). The wiring
change (the Min node) is done on the onnx-graphsurgeon IR.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import GraphView, attrs, is_depthwise, relu_upper
from .base import Note
from .bn_fold import BNStats

K_SIGMA = 5.0
"""A channel's range top: mean + K_SIGMA std of its BN output, before the activation's clip.
MobileNetV2 W8A6 measured 83.1 % agreement with 3 and 83.9 % with 5 (the baseline 83.3 %)."""
ALPHA = 0.5
"""Activation vs weight balance for a dense consumer (SmoothQuant's migration strength).
MobileNetV2 W4A8: −9.7 pt with 0 (weights untouched), −7.7 with 0.5, −9.9 with activations
alone at full strength; EfficientNet-Lite0 W8A8 (dense pairs only): 0 collapses to 0.1 %
agreement, 1 gives 91.5 %, 0.5 89.0 % (the baseline 99.0 %): see ``equalize``'s caveat."""
ABSORB_SIGMA = 3.0
"""High-bias absorption moves mean - ABSORB_SIGMA std of a channel (DFQ's choice)."""
FLOOR = 1.0 / 64
"""Smallest range ratio used. A channel whose predicted range is below FLOOR of the largest
(dead by its BN statistics) keeps its scale: on EfficientNet-Lite0 such channels reach 6 on
real images."""


@dataclass(frozen=True)
class Pair:
    """Producer conv P -> [Relu / Clip(0, hi)] -> consumer conv C on P's output ``tensor``."""

    producer: str
    act: str | None
    consumer: str
    tensor: str
    hi: float
    depthwise: bool
    padded: bool


def find_pairs(model: onnx.ModelProto, stats: dict) -> tuple[list[Pair], list[Note]]:
    """Pairs whose inner channels can be rescaled, and a note for each conv that cannot."""
    view = GraphView(model)
    pairs: list[Pair] = []
    notes: list[Note] = []

    def no(n: onnx.NodeProto, why: str) -> None:
        notes.append(Note("equalize", "pair", n.name, False, why))

    for n in view.nodes:
        if n.op_type != "Conv" or not view.is_const(n.input[1]):
            continue
        t = n.output[0]
        if t not in stats:
            no(n, "no BN statistics for its output")
            continue
        c_out = int(view.const(n.input[1]).shape[0])
        nxt = view.single_consumer(t)
        act, hi = None, float("inf")
        if nxt is not None and nxt.op_type in ("Relu", "Clip"):
            bound = relu_upper(nxt, view)
            if bound is None or bound <= 0:
                no(n, f"its {nxt.op_type} is not Relu or Clip(0, hi)")
                continue
            act, hi = nxt, bound
            nxt = view.single_consumer(nxt.output[0])
        if nxt is None:
            no(n, "its output has several readers (a residual or a branch) or is a graph output")
            continue
        if nxt.op_type != "Conv" or not view.is_const(nxt.input[1]):
            no(n, f"its output reaches a {nxt.op_type}, not a conv with constant weights")
            continue
        w2 = view.const(nxt.input[1])
        a2 = attrs(nxt)
        dw = is_depthwise(nxt, view, c_out)
        if not dw and (int(a2.get("group", 1)) != 1 or w2.shape[1] != c_out):
            no(n, "its consumer is a grouped conv")
            continue
        if len(nxt.input) > 2 and nxt.input[2] and not view.is_const(nxt.input[2]):
            no(n, "its consumer's bias is not constant")
            continue
        shared = [x for x in (n.input[1], nxt.input[1], *n.input[2:3], *nxt.input[2:3])
                  if x and len(view.consumers.get(x, [])) > 1]
        if shared:
            no(n, f"{shared[0]!r} is shared with another node")
            continue
        padded = any(int(p) for p in a2.get("pads", [])) or a2.get("auto_pad", b"NOTSET") not in (
            b"NOTSET", b"VALID", "NOTSET", "VALID")
        pairs.append(Pair(n.name, act.name if act is not None else None, nxt.name, t, hi, dw,
                          bool(padded)))
    return pairs, notes


def absorbed_bias(mu: np.ndarray, sigma: np.ndarray, pair: Pair) -> np.ndarray:
    """b (C,) >= 0 that high-bias absorption moves from P to C (zeros where it cannot).

    Channels that reach the activation's upper clip (mean + K_SIGMA std >= hi) keep their
    bias: for them the clip, not the bias, sets the range (a ReLU6 channel stuck at 6 would
    otherwise be left with a clip at 0)."""
    if pair.act is None or pair.padded:
        return np.zeros_like(mu)
    return np.where(mu + K_SIGMA * sigma < pair.hi, np.maximum(mu - ABSORB_SIGMA * sigma, 0.0),
                    0.0)


def keep_clips_above_range(
    s: np.ndarray, top: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """``s`` (C,) lowered where a channel's clip hi_i / s_i would fall below the largest
    scaled range top max_j top_j / s_j: the Q clips the whole tensor at min_i hi_i / s_i, so
    no channel's clip may cut another channel's range (all arrays (C,); ``hi`` may be inf)."""
    r = float(np.max(top / s))
    if r <= 0:
        return s
    return np.minimum(s, np.where(np.isfinite(hi), hi / r, np.inf))


def channel_scales(
    mu: np.ndarray, sigma: np.ndarray, hi: np.ndarray, w_col: np.ndarray | None
) -> np.ndarray:
    """s (C,) in (0, 1] for channels N(mu, sigma^2) clipped to [0, hi] (all shape (C,);
    ``hi`` may be inf). ``w_col`` (C,): the consumer's column ranges (None: depthwise)."""
    top = np.minimum(hi, np.maximum(mu + K_SIGMA * sigma, 0.0))
    ref = float(top.max())
    if ref <= 0:
        return np.ones_like(mu)
    s = np.maximum(top / ref, FLOOR)
    if w_col is not None:
        s = _balance(s, w_col)
    sat = np.isfinite(hi) & (top >= hi)
    dead = top < FLOOR * ref
    s[sat | dead] = s.max()  # saturating channels reach the clip together; dead ones stay
    return s / s.max()


def equalize(
    model: onnx.ModelProto, stats: dict, *, scale: bool = True, absorb: bool = True
) -> tuple[onnx.ModelProto, dict, list[Note]]:
    """(new model, new BN statistics, notes); ``model`` and ``stats`` are not modified.

    ``scale``: cross-layer equalization; ``absorb``: high-bias absorption.
    """
    pairs, notes = find_pairs(model, stats)
    streams: list[Stream] = []
    if scale:
        streams, more = find_streams(model, stats)
        in_stream = {p for st_ in streams for p in st_.producers}
        notes = [n for n in notes if n.where not in in_stream] + more  # rescaled as a stream
    if not (pairs or streams) or not (scale or absorb):
        return model, stats, notes
    graph = gs.import_onnx(model)
    nodes = {n.name: n for n in graph.nodes}
    new_stats = dict(stats)
    for p in pairs:
        st = stats[p.tensor]
        mu, sigma = st.out_mean, st.out_std
        prod, cons = nodes[p.producer], nodes[p.consumer]
        w1 = np.asarray(prod.inputs[1].values, np.float64)
        w2 = np.asarray(cons.inputs[1].values, np.float64)
        c = len(mu)
        b1 = (np.asarray(prod.inputs[2].values, np.float64) if len(prod.inputs) > 2
              else np.zeros(c))
        b2 = (np.asarray(cons.inputs[2].values, np.float64) if len(cons.inputs) > 2
              else np.zeros(w2.shape[0]))
        shift = absorbed_bias(mu, sigma, p) if absorb else np.zeros(c)
        hi = np.full(c, p.hi) - shift
        if scale:
            w_col = None if p.depthwise else _col_range(w2)
            s = channel_scales(mu - shift, sigma, hi, w_col)
        else:
            s = np.ones(c)
        top = np.minimum(hi, np.maximum(mu - shift + K_SIGMA * sigma, 0.0))
        s = keep_clips_above_range(s, top, hi)
        if shift.any():  # C sees x - shift: its bias takes C(shift) (unpadded, so exact)
            per = w2.reshape(w2.shape[0], -1, int(np.prod(w2.shape[2:]))).sum(axis=2)
            b2 = b2 + (per[:, 0] * shift if p.depthwise else per @ shift)
        bshape = (-1,) + (1,) * (w1.ndim - 1)
        _set(prod, 1, w1 / s.reshape(bshape))
        _set(prod, 2, (b1 - shift) / s)
        _set(cons, 1, w2 * (s.reshape(bshape) if p.depthwise
                            else s.reshape((1, -1) + (1,) * (w2.ndim - 2))))
        if shift.any() or len(cons.inputs) > 2:
            _set(cons, 2, b2)
        new_stats[p.tensor] = _shifted(st, shift).scaled(1.0 / s)
        if p.act is not None and np.isfinite(p.hi):
            _per_channel_clip(graph, nodes[p.act], hi / s, w1.ndim - 2)
        what = []
        if scale:
            what.append(f"scales {float(s.min()):.3g}..1")
        if shift.any():
            what.append(f"{int((shift > 0).sum())} channel biases absorbed")
        notes.append(Note("equalize", "pair", p.producer, True,
                          f"{', '.join(what) or 'nothing to move'} into {p.consumer}"))
    for st_ in streams:
        s = stream_scales(st_, new_stats, nodes)
        for p in st_.producers:
            n = nodes[p]
            w1 = np.asarray(n.inputs[1].values, np.float64)
            _set(n, 1, w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1)))
            if len(n.inputs) > 2:
                _set(n, 2, np.asarray(n.inputs[2].values, np.float64) / s)
            t = n.outputs[0].name
            new_stats[t] = new_stats[t].scaled(1.0 / s)
        for cname in st_.consumers:
            n = nodes[cname]
            w2 = np.asarray(n.inputs[1].values, np.float64)
            shape = ((-1,) + (1,) * (w2.ndim - 1) if cname in st_.depthwise
                     else (1, -1) + (1,) * (w2.ndim - 2))
            _set(n, 1, w2 * s.reshape(shape))
        notes.append(Note("equalize", "stream", st_.tensors[0], True,
                          f"scales {float(s.min()):.3g}..1 on {len(st_.tensors)} tensors, "
                          f"{len(st_.producers)} producers, {len(st_.consumers)} consumers"))
    out = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.CopyFrom(out.graph)
    m.graph.name = model.graph.name
    m.graph.doc_string = model.graph.doc_string
    return m, new_stats, notes


def _shifted(st: BNStats, shift: np.ndarray) -> BNStats:
    """Statistics of the BN output minus ``shift`` (C,): the mean moves, the std stays."""
    return dataclasses.replace(st, bias=st.bias - shift)


def _per_channel_clip(graph: gs.Graph, act: gs.Node, hi: np.ndarray, spatial: int) -> None:
    """The act becomes Relu(x) then Min(., hi), hi (C,) broadcast over ``spatial`` dims: exact
    for channel-scaled x."""
    src, dst = act.inputs[0], act.outputs[0]
    mid = gs.Variable(dst.name + "_relu", dtype=dst.dtype, shape=dst.shape)
    act.op = "Relu"
    act.inputs = [src]
    act.outputs = [mid]
    top = np.ascontiguousarray(hi.reshape((-1,) + (1,) * spatial), np.float32)
    graph.nodes.append(gs.Node(
        "Min", act.name + "_channel_clip",
        inputs=[mid, gs.Constant(act.name + "_channel_hi", top)], outputs=[dst],
    ))


def _set(n: gs.Node, i: int, value: np.ndarray) -> None:
    """Input ``i`` of ``n`` becomes a new constant (appended when ``n`` has no input ``i``)."""
    name = (n.inputs[i].name if i < len(n.inputs) else f"{n.name}_bias") + "_eq"
    const = gs.Constant(name, np.ascontiguousarray(value, np.float32))
    if i < len(n.inputs):
        n.inputs[i] = const
    else:
        n.inputs.append(const)


@dataclass(frozen=True)
class Stream:
    """Tensors joined by Adds (a residual stream): every channel scale applies to all of them.

    ``producers``: convs writing a member (their output has BN statistics); ``consumers``:
    convs reading one (``depthwise`` tells which of them scale rows instead of columns)."""

    tensors: tuple[str, ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    depthwise: tuple[str, ...]


def find_streams(model: onnx.ModelProto, stats: dict) -> tuple[list[Stream], list[Note]]:
    """Residual streams whose channels can be rescaled as one, and why the others cannot."""
    view = GraphView(model)
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for n in view.nodes:
        if n.op_type == "Add" and len(n.input) == 2 and not any(
            view.is_const(i) for i in n.input
        ):
            for t in (n.input[0], n.input[1], n.output[0]):
                parent.setdefault(t, t)
            r = root(n.output[0])
            for t in n.input:
                parent[root(t)] = r
    groups: dict[str, list[str]] = {}
    for t in parent:
        groups.setdefault(root(t), []).append(t)
    streams: list[Stream] = []
    notes: list[Note] = []
    by_name = {n.name: n for n in view.nodes}
    for members in groups.values():
        why, prods, cons, dws = "", [], [], []
        adds = {view.producer[t].name for t in members
                if t in view.producer and view.producer[t].op_type == "Add"}
        for t in members:
            p = view.producer.get(t)
            if t in view.graph_outputs or view.read_in_subgraph(t):
                why = "a stream tensor is a graph output or read inside a subgraph"
            elif p is None:
                why = "a stream tensor is a graph input"
            elif p.op_type != "Add":
                if p.op_type != "Conv" or not view.is_const(p.input[1]) or t not in stats:
                    why = f"a stream tensor comes from a {p.op_type} without BN statistics"
                elif int(attrs(p).get("group", 1)) != 1:
                    why = "a stream tensor comes from a grouped conv"
                else:
                    prods.append(p.name)
            for c in view.consumers.get(t, []):
                if c.name in adds or (c.op_type == "Add" and c.output[0] in parent
                                      and root(c.output[0]) == root(t)):
                    continue
                if c.op_type != "Conv" or c.input[0] != t or not view.is_const(c.input[1]):
                    why = why or f"a stream tensor is read by a {c.op_type}"
                    continue
                if int(attrs(c).get("group", 1)) == 1:
                    cons.append(c.name)
                elif is_depthwise(c, view, int(view.const(c.input[1]).shape[0])):
                    dws.append(c.name)
                else:
                    why = why or "a stream tensor is read by a grouped conv"
            if why:
                break
        shared = [x for n in (*prods, *cons, *dws) for x in by_name[n].input[1:3]
                  if x and len(view.consumers.get(x, [])) > 1]
        why = why or (f"{shared[0]!r} is shared with another node" if shared else "")
        where = sorted(members)[0]
        if why:
            notes.append(Note("equalize", "stream", where, False, why))
            continue
        streams.append(Stream(tuple(sorted(members)), tuple(prods), tuple(cons + dws),
                              tuple(dws)))
    return streams, notes


def stream_scales(stream: Stream, stats: dict, nodes: dict) -> np.ndarray:
    """s (C,) in (0, 1] for a stream: its channels' range (the widest producer's
    |mean| + K_SIGMA std) balanced against the dense consumers' column ranges (SmoothQuant's
    ALPHA); each consumer's columns are taken relative to its own largest."""
    r = np.max([np.abs(stats[nodes[p].outputs[0].name].out_mean)
                + K_SIGMA * stats[nodes[p].outputs[0].name].out_std for p in stream.producers],
               axis=0)
    s = np.maximum(r / max(float(r.max()), 1e-30), FLOOR)
    dense = [c for c in stream.consumers if c not in stream.depthwise]
    if dense:
        cols = [_col_range(np.asarray(nodes[c].inputs[1].values, np.float64)) for c in dense]
        s = _balance(s, np.max([c / max(float(c.max()), 1e-30) for c in cols], axis=0))
    return s / s.max()


def _col_range(w: np.ndarray) -> np.ndarray:
    """max |w| per input channel (C,) of a dense conv weight (O, C, ...)."""
    return np.abs(w).max(axis=(0, *range(2, w.ndim)))


def _balance(s: np.ndarray, w_col: np.ndarray) -> np.ndarray:
    """SmoothQuant's balance (strength ALPHA) of activation range ratios ``s`` (C,) against
    the consumer's column ranges ``w_col`` (C,), each relative to its largest and floored."""
    w = np.maximum(w_col / max(float(w_col.max()), 1e-30), FLOOR)
    return s**ALPHA / w ** (1.0 - ALPHA)
