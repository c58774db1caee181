"""Check once per process that the installed onnxruntime runs the low-bit formats onnxlw writes.

Below 8 bits the output relies on two onnxruntime behaviours (see :mod:`onnxlw.emit.packed`
and :func:`onnxlw.targets.ort_cpu.act_levels`): a constant subgraph that expands packed
weights to int8 is folded at session start so the Conv still fuses into QLinearConv, and a
uint8 Clip between QuantizeLinear and DequantizeLinear runs. Both were measured on
onnxruntime 1.32; an older or different build is probed with a one-conv model before any work
is done, and refused with the reason when it falls short.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxlwError


def qdq_conv(levels: np.ndarray, clip: int | None = None, opset: int = 13) -> onnx.ModelProto:
    """x -> Q (-> uint8 Clip to [0, clip]) -> DQ -> Conv(DQ(int8 ``levels``)) -> Q -> DQ: one
    QLinearConv once onnxruntime optimizes it. ``levels`` (O, C, 3, 3); input (1, C, 8, 8)."""
    o, c = levels.shape[:2]
    inits = [
        numpy_helper.from_array(levels.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(o, 0.02, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(o, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(8 if clip else 128, np.uint8), "z"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"])]
    xq = "xq"
    if clip is not None:
        inits += [numpy_helper.from_array(np.array(0, np.uint8), "lo"),
                  numpy_helper.from_array(np.array(clip, np.uint8), "hi")]
        nodes.append(helper.make_node("Clip", ["xq", "lo", "hi"], ["xc"]))
        xq = "xc"
    nodes += [
        helper.make_node("DequantizeLinear", [xq, "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"]),
    ]
    g = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, o, 8, 8])], inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _probe_model() -> onnx.ModelProto:
    """5-bit weights (a 4-bit and a 1-bit plane summed in int8) and a 4-bit activation clip."""
    levels = np.random.default_rng(0).integers(-16, 16, (64, 64, 3, 3))
    return qdq_conv(levels, clip=15, opset=14)


@functools.cache
def lowbit_support() -> str | None:
    """None when this onnxruntime runs packed low-bit weights fused and b-bit activation
    clips; otherwise why not."""
    from ..emit.packed import pack_lowbit
    from ..ortutil import fused_conv_counts, session

    model, packed = pack_lowbit(_probe_model())
    if not packed:
        return "the packing probe packed nothing (onnxlw bug)"
    x = np.random.default_rng(1).standard_normal((1, 64, 8, 8)).astype(np.float32)
    try:
        a = session(model).run(None, {"x": x})[0]
        b = session(_probe_model()).run(None, {"x": x})[0]
        fused = fused_conv_counts(model)
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the answer
        return f"it cannot run them ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not np.array_equal(a, b):
        return "it expands packed weights wrongly"
    if fused != (1, 0):
        return "it does not fuse a Conv whose weights are expanded at session start"
    return None


def require_lowbit() -> None:
    """Refuse (exit 2) when the installed onnxruntime cannot run the low-bit output."""
    why = lowbit_support()
    if why is not None:
        raise OnnxlwError(
            f"weights or activations below 8 bits need onnxruntime to run packed weights and "
            f"uint8 Clips, and onnxruntime {onnxruntime.__version__} fails: {why}",
            "install onnxruntime >= 1.32 (the version this was measured on) or use 8 bits",
        )
