"""Tiny seeded ONNX models built in code for the tests (not a test module).

Every builder returns a fresh ``onnx.ModelProto`` (IR 8, opset 17 unless told) with input
``input`` of shape [batch, 3, H, W] (default 1x3x16x16) and one float output. Weights are
He-initialized from a seeded generator; BatchNormalization statistics are realistic
(running_var > 0, some negative scales) so folding and synthesis see real numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
Dim = int | str


class Builder:
    """Accumulates nodes and initializers with unique names and seeded weights."""

    def __init__(self, seed: int = 0, opset: int = 17, calibrate: bool = True) -> None:
        self.rng = np.random.default_rng(seed)
        self.calibrate = calibrate
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.domains: dict[str, int] = {}
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const_node(self, base: str, value: np.ndarray) -> str:
        """A Constant node (as PyTorch exports Clip bounds), returning its output name."""
        out = self.name(base)
        self.nodes.append(
            helper.make_node(
                "Constant",
                [],
                [out],
                name=self.name("Constant"),
                value=numpy_helper.from_array(np.asarray(value), out + "_value"),
            )
        )
        return out

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **kw) -> str:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op, inputs, outs, name=self.name(op), domain=domain, **kw)
        )
        return outs[0]

    # ------------------------------------------------------------------ weights

    def conv_weight(self, cout: int, cin_g: int, k: int) -> np.ndarray:
        fan_in = cin_g * k * k
        return (self.rng.standard_normal((cout, cin_g, k, k)) * np.sqrt(2.0 / fan_in)).astype(
            np.float32
        )

    def bn_params(self, c: int) -> tuple[np.ndarray, ...]:
        """(scale, bias, mean, var): var > 0, about a quarter of the scales negative."""
        scale = self.rng.uniform(0.4, 1.6, c) * np.where(self.rng.random(c) < 0.25, -1.0, 1.0)
        bias = self.rng.normal(0.1, 0.4, c)
        mean = self.rng.normal(0.0, 0.3, c)
        var = self.rng.uniform(0.3, 2.0, c)
        return tuple(a.astype(np.float32) for a in (scale, bias, mean, var))

    # ------------------------------------------------------------------ layers

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        stride: int = 1,
        pad: int | list[int] | None = None,
        group: int = 1,
        dilation: int = 1,
        bias: bool = True,
        weight: str | None = None,
    ) -> str:
        pads = pad if isinstance(pad, list) else [(k // 2) * dilation if pad is None else pad] * 4
        w = weight or self.init("conv_w", self.conv_weight(cout, cin // group, k))
        ins = [x, w]
        if bias:
            ins.append(self.init("conv_b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.node(
            "Conv",
            ins,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=pads,
            group=group,
            dilations=[dilation, dilation],
        )

    def bn(self, x: str, c: int) -> str:
        s, b, m, v = self.bn_params(c)
        names = [
            self.init(n, a)
            for n, a in zip(("bn_scale", "bn_B", "bn_mean", "bn_var"), (s, b, m, v), strict=True)
        ]
        return self.node("BatchNormalization", [x, *names], epsilon=1e-5)

    def conv_bn(self, x: str, cin: int, cout: int, k: int = 3, **kw) -> str:
        return self.bn(self.conv(x, cin, cout, k, **kw), cout)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        """Clip(0, 6) with Constant-node bounds, as PyTorch exports ReLU6."""
        lo = self.const_node("clip_min", np.array(0.0, np.float32))
        hi = self.const_node("clip_max", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi])

    def conv_bn_relu(self, x: str, cin: int, cout: int, k: int = 3, **kw) -> str:
        return self.relu(self.conv_bn(x, cin, cout, k, **kw))

    # ------------------------------------------------------------------ model

    def model(
        self,
        inputs: list[tuple[str, list[Dim]]],
        outputs: list[tuple[str, str, list[Dim] | None]],
    ) -> onnx.ModelProto:
        """``outputs``: (graph output name, internal tensor to rename, dims)."""
        for out, src, _ in outputs:
            for n in self.nodes:
                for k, o in enumerate(n.output):
                    if o == src:
                        n.output[k] = out
                for k, i in enumerate(n.input):
                    if i == src:
                        n.input[k] = out
        g = helper.make_graph(
            self.nodes,
            "tiny",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, _, d in outputs],
            self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in sorted(self.domains.items())]
        m = helper.make_model(
            g, opset_imports=opsets, ir_version=IR_VERSION, producer_name="onnxlw-tests"
        )
        onnx.checker.check_model(m)
        return calibrate_bn(m) if self.calibrate else m


def _in(batch: Dim, hw: tuple[Dim, Dim], c: int = 3) -> list[tuple[str, list[Dim]]]:
    return [("input", [batch, c, hw[0], hw[1]])]


def _out(src: str, batch: Dim, c: int, hw: tuple[Dim, Dim], name: str = "output"):
    return [(name, src, [batch, c, hw[0], hw[1]])]


# ---------------------------------------------------------------------------------- builders


def conv_bn_relu(
    *,
    batch: Dim = 1,
    hw: tuple[Dim, Dim] = (16, 16),
    opset: int = 17,
    seed: int = 0,
) -> onnx.ModelProto:
    """Conv+BN+Relu, then Conv+BN+Clip(0, 6) (ReLU6 with Constant-node bounds). 3 -> 8 -> 16."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8)
    y = b.relu6(b.conv_bn(y, 8, 16))
    return b.model(_in(batch, hw), _out(y, batch, 16, hw))


def bn_folded(**kw) -> onnx.ModelProto:
    """conv_bn_relu with every BN folded numerically (as an exporter's constant folding does)."""
    return fold_bn_numpy(conv_bn_relu(**kw))


def depthwise(*, batch: Dim = 1, seed: int = 1, opset: int = 17) -> onnx.ModelProto:
    """1x1 stem, depthwise 3x3 (group=C) + BN + ReLU6, 1x1 + BN + Relu (MobileNet block)."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8, 1)
    y = b.relu6(b.conv_bn(y, 8, 8, 3, group=8))
    y = b.conv_bn_relu(y, 8, 16, 1)
    return b.model(_in(batch, (16, 16)), _out(y, batch, 16, (16, 16)))


def residual(*, batch: Dim = 1, seed: int = 2, opset: int = 17) -> onnx.ModelProto:
    """Stem, then (conv-bn-relu-conv-bn) + (1x1 conv-bn projection), Add, Relu."""
    b = Builder(seed, opset)
    s = b.conv_bn_relu("input", 3, 8)
    a = b.conv_bn(b.conv_bn_relu(s, 8, 16, stride=2), 16, 16)
    p = b.conv_bn(s, 8, 16, 1, stride=2, pad=0)
    y = b.relu(b.node("Add", [a, p]))
    return b.model(_in(batch, (16, 16)), _out(y, batch, 16, (8, 8)))


def concat(*, batch: Dim = 1, seed: int = 3, opset: int = 17) -> onnx.ModelProto:
    """Stem, two branches (3x3 and 1x1 conv-bn-relu) concatenated on channels, 1x1 conv, Relu."""
    b = Builder(seed, opset)
    s = b.conv_bn_relu("input", 3, 8)
    y1 = b.conv_bn_relu(s, 8, 8, 3)
    y2 = b.conv_bn_relu(s, 8, 8, 1)
    c = b.node("Concat", [y1, y2], axis=1)
    y = b.relu(b.conv(c, 16, 8, 1))
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def se_block(*, batch: Dim = 1, seed: int = 4, opset: int = 17) -> onnx.ModelProto:
    """Trunk * Sigmoid(1x1(Relu(1x1(GAP(trunk))))), then conv-bn-relu."""
    b = Builder(seed, opset)
    t = b.conv_bn_relu("input", 3, 16)
    g = b.node("GlobalAveragePool", [t])
    g = b.relu(b.conv(g, 16, 4, 1))
    g = b.node("Sigmoid", [b.conv(g, 4, 16, 1)])
    y = b.node("Mul", [t, g])
    y = b.conv_bn_relu(y, 16, 8, 1)
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def gemm_head(*, batch: Dim = 1, seed: int = 5, opset: int = 17, classes: int = 10):
    """conv-bn-relu, GlobalAveragePool, Flatten, Gemm(transB=1) -> 'logits'."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 16)
    y = b.conv_bn_relu(y, 16, 16, stride=2)
    f = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    w = b.init("fc_w", (b.rng.standard_normal((classes, 16)) * 0.5).astype(np.float32))
    bias = b.init("fc_b", b.rng.normal(0, 0.1, classes).astype(np.float32))
    y = b.node("Gemm", [f, w, bias], transB=1)
    return b.model(_in(batch, (16, 16)), [("logits", y, [batch, classes])])


def gemm_transb0(
    *,
    batch: Dim = 1,
    seed: int = 6,
    opset: int = 17,
    alpha: float = 0.7,
    beta: float = 1.3,
    classes: int = 10,
    bias_2d: bool = False,
) -> onnx.ModelProto:
    """Like gemm_head, but Gemm(transB=0, alpha, beta) with B stored (in, out)."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 16)
    f = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    w = b.init("fc_w", (b.rng.standard_normal((16, classes)) * 0.5).astype(np.float32))
    c = b.rng.normal(0, 0.1, (1, classes) if bias_2d else classes).astype(np.float32)
    y = b.node("Gemm", [f, w, b.init("fc_b", c)], transB=0, alpha=alpha, beta=beta)
    return b.model(_in(batch, (16, 16)), [("logits", y, [batch, classes])])


def gemm_bn(
    *,
    batch: Dim = 1,
    seed: int = 7,
    opset: int = 17,
    trans_b: int = 1,
    alpha: float = 1.0,
    beta: float = 1.0,
    gemm_bias: bool = True,
) -> onnx.ModelProto:
    """conv-bn-relu, 4x4 AveragePool, Flatten (128), Gemm + BatchNorm1d + Relu, Gemm.

    Its BN statistics come from 256 pink-noise images (8 rows would make BatchNorm1d's own
    statistics a noisy estimate, unlike a trained network's)."""
    b = Builder(seed, opset, calibrate=False)
    y = b.conv_bn_relu("input", 3, 8)
    y = b.node("AveragePool", [y], kernel_shape=[4, 4], strides=[4, 4])
    f = b.node("Flatten", [y], axis=1)
    w = (b.rng.standard_normal((12, 128)) * 0.1).astype(np.float32)
    ins = [f, b.init("fc1_w", w if trans_b else w.T)]
    if gemm_bias:
        ins.append(b.init("fc1_b", b.rng.normal(0, 0.1, 12).astype(np.float32)))
    h = b.node("Gemm", ins, transB=trans_b, alpha=alpha, beta=beta)
    h = b.relu(b.bn(h, 12))
    w2 = b.init("fc2_w", (b.rng.standard_normal((5, 12)) * 0.4).astype(np.float32))
    y = b.node("Gemm", [h, w2, b.init("fc2_b", np.zeros(5, np.float32))], transB=1)
    return calibrate_bn(
        b.model(_in(batch, (16, 16)), [("logits", y, [batch, 5])]), batch=256, pink=True
    )


def convtranspose_bn(
    *, batch: Dim = 1, seed: int = 8, opset: int = 17, group: int = 1, bias: bool = True
) -> onnx.ModelProto:
    """Stride-2 stem, ConvTranspose(k2, s2) + BN + Relu, conv-bn-relu."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8, stride=2)
    w = (b.rng.standard_normal((8, 8 // group, 2, 2)) * 0.5).astype(np.float32)
    ins = [y, b.init("deconv_w", w)]
    if bias:
        ins.append(b.init("deconv_b", b.rng.normal(0, 0.1, 8).astype(np.float32)))
    y = b.node("ConvTranspose", ins, kernel_shape=[2, 2], strides=[2, 2], group=group)
    y = b.relu(b.bn(y, 8))
    y = b.conv_bn_relu(y, 8, 8)
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def pad_conv(
    *,
    batch: Dim = 1,
    seed: int = 9,
    opset: int = 17,
    pad_value: float = 0.0,
    mode: str = "constant",
    pads: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 1, 1),
    conv_pad: int = 0,
) -> onnx.ModelProto:
    """TF-style 'SAME' stride 2: Pad (spatial, bottom/right) then Conv(pads 0) + BN + Relu."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8)
    p = b.init("pads", np.array(pads, np.int64))
    ins = [y, p]
    if mode == "constant":
        ins.append(b.init("pad_value", np.array(pad_value, np.float32)))
    y = b.node("Pad", ins, mode=mode)
    y = b.conv_bn_relu(y, 8, 16, 3, stride=2, pad=conv_pad)
    y = b.conv_bn_relu(y, 16, 16, 3)
    r = len(pads) // 2
    oh, ow = ((16 + pads[k] + pads[k + r] + 2 * conv_pad - 3) // 2 + 1 for k in (2, 3))
    return b.model(_in(batch, (16, 16)), _out(y, batch, 16, (oh, ow)))


def const_subgraph(*, batch: Dim = 1, seed: int = 15, opset: int = 17) -> onnx.ModelProto:
    """Clip's max is Mul(Constant 3.0, Cast(Constant int64 2)): an all-constant subgraph."""
    b = Builder(seed, opset)
    y = b.conv_bn("input", 3, 8)
    three = b.const_node("three", np.array(3.0, np.float32))
    two = b.node("Cast", [b.const_node("two", np.array(2, np.int64))], to=TensorProto.FLOAT)
    hi = b.node("Mul", [three, two])
    lo = b.const_node("zero", np.array(0.0, np.float32))
    y = b.node("Clip", [y, lo, hi])
    y = b.conv_bn_relu(y, 8, 8)
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def identity_dropout(*, batch: Dim = 1, seed: int = 10, opset: int = 17) -> onnx.ModelProto:
    """Identity and Dropout (inference) in the path, and an Identity producing the output."""
    b = Builder(seed, opset)
    y = b.node("Identity", [b.conv_bn("input", 3, 8)])
    y = b.relu(y)
    y = b.node("Dropout", [y], n_out=2)  # mask output unused, training_mode absent
    y = b.conv_bn_relu(y, 8, 8)
    y = b.node("Identity", [y])
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def identity_chain(*, batch: Dim = 1, seed: int = 11, opset: int = 17) -> onnx.ModelProto:
    """Two Identity nodes in a row produce the graph output."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8)
    y = b.node("Identity", [b.node("Identity", [y])])
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def shared_weight(*, batch: Dim = 1, seed: int = 12, opset: int = 17) -> onnx.ModelProto:
    """Two Convs read one weight initializer; each has its own BN. Add, Relu."""
    b = Builder(seed, opset)
    s = b.conv_bn_relu("input", 3, 8)
    w = b.init("shared_w", b.conv_weight(8, 8, 3))
    y1 = b.relu(b.bn(b.conv(s, 8, 8, weight=w, bias=False), 8))
    y2 = b.relu(b.bn(b.conv(s, 8, 8, dilation=2, weight=w, bias=False), 8))
    y = b.relu(b.node("Add", [y1, y2]))
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def unsupported_op(*, batch: Dim = 1, seed: int = 13, opset: int = 17, op: str = "Random"):
    """conv-bn-relu, an op synthesis cannot run (a random op, or com.microsoft Gelu), or a
    standard op it runs (CumSum), then conv-bn-relu."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8)
    if op == "CumSum":
        y = b.node("CumSum", [y, b.init("axis", np.array(3, np.int64))])
    elif op == "Random":
        noise = b.node("RandomNormalLike", [y], scale=1e-3, seed=1.0)
        y = b.node("Add", [y, noise])
    elif op == "Gelu":
        b.domains["com.microsoft"] = 1
        y = b.node("Gelu", [y], domain="com.microsoft")
    else:
        raise ValueError(op)
    y = b.conv_bn_relu(y, 8, 8)
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def conv_output(*, batch: Dim = 1, seed: int = 14, opset: int = 17) -> onnx.ModelProto:
    """conv-bn-relu, then a plain Conv whose output is the graph output (a detection head)."""
    b = Builder(seed, opset)
    y = b.conv_bn_relu("input", 3, 8)
    y = b.conv(y, 8, 8, 1)
    return b.model(_in(batch, (16, 16)), _out(y, batch, 8, (16, 16)))


def relu_only(*, batch: Dim = 1) -> onnx.ModelProto:
    """No compressible layer at all."""
    b = Builder(0, 17)
    y = b.relu("input")
    return b.model(_in(batch, (16, 16)), _out(y, batch, 3, (16, 16)))


# ---------------------------------------------------------------------------------- helpers


def _run_tensor(model: onnx.ModelProto, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs and outputs have a symbolic batch dim (to run any batch size)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            d0.Clear()
            d0.dim_param = "dyn_batch"
    del m.graph.value_info[:]
    return m


def run_tensor(model: onnx.ModelProto, tensor: str, batch: int = 8, seed: int = 123):
    """Value of any tensor of ``model`` on calibrate_bn's data (as recorded in the model)."""
    run = dynamic_batch(model)
    return _run_tensor(run, tensor, _calibration_feeds(model, run, batch, seed))


def _calibration_feeds(
    model: onnx.ModelProto, run: onnx.ModelProto, batch: int, seed: int
) -> dict[str, np.ndarray]:
    meta = {p.key: p.value for p in model.metadata_props}
    if "calibration" in meta:  # "pink,<batch>,<seed>"
        kind, batch_s, seed_s = meta["calibration"].split(",")
        batch, seed = int(batch_s), int(seed_s)
        if kind == "pink":
            from onnxlw.config import InputDistribution
            from onnxlw.synth.inputs import synthetic_input

            rng = np.random.default_rng(seed)
            feeds = random_feeds(run, batch=batch, seed=seed)
            return {
                k: synthetic_input(v.shape, InputDistribution.PINK, rng) for k, v in feeds.items()
            }
    return random_feeds(run, batch=batch, seed=seed)


def calibrate_bn(
    model: onnx.ModelProto, seed: int = 123, batch: int = 8, pink: bool = False
) -> onnx.ModelProto:
    """Set every BN's running mean/var to the batch statistics of its input, in graph order.

    That is what a trained network's BN holds, so the BN's output is really distributed as
    N(B, scale^2) per channel on N(0, 1) inputs. Runs with a symbolic batch dim of ``batch``.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    run = dynamic_batch(model)
    if pink:  # natural-image-like inputs, as onnxlw's synthesis and validation draw
        m.metadata_props.add(key="calibration", value=f"pink,{batch},{seed}")
    feeds = _calibration_feeds(m, run, batch, seed)
    inits = {t.name: k for k, t in enumerate(m.graph.initializer)}
    for n in m.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        x = _run_tensor(run, n.input[0], feeds).astype(np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        for name, v in ((n.input[3], x.mean(axis=axes)), (n.input[4], x.var(axis=axes))):
            t = numpy_helper.from_array(v.astype(np.float32), name)
            m.graph.initializer[inits[name]].CopyFrom(t)
            run.graph.initializer[inits[name]].CopyFrom(t)
    return m


def fold_bn_numpy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every Conv -> BatchNormalization pair numerically (independent of onnxlw)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    arr = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    keep, new_inits = [], {}
    for n in g.node:
        if n.op_type == "BatchNormalization" and prod[n.input[0]].op_type == "Conv":
            conv = prod[n.input[0]]
            s, beta, mu, var = (arr[i] for i in n.input[1:5])
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            f = s / np.sqrt(var + eps)
            w = arr[conv.input[1]] * f[:, None, None, None]
            b = arr[conv.input[2]] if len(conv.input) > 2 else np.zeros(len(f))
            new_inits[conv.input[1]] = w
            bname = conv.input[1] + "_bias"
            new_inits[bname] = (b - mu) * f + beta
            del conv.input[2:]
            conv.input.append(bname)
            conv.output[0] = n.output[0]
            continue
        keep.append(n)
    used = {i for n in keep for i in n.input}
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in new_inits.items()]
    tensors += [t for t in g.initializer if t.name not in new_inits]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(t for t in tensors if t.name in used)
    onnx.checker.check_model(m)
    return m


def random_feeds(
    model: onnx.ModelProto, batch: int = 2, seed: int = 0, hw: tuple[int, int] = (16, 16)
) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) feeds for every graph input (symbolic dims: batch, then ``hw``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = []
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k == 0:
                dims.append(d.dim_value if d.HasField("dim_value") else batch)
            elif d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(hw[k - 2] if k >= 2 else 3)
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def set_weight(model: onnx.ModelProto, name_prefix: str, index: tuple, value: float):
    """A copy of ``model`` with one element of the first initializer named ``prefix*`` set."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for k, t in enumerate(m.graph.initializer):
        if t.name.startswith(name_prefix):
            a = numpy_helper.to_array(t).copy()
            a[index] = value
            m.graph.initializer[k].CopyFrom(numpy_helper.from_array(a, t.name))
            return m, t.name
    raise KeyError(name_prefix)
