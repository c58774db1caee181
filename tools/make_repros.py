"""Tiny ONNX reproducers (pure onnx.helper + numpy) for failure modes seen on third-party models.

Each file is a 3x3 Conv-BN-ReLU stem (BN statistics measured on a seeded N(0, 1) batch, so
the BN is realistic) plus the one feature under test:

==========================  ===================================================================
file                        feature
==========================  ===================================================================
concat_shape_dyn.onnx       reshape(b, c, h*w) with a symbolic batch: Shape -> Gather ->
                            Unsqueeze -> int64 Concat -> Reshape (as torch exports it)
reshape_1m1c_static.onnx    static batch, Transpose + Reshape to the constant [1, -1, C]
layernorm.onnx              LayerNormalization over channels between two convs (ConvNeXt)
minus1_batch.onnx           input/output batch dims written as dim_value -1 (Paddle exports)
no_output_shape.onnx        output ValueInfo with no shape (Paddle exports)
opset7_ir3.onnx             opset 7, IR 3, initializers also listed as graph inputs
fp16.onnx                   float16 weights, input and output
int8_qdq.onnx               an already-quantized (QuantizeLinear/DequantizeLinear) model
auto_pad_same.onnx          Conv with auto_pad=SAME_UPPER (TF/Keras exports) and no pads
sigmoid_head.onnx           YOLO-like head: class logits through Sigmoid, boxes linear, concat
out_dim_param.onnx          output declared [batch, 10] with its own dim_param names ("out_b")
==========================  ===================================================================

Usage::

    python tools/make_repros.py --out /work/corpus/repro
    python tools/corpus.py run --models /work/corpus/repro --out /work/corpus/repro-results \
        --onnxlw /work/corpus/venv-lw/bin/onnxlw
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _stem(rng: np.random.Generator, cin: int = 3, cout: int = 8, res: int = 16,
          auto_pad: bool = False) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Conv(3x3) -> BN (measured stats) -> Relu; output tensor ``r``."""
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
    x = rng.standard_normal((8, cin, res, res)).astype(np.float32)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([pad[:, :, i:i + res, j:j + res] for i in range(3) for j in range(3)], 2)
    y = np.einsum("nckhw,ock->nohw", cols, w.reshape(cout, cin, 9))
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3))
    gamma = rng.uniform(0.5, 1.5, cout)
    beta = rng.normal(0, 0.1, cout)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("w", w), ("g", gamma), ("b", beta), ("m", mean), ("v", var))]
    conv_kw = {"auto_pad": "SAME_UPPER"} if auto_pad else {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], **conv_kw),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"])]
    return nodes, inits


def _const(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _fc(rng: np.random.Generator, x: str, cin: int, cout: int, out: str
        ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    w = (rng.standard_normal((cout, cin)) * np.sqrt(2 / cin)).astype(np.float32)
    return ([helper.make_node("Gemm", [x, "fc_w", "fc_b"], [out], transB=1)],
            [_const("fc_w", w), _const("fc_b", np.zeros(cout, np.float32))])


def _gap_fc(rng: np.random.Generator, out: str = "y") -> tuple[list, list]:
    n = [helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"], axis=1)]
    fn, fi = _fc(rng, "f", 8, 10, out)
    return n + fn, fi


def _model(nodes: list, inits: list, inp: list, out: list, opset: int = 13,
           ir: int = 8, name: str = "repro", dtype: int = F) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", dtype, inp)],
                          [helper.make_tensor_value_info("y", dtype, out)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="onnxlw-tools/make_repros")
    m.ir_version = ir
    return m


def concat_shape_dyn(rng: np.random.Generator) -> onnx.ModelProto:
    n, i = _stem(rng)
    n += [helper.make_node("Shape", ["r"], ["s"]),
          helper.make_node("Slice", ["s", "s0", "s2", "ax0"], ["bc"]),
          helper.make_node("Concat", ["bc", "m1"], ["shp"], axis=0),
          helper.make_node("Reshape", ["r", "shp"], ["rs"]),
          helper.make_node("ReduceMean", ["rs"], ["f"], axes=[2], keepdims=0)]
    i += [_const("s0", np.array([0], np.int64)), _const("s2", np.array([2], np.int64)),
          _const("ax0", np.array([0], np.int64)), _const("m1", np.array([-1], np.int64))]
    fn, fi = _fc(rng, "f", 8, 10, "y")
    return _model(n + fn, i + fi, ["batch", 3, 16, 16], ["batch", 10])


def reshape_1m1c_static(rng: np.random.Generator) -> onnx.ModelProto:
    n, i = _stem(rng)
    n += [helper.make_node("Conv", ["r", "w2", "b2"], ["h"], kernel_shape=[1, 1]),
          helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]),
          helper.make_node("Reshape", ["t", "shp"], ["y"])]
    i += [_const("w2", (rng.standard_normal((6, 8, 1, 1)) * 0.5).astype(np.float32)),
          _const("b2", np.zeros(6, np.float32)), _const("shp", np.array([1, -1, 6], np.int64))]
    return _model(n, i, [1, 3, 16, 16], [1, 256, 6])


def layernorm(rng: np.random.Generator) -> onnx.ModelProto:
    n, i = _stem(rng)
    n += [helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
          helper.make_node("LayerNormalization", ["t", "lg", "lb"], ["ln"], axis=-1,
                           epsilon=1e-6),
          helper.make_node("Transpose", ["ln"], ["t2"], perm=[0, 3, 1, 2]),
          helper.make_node("Conv", ["t2", "w2"], ["c2"], kernel_shape=[1, 1]),
          helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
          helper.make_node("Flatten", ["p"], ["y"], axis=1)]
    i += [_const("lg", np.ones(8, np.float32)), _const("lb", np.zeros(8, np.float32)),
          _const("w2", (rng.standard_normal((10, 8, 1, 1)) * 0.5).astype(np.float32))]
    return _model(n, i, ["batch", 3, 16, 16], ["batch", 10], opset=17)


def plain(rng: np.random.Generator, **kw: object) -> onnx.ModelProto:
    n, i = _stem(rng, auto_pad=bool(kw.pop("auto_pad", False)))
    fn, fi = _gap_fc(rng)
    return _model(n + fn, i + fi, kw.pop("inp", ["batch", 3, 16, 16]),
                  kw.pop("out", ["batch", 10]), **kw)  # type: ignore[arg-type]


def minus1_batch(rng: np.random.Generator) -> onnx.ModelProto:
    return plain(rng, inp=[-1, 3, 16, 16], out=[-1, 10], opset=11)


def no_output_shape(rng: np.random.Generator) -> onnx.ModelProto:
    m = plain(rng)
    m.graph.output[0].type.tensor_type.ClearField("shape")
    return m


def opset7_ir3(rng: np.random.Generator) -> onnx.ModelProto:
    n, i = _stem(rng)
    n += [helper.make_node("GlobalAveragePool", ["r"], ["p"]),
          helper.make_node("Flatten", ["p"], ["f"], axis=1),
          helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    i += [_const("fc_w", (rng.standard_normal((10, 8)) * 0.5).astype(np.float32)),
          _const("fc_b", np.zeros(10, np.float32))]
    m = _model(n, i, [1, 3, 16, 16], [1, 10], opset=7, ir=3)
    for t in m.graph.initializer:  # IR 3: every initializer is also a graph input
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return m


def fp16(rng: np.random.Generator) -> onnx.ModelProto:
    m = plain(rng)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


def int8_qdq(rng: np.random.Generator) -> onnx.ModelProto:
    """The plain model with every weight stored as int8 + DequantizeLinear, input Q/DQ'd."""
    m = plain(rng)
    g = m.graph
    new_inits, new_nodes = [], []
    for t in list(g.initializer):
        a = numpy_helper.to_array(t)
        if t.name in ("w", "fc_w"):
            s = float(np.abs(a).max() / 127)
            q = np.clip(np.round(a / s), -127, 127).astype(np.int8)
            new_inits += [_const(f"{t.name}_q", q), _const(f"{t.name}_s", np.float32(s)),
                          _const(f"{t.name}_z", np.int8(0))]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{t.name}_q",
                                              f"{t.name}_s", f"{t.name}_z"], [t.name]))
        else:
            new_inits.append(t)
    new_inits += [_const("x_s", np.float32(0.03)), _const("x_z", np.uint8(128))]
    q_nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
               helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"])]
    for nd in g.node:
        nd.input[:] = ["xd" if v == "x" else v for v in nd.input]
    nodes = q_nodes + new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    return m


def auto_pad_same(rng: np.random.Generator) -> onnx.ModelProto:
    return plain(rng, auto_pad=True)


def sigmoid_head(rng: np.random.Generator) -> onnx.ModelProto:
    n, i = _stem(rng)
    n += [helper.make_node("Conv", ["r", "w2", "b2"], ["h"], kernel_shape=[1, 1]),
          helper.make_node("Split", ["h", "split"], ["box", "cls"], axis=1),
          helper.make_node("Sigmoid", ["cls"], ["cls_s"]),
          helper.make_node("Concat", ["box", "cls_s"], ["y4"], axis=1),
          helper.make_node("Reshape", ["y4", "shp"], ["y"])]
    w2 = (rng.standard_normal((24, 8, 1, 1)) * 0.3).astype(np.float32)
    b2 = np.concatenate([np.zeros(4), np.full(20, -4.6)]).astype(np.float32)  # prior 0.01
    i += [_const("w2", w2), _const("b2", b2), _const("split", np.array([4, 20], np.int64)),
          _const("shp", np.array([1, 24, -1], np.int64))]
    return _model(n, i, [1, 3, 16, 16], [1, 24, 256])


def out_dim_param(rng: np.random.Generator) -> onnx.ModelProto:
    return plain(rng, inp=["batch", 3, 16, 16], out=["out_b", 10])


REPROS = {f.__name__: f for f in (concat_shape_dyn, reshape_1m1c_static, layernorm,
                                   minus1_batch, no_output_shape, opset7_ir3, fp16, int8_qdq,
                                   auto_pad_same, sigmoid_head, out_dim_param)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/work/corpus/repro", help="folder for the .onnx files")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and BN statistics")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, f in REPROS.items():
        m = f(np.random.default_rng(a.seed))
        path = out / f"{name}.onnx"
        onnx.save(m, str(path))
        status = []
        try:
            onnx.checker.check_model(m)
            status.append("checker ok")
        except Exception as e:  # noqa: BLE001
            status.append(f"checker: {str(e).splitlines()[0][:80]}")
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            status.append("ort loads")
        except Exception as e:  # noqa: BLE001
            status.append(f"ort: {str(e).splitlines()[0][:80]}")
        print(f"{path}: {'; '.join(status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
