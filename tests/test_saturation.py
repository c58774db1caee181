"""The x86 u8s8 saturation guard: the fused model must compute what its QDQ graph says.

onnxruntime's u8s8 GEMM on AVX2 without VNNI adds pairs of u8 x s8 products in int16 and
saturates. A conv whose weights are large and of one sign, fed large activations, triggers it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlw import Config, compress
from onnxlw.ortutil import session


def _saturating_model(kernel: int) -> onnx.ModelProto:
    """Relu -> Conv(kxk, 16 -> 8) with positive weights of similar size (worst case)."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, (8, 16, kernel, kernel)).astype(np.float32)
    b = np.zeros(8, np.float32)
    nodes = [
        helper.make_node("Relu", ["input"], ["r"]),
        helper.make_node("Conv", ["r", "w", "b"], ["c"], pads=[kernel // 2] * 4),
        helper.make_node("Relu", ["c"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "sat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _fused_vs_simulated(model: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """(max |fused - simulated|, output quantization step) of a QDQ model on ``x``."""
    sim = session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"input": x})
    fused = session(model).run(None, {"input": x})
    inits = {t.name: t for t in model.graph.initializer}
    out_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]  # the output's Q
    step = float(numpy_helper.to_array(inits[out_q.input[1]]))
    return float(np.abs(fused[0] - sim[0]).max()), step


@pytest.mark.parametrize("kernel", [1, 3])
def test_guarded_model_fuses_without_saturation(kernel: int) -> None:
    m = _saturating_model(kernel)
    q, rep = compress(m, Config(samples=8, input_range=(0.0, 4.0)))
    assert rep.validation is not None and rep.validation.qlinear_conv == 1
    x = np.random.default_rng(1).uniform(0, 4, (4, 16, 8, 8)).astype(np.float32)
    diff, step = _fused_vs_simulated(q, x)
    assert diff <= 1.01 * step, (diff, step)  # at most one output level of requantization


def test_guard_constrains_pairs_in_onnxruntime_packing_order() -> None:
    """Weight pairs (kh, kw, c order: onnxruntime's channels-last QLinearConv) stay in int16."""
    q, _ = compress(_saturating_model(3), Config(samples=8, input_range=(0.0, 4.0)))
    w = next(
        numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8
    ).astype(np.int64)  # (8, 16, 3, 3)
    packed = w.transpose(0, 2, 3, 1).reshape(8, -1, 2)  # (O, pairs, 2) in (kh, kw, c) order
    pos = np.clip(packed, 0, None).sum(-1)
    neg = np.clip(packed, None, 0).sum(-1)
    assert pos.max() <= 128 and neg.min() >= -128
    assert np.abs(w).max() > 64  # the guard did not simply halve every weight


def test_unguarded_model_is_what_the_guard_prevents() -> None:
    """Without the guard the same model's pairs exceed int16: a VNNI-less x86 CPU saturates."""
    q, _ = compress(
        _saturating_model(3), Config(samples=8, input_range=(0.0, 4.0), saturation_guard=False)
    )
    w = next(
        numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8
    ).astype(np.int64)
    packed = w.transpose(0, 2, 3, 1).reshape(8, -1, 2)
    assert np.clip(packed, 0, None).sum(-1).max() > 128
    if _x86_without_vnni():  # here the fused kernel really does saturate
        x = np.random.default_rng(1).uniform(0, 4, (4, 16, 8, 8)).astype(np.float32)
        diff, step = _fused_vs_simulated(q, x)
        assert diff > 2 * step, (diff, step)


def _x86_without_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
