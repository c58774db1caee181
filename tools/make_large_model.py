"""Build a large BN-kept CNN (ResNet-50, ~102 MB) in pure onnx.helper + numpy, no torch.

The graph is the standard torchvision topology: for ``resnet50`` a 7x7/2 stem conv, BN, ReLU,
3x3/2 max pool, bottleneck stages [3, 4, 6, 3] (stride on the 3x3 conv, projection shortcut
with its own BN), global average pool, Flatten and a 1000-way Gemm; ``vgg16_bn`` is the 13
conv+BN+ReLU layers with 5 max pools, adaptive 7x7 pool (an identity at 224 px) and the
25088-4096-4096-1000 classifier (~553 MB). Input ``input`` is [N, 3, 224, 224] with a symbolic
batch ``N``; output ``logits`` is [N, 1000].

Weights are seeded He-normal. Every BatchNormalization node is kept, with gamma ~ U(0.5, 1.5),
beta ~ N(0, 0.1) and running mean/var measured, not invented: a seeded batch of pink-noise
"normalized images" (1/f spectrum, N(0, 1) marginals) is propagated through the graph while it
is built, each Conv and pool run as a one-node onnxruntime session, and each BN's mean/var set
to the per-channel moments of the input that BN actually sees. The BN therefore normalizes its
input as on a trained network, which is what onnxlw's statistics-based synthesis assumes.

Writes ``OUT`` and a sidecar ``OUT`` with ``.json`` instead of ``.onnx`` holding the ImageNet
preprocessing (``{"preprocess": {"mean255": [...], "std255": [...]}}``), then checks the model
with ``onnx.checker`` (full check) and runs it in onnxruntime with batch 2.

Usage (needs numpy, onnx, onnxruntime; e.g. the onnxlw venv)::

    python tools/make_large_model.py --out /work/corpus/large/resnet50_bn_random.onnx
    python tools/make_large_model.py --arch vgg16_bn --out /work/corpus/large/vgg16_bn.onnx
    python tools/make_large_model.py --calib-batch 4 --calib-res 160   # faster calibration
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MEAN255 = [123.675, 116.28, 103.53]
STD255 = [58.395, 57.12, 57.375]
OPSET = 13


class Builder:
    """Appends nodes and initializers and, alongside, computes each tensor on a calibration
    batch so that BN statistics can be measured before the BN node is written."""

    def __init__(self, x: np.ndarray, seed: int, threads: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.val: dict[str, np.ndarray] = {"input": x}
        self.n = 0
        self.so = ort.SessionOptions()
        self.so.intra_op_num_threads = threads
        self.so.log_severity_level = 3

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}_{self.n}"

    def _init(self, name: str, a: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def _run1(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run one node in onnxruntime (initializers passed as inputs)."""
        ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in node.input]
        outs = [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)]
        g = helper.make_graph([node], "one", ins, outs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        s = ort.InferenceSession(m.SerializeToString(), self.so,
                                 providers=["CPUExecutionProvider"])
        return s.run(None, {k: feeds[k] for k in node.input})[0]

    def conv(self, x: str, cout: int, k: int, s: int = 1, p: int = 0) -> str:
        cin = self.val[x].shape[1]
        y = self._name("conv")
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        wn = self._init(f"{y}.weight", w)
        node = helper.make_node("Conv", [x, wn], [y], name=y, kernel_shape=[k, k],
                                strides=[s, s], pads=[p, p, p, p])
        self.nodes.append(node)
        feeds = {x: self.val[x], wn: w.astype(np.float32)}
        self.val[y] = self._run1(node, feeds)
        return y

    def bn(self, x: str, eps: float = 1e-5) -> str:
        v = self.val[x].astype(np.float64)
        c = v.shape[1]
        mean = v.mean(axis=(0, 2, 3))
        var = v.var(axis=(0, 2, 3))
        gamma = self.rng.uniform(0.5, 1.5, c)
        beta = self.rng.normal(0.0, 0.1, c)
        y = self._name("bn")
        names = [self._init(f"{y}.{n}", a) for n, a in
                 (("weight", gamma), ("bias", beta), ("running_mean", mean),
                  ("running_var", var))]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=y,
                                           epsilon=eps))
        sh = (1, c, 1, 1)
        out = (v - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * gamma.reshape(sh)
        self.val[y] = (out + beta.reshape(sh)).astype(np.float32)
        return y

    def relu(self, x: str) -> str:
        y = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y], name=y))
        self.val[y] = np.maximum(self.val[x], 0)
        return y

    def add(self, a: str, b: str) -> str:
        y = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y], name=y))
        self.val[y] = self.val[a] + self.val[b]
        return y

    def maxpool(self, x: str, k: int, s: int, p: int) -> str:
        y = self._name("maxpool")
        node = helper.make_node("MaxPool", [x], [y], name=y, kernel_shape=[k, k],
                                strides=[s, s], pads=[p, p, p, p])
        self.nodes.append(node)
        self.val[y] = self._run1(node, {x: self.val[x]})
        return y

    def gap_flatten(self, x: str) -> str:
        g = self._name("gap")
        f = self._name("flatten")
        self.nodes += [helper.make_node("GlobalAveragePool", [x], [g], name=g),
                       helper.make_node("Flatten", [g], [f], name=f, axis=1)]
        self.val[f] = self.val[x].mean(axis=(2, 3))
        return f

    def flatten(self, x: str) -> str:
        f = self._name("flatten")
        self.nodes.append(helper.make_node("Flatten", [x], [f], name=f, axis=1))
        self.val[f] = self.val[x].reshape(self.val[x].shape[0], -1)
        return f

    def gemm(self, x: str, cout: int, out: str | None = None) -> str:
        cin = self.val[x].shape[1]
        y = out or self._name("gemm")
        w = self.rng.standard_normal((cout, cin)) * np.sqrt(2.0 / cin)
        b = np.zeros(cout)
        wn, bn = self._init(f"{y}.weight", w), self._init(f"{y}.bias", b)
        self.nodes.append(helper.make_node("Gemm", [x, wn, bn], [y], name=y, transB=1))
        self.val[y] = self.val[x] @ w.T.astype(np.float32) + b.astype(np.float32)
        return y

    def cbr(self, x: str, cout: int, k: int, s: int = 1, p: int = 0, relu: bool = True) -> str:
        y = self.bn(self.conv(x, cout, k, s, p))
        return self.relu(y) if relu else y


def resnet50(b: Builder) -> str:
    x = b.cbr("input", 64, 7, 2, 3)
    x = b.maxpool(x, 3, 2, 1)
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            out = width * 4
            y = b.cbr(x, width, 1)
            y = b.cbr(y, width, 3, s, 1)
            y = b.cbr(y, out, 1, relu=False)
            sc = b.cbr(x, out, 1, s, relu=False) if (s != 1 or cin != out) else x
            x = b.relu(b.add(y, sc))
            cin = out
    return b.gemm(b.gap_flatten(x), 1000, out="logits")


def vgg16_bn(b: Builder) -> str:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M"]
    x = "input"
    for c in cfg:
        x = b.maxpool(x, 2, 2, 0) if c == "M" else b.cbr(x, int(c), 3, 1, 1)
    if b.val[x].shape[2:] != (7, 7):
        raise SystemExit("vgg16_bn needs --res 224 (adaptive 7x7 pool as identity)")
    x = b.flatten(x)
    x = b.relu(b.gemm(x, 4096))
    x = b.relu(b.gemm(x, 4096))
    return b.gemm(x, 1000, out="logits")


def pink_noise(rng: np.random.Generator, shape: tuple[int, int, int, int]) -> np.ndarray:
    """N(0, 1)-marginal images with a 1/f amplitude spectrum, like natural images (and like
    onnxlw's default synthetic input); white noise gives BN statistics no trained net has."""
    spec = np.fft.rfftn(rng.standard_normal(shape), axes=(2, 3))
    f = np.sqrt(np.fft.fftfreq(shape[2])[:, None] ** 2 + np.fft.rfftfreq(shape[3])[None] ** 2)
    f[0, 0] = f.flat[1]
    x = np.fft.irfftn(spec / f, s=shape[2:], axes=(2, 3))
    x = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    return x.astype(np.float32)


ARCHS = {"resnet50": resnet50, "vgg16_bn": vgg16_bn}


def build(arch: str, seed: int, calib_batch: int, calib_res: int, threads: int,
          res: int = 224) -> onnx.ModelProto:
    """Build the model; BN statistics measured on a ``calib_batch`` x ``calib_res`` batch."""
    rng = np.random.default_rng(seed + 1)
    if arch == "vgg16_bn":
        calib_res = res  # the classifier's input size depends on the resolution
    x = pink_noise(rng, (calib_batch, 3, calib_res, calib_res))
    b = Builder(x, seed, threads)
    out = ARCHS[arch](b)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, res, res])
    outp = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 1000])
    g = helper.make_graph(b.nodes, f"{arch}_bn_random", [inp], [outp], b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="onnxlw-tools/make_large_model")
    m.ir_version = 8
    helper.set_model_props(m, {"seed": str(seed), "bn_stats": f"measured, batch {calib_batch} "
                                                              f"at {calib_res}px, pink noise"})
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet50", help="topology")
    p.add_argument("--out", default="/work/corpus/large/resnet50_bn_random.onnx",
                   help="output .onnx (a sidecar .json is written next to it)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, BN affine, batch")
    p.add_argument("--calib-batch", type=int, default=8,
                   help="images in the batch whose moments become the BN statistics")
    p.add_argument("--calib-res", type=int, default=224,
                   help="resolution of that batch (resnet50 only; the model is 224)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    a = p.parse_args(argv)
    t = time.time()
    m = build(a.arch, a.seed, a.calib_batch, a.calib_res, a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    side = out.with_suffix(".json")
    side.write_text(json.dumps({"preprocess": {"mean255": MEAN255, "std255": STD255}},
                               indent=1) + "\n")
    onnx.checker.check_model(str(out), full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    s = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    y = s.run(None, {"input": np.random.default_rng(0).standard_normal(
        (2, 3, 224, 224)).astype(np.float32)})[0]
    nbn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    nconv = sum(n.op_type == "Conv" for n in m.graph.node)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {nconv} Conv, {nbn} BN kept) and "
          f"{side}; checker ok; onnxruntime output {list(y.shape)} finite={np.isfinite(y).all()} "
          f"std={y.std():.3g}; {time.time() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
