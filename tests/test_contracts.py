"""The stage contracts and the bugs of issue 6: each test fails on the code before the fix."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import models as M
import onnxlw
from onnxlw import Config
from onnxlw.cli import main
from onnxlw.errors import InternalError, OnnxlwError
from onnxlw.ortutil import fused_conv_counts, session

REPO = Path(__file__).resolve().parent.parent
CFG = Config(samples=8)


def test_solve_never_imports_onnx() -> None:
    for path in (REPO / "onnxlw" / "solve").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                assert node.level <= 1, f"{path.name} imports from outside solve/"
            assert not any(n.split(".")[0] in ("onnx", "onnxruntime") for n in names), path


def test_plan_round_trip_gives_the_same_bytes(tmp_path: Path) -> None:
    m = M.residual(batch="N")
    out, rep = onnxlw.compress(m, CFG)
    rep.plan.save(tmp_path / "p.npz")
    again, rep2 = onnxlw.compress(m, CFG, plan=tmp_path / "p.npz")
    assert again.SerializeToString() == out.SerializeToString()
    assert rep2.stages.get("solve") is None and rep2.stages.get("synthesize") is None
    other = M.conv_bn_relu(batch="N")
    with pytest.raises(OnnxlwError, match="another model"):
        onnxlw.compress(other, CFG, plan=tmp_path / "p.npz")


def test_plan_solutions_are_method_agnostic() -> None:
    """Every solution carries the float weight it computes with and its stats."""
    _, rep = onnxlw.compress(M.residual(batch="N"), CFG)
    for sol in rep.plan.layers.values():
        enc = sol.encoding
        np.testing.assert_allclose(sol.weight, enc.q * enc.scale[..., None], rtol=1e-6)
        assert {"sqnr_db", "saturation_fixes", "bias_scale_fixes"} <= set(sol.stats)


@pytest.mark.parametrize(
    ("workers", "executor"), [(1, "threads"), (3, "threads"), (2, "processes")]
)
def test_output_independent_of_workers_and_executor(workers: int, executor: str) -> None:
    m = M.residual(batch="N")
    for base in (CFG, dataclasses.replace(CFG, prune="0.5", weight_bits=4),  # + refine, GPTQ
                 dataclasses.replace(CFG, additive=2, additive_min_params=256)):
        ref, _ = onnxlw.compress(m, base)
        got, _ = onnxlw.compress(m, dataclasses.replace(base, workers=workers, executor=executor))
        assert got.graph.SerializeToString() == ref.graph.SerializeToString()  # options differ


def _r1_model() -> onnx.ModelProto:
    """The review's R1: channel 3 has gamma 1e-7 and beta 0.5 (a slimmed channel)."""
    rng = np.random.default_rng(0)
    c = 8
    gamma = np.ones(c, np.float32)
    gamma[3] = 1e-7
    beta = np.full(c, 0.2, np.float32)
    beta[3] = 0.5
    inits = [
        nh.from_array(a, n)
        for a, n in [
            (rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
            (gamma, "s"),
            (beta, "b"),
            (np.zeros(c, np.float32), "m"),
            (np.full(c, 4.0, np.float32), "v"),
            (rng.standard_normal((4, c, 1, 1)).astype(np.float32) * 0.3, "w2"),
        ]
    ]
    nodes = [
        h.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4),
        h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        h.make_node("Relu", ["bn"], ["r"]),
        h.make_node("Conv", ["r", "w2"], ["out"]),
    ]
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("input", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("out", T.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_int32_bias_never_saturates() -> None:
    q, rep = onnxlw.compress(_r1_model(), CFG)
    b = [nh.to_array(t) for t in q.graph.initializer if t.data_type == T.INT32 and t.dims == [8]]
    assert b and np.abs(b[0]).max() < 2**31 - 1
    assert rep.layers[0].bias_scale_fixes >= 1
    assert rep.to_dict()["bias_scale_fixes"] >= 1
    assert rep.validation.sqnr_db > 25  # was 9.2 dB with the saturated bias


def test_readme_command_on_bundled_model_agrees_on_real_digits(tmp_path: Path, capsys) -> None:
    """The README's own CLI command; the sidecar's range bounds the synthetic inputs, so the
    bias correction no longer corrects for clipping real inputs never see."""
    out = tmp_path / "q.onnx"
    rc = main(["compress", str(REPO / "models/digits_cnn.onnx"), "-o", str(out),
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "declared by sidecar" in err
    data = np.load(REPO / "models/digits_test.npz")
    x = data["x"].astype(np.float32)
    ref = session(str(REPO / "models/digits_cnn.onnx")).run(None, {"input": x})[0]
    got = session(str(out)).run(None, {"input": x})[0]
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.997  # was 0.9944


def test_synthetic_inputs_stay_in_declared_range() -> None:
    from onnxlw.config import InputDistribution
    from onnxlw.synth.inputs import synthetic_input

    x = synthetic_input((16, 1, 16, 16), InputDistribution.PINK, np.random.default_rng(0),
                        (-0.96, 2.18))
    assert x.min() >= -0.96 and x.max() <= 2.18
    assert abs(float(x.mean())) < 0.05 and 0.8 < float(x.std()) < 1.2


def test_weight_bits_out_of_range_refused(tmp_path: Path, capsys) -> None:
    rc = main(["compress", str(REPO / "models/digits_cnn.onnx"), "-o", str(tmp_path / "q.onnx"),
               "--weight-bits", "1"])
    assert rc == 2 and not (tmp_path / "q.onnx").exists()
    assert "weight_bits=1 is out of range" in capsys.readouterr().err


def test_internal_error_has_its_own_exit_code(tmp_path: Path, capsys, monkeypatch) -> None:
    import onnxlw.pipeline as P

    def broken(canon, analysis, plan):  # noqa: ANN001, ANN202
        m = onnx.ModelProto()
        m.CopyFrom(canon.model)
        m.graph.node[0].input[0] = "nowhere"
        return m

    monkeypatch.setitem(P.EMITTERS, "qdq", broken)
    rc = main(["compress", str(REPO / "models/digits_cnn.onnx"), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err
    assert rc == InternalError.exit_code == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("onnxlw: error: internal error:") and "bug in onnxlw" in last
    assert "-v" in last
    assert not (tmp_path / "q.onnx").exists()


def test_hard_coded_batch_reshape_keeps_images_apart() -> None:
    """R3: a [1, C] Reshape in a batch-1 graph; BatchNorm1d must not collapse (it did when
    synthesis fell back to one image at a time)."""
    b = M.Builder(7, 17, calibrate=False)
    y = b.node("GlobalAveragePool", [b.conv_bn_relu("input", 3, 8)])
    y = b.node("Reshape", [y, b.init("shape", np.array([1, 8], np.int64))])
    y = b.node("Gemm", [y, b.init("w1", (b.rng.standard_normal((12, 8)) * 0.5).astype(np.float32)),
                        b.init("b1", np.zeros(12, np.float32))], transB=1)
    bn = b.bn(y, 12)
    y = b.node("Gemm", [b.relu(bn), b.init("w2", (b.rng.standard_normal((5, 12)) * 0.4)
                                            .astype(np.float32)),
                        b.init("b2", np.zeros(5, np.float32))], transB=1)
    m = b.model([("input", [1, 3, 16, 16])], [("logits", y, [1, 5])])
    out, rep = onnxlw.compress(m, Config(samples=16))
    assert rep.fallback is None  # no per-image fallback
    assert any("hard-code the batch" in w for w in rep.warnings)
    assert rep.validation.sqnr_db > 15  # was 5.0 dB


def test_static_batch_flatten_to_1_minus1_c() -> None:
    """A static-batch model that flattens with a constant [1, -1, C] Reshape (YOLO heads)."""
    b = M.Builder(3, 17)
    y = b.conv_bn_relu("input", 3, 6)
    y = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    y = b.node("Reshape", [y, b.init("shape", np.array([1, -1, 6], np.int64))])
    m = b.model([("input", [1, 3, 16, 16])], [("det", y, [1, 256, 6])])
    out, rep = onnxlw.compress(m, CFG)
    assert rep.validation.sqnr_db > 20
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, 256, 6]


def test_shape_vectors_are_not_activations() -> None:
    """x.reshape(b, c, h*w): an int64 Concat of Shape values is never quantized."""
    b = M.Builder(4, 17)
    y = b.conv_bn_relu("input", 3, 8)
    shp = b.node("Shape", [y])
    n = b.node("Gather", [shp, b.init("i0", np.array([0], np.int64))], axis=0)
    cat = b.node("Concat", [n, b.init("rest", np.array([8, -1], np.int64))], axis=0)
    y = b.node("Reshape", [y, cat])
    y = b.node("Unsqueeze", [y, b.init("ax", np.array([3], np.int64))])
    y = b.conv_bn_relu(y, 8, 8, k=1)
    m = b.model([("input", ["N", 3, 8, 8])], [("out", y, ["N", 8, 64, 1])])
    out, rep = onnxlw.compress(m, CFG)
    assert rep.layers_quantized == 2 and rep.validation.sqnr_db > 20


def test_layer_normalization_is_synthesized() -> None:
    b = M.Builder(5, 17)
    y = b.conv_bn_relu("input", 3, 8)
    y = b.node("LayerNormalization", [y, b.init("g", np.ones(8, np.float32)),
                                      b.init("bb", np.zeros(8, np.float32))], axis=-1)
    y = b.conv_bn_relu(y, 8, 8)
    m = b.model([("input", ["N", 3, 8, 8])], [("out", y, ["N", 8, 8, 8])])
    _, rep = onnxlw.compress(m, CFG)
    assert rep.layers_quantized == 2 and rep.unsupported_ops == []


def test_paddle_minus_one_batch_and_output_without_shape() -> None:
    m = M.conv_bn_relu(batch="N")
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    m.graph.output[0].type.tensor_type.ClearField("shape")
    out, rep = onnxlw.compress(m, CFG)
    assert any("repaired" in w for w in rep.warnings)
    onnx.checker.check_model(out)
    q, _ = onnxlw.compress(m, dataclasses.replace(CFG, input_shapes=(("input", (-1, 3, 16, 16)),)))
    assert q.graph.SerializeToString() == out.graph.SerializeToString()


def test_quantized_model_gets_a_short_real_reason() -> None:
    """An already-quantized model is named as such (fp16: tests/test_third_party.py)."""
    q, _ = onnxlw.compress(M.conv_bn_relu(batch="N"), CFG)
    with pytest.raises(OnnxlwError, match="already quantized") as e:
        onnxlw.compress(q, CFG)
    assert len(str(e.value)) < 200


def test_fail_under_turns_a_bad_output_into_an_error() -> None:
    with pytest.raises(OnnxlwError, match="below --fail-under"):
        onnxlw.compress(M.conv_bn_relu(batch="N"), dataclasses.replace(CFG, fail_under_db=200))


def test_exclude_keeps_matching_layers_in_float() -> None:
    m = M.residual(batch="N")
    first = next(n.name for n in m.graph.node if n.op_type == "Conv")
    out, rep = onnxlw.compress(m, dataclasses.replace(CFG, exclude=(first,)))
    assert rep.layers[0].skipped == f"excluded by pattern {first!r}"
    assert rep.layers_quantized == len(rep.layers) - 1
    assert fused_conv_counts(out)[1] == 1


def test_metadata_records_onnxruntime_version_and_range() -> None:
    import onnxruntime

    out, _ = onnxlw.compress(M.conv_bn_relu(batch="N"), CFG)
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["onnxlw.onnxruntime_version"] == onnxruntime.__version__
    assert "verified on onnxruntime" in meta["onnxlw.saturation_guard"]
    assert meta["onnxlw.validation"].endswith("ok")


def test_matmul_layer_end_to_end() -> None:
    b = M.Builder(9, 17)
    y = b.node("GlobalAveragePool", [b.conv_bn_relu("input", 3, 8)])
    y = b.node("Flatten", [y], axis=1)
    w = b.init("mm_w", (b.rng.standard_normal((8, 5)) * 0.5).astype(np.float32))
    y = b.node("MatMul", [y, w])
    m = b.model([("input", ["N", 3, 16, 16])], [("logits", y, ["N", 5])])
    out, rep = onnxlw.compress(m, CFG)
    assert rep.layers_quantized == 2 and rep.validation.sqnr_db > 25


def test_two_inputs() -> None:
    b = M.Builder(11, 17)
    a = b.conv_bn_relu("input", 3, 8)
    c = b.conv_bn_relu("input2", 3, 8)
    y = b.node("Add", [a, c])
    m = b.model([("input", ["N", 3, 8, 8]), ("input2", ["N", 3, 8, 8])],
                [("out", y, ["N", 8, 8, 8])])
    out, rep = onnxlw.compress(m, CFG)
    assert rep.layers_quantized == 2 and fused_conv_counts(out) == (2, 0)
    assert rep.validation.sqnr_db > 20


def test_report_json_keys() -> None:
    _, rep = onnxlw.compress(M.conv_bn_relu(batch="N"), CFG)
    d = json.loads(rep.to_json())
    for k in ("layers", "validation", "inputs", "onnxruntime_version", "saturation_fixes",
              "bias_scale_fixes", "synthesis", "warnings", "config"):
        assert k in d, k
    assert "plan" not in d


def test_cli_save_and_load_plan_same_bytes(tmp_path: Path) -> None:
    a, b, p = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "p.npz"
    src = str(REPO / "models/digits_cnn.onnx")
    assert main(["compress", src, "-o", str(a), "--save-plan", str(p)]) == 0
    assert main(["compress", src, "-o", str(b), "--load-plan", str(p)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_problem_is_picklable_and_solvable_many_times() -> None:
    import pickle

    from onnxlw.solve import LayerProblem, QuantSpec, solve_weights

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 1, 24)).astype(np.float32)
    w = rng.standard_normal((1, 8, 24)).astype(np.float32)
    p = LayerProblem.from_samples(w, x, bias=np.zeros((1, 8), np.float32))
    before = pickle.dumps(p)
    q = pickle.loads(before)
    a = solve_weights(q, QuantSpec(scale_method="output-mse"))
    b = solve_weights(q, QuantSpec(scale_method="minmax"))
    assert pickle.dumps(q) == before  # solving does not change the problem
    assert a.stats["sqnr_db"] >= b.stats["sqnr_db"]
    np.testing.assert_array_equal(solve_weights(p).weight, a.weight)


def test_broken_output_is_labelled_loudly(monkeypatch) -> None:
    import onnxlw.validate as V

    monkeypatch.setattr(V, "BROKEN_DB", 500.0)
    out, rep = onnxlw.compress(M.conv_bn_relu(batch="N"), CFG)
    assert rep.summary().startswith("WARNING: THE OUTPUT LOOKS BROKEN")
    assert rep.to_dict()["validation"]["looks_broken"] is True
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["onnxlw.validation"].endswith("LOOKS BROKEN")


def test_inspect_predicts_a_refusal(tmp_path: Path, capsys) -> None:
    q, _ = onnxlw.compress(M.conv_bn_relu(batch="N"), CFG)
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compress would refuse: the model is already quantized" in out
    assert "SKIP: its weight is computed at run time by DequantizeLinear" in out


def test_any_executor_plugs_in() -> None:
    """A user's own Executor (here a serial one, as a Dask or Ray adapter would be)."""
    from concurrent.futures import Executor, Future

    class Serial(Executor):
        calls = 0

        def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN202
            Serial.calls += 1
            f: Future = Future()
            f.set_result(fn(*args, **kwargs))
            return f

    m = M.residual(batch="N")
    ref, _ = onnxlw.compress(m, CFG)
    got, _ = onnxlw.compress(m, CFG, executor=Serial())
    assert Serial.calls == len([n for n in m.graph.node if n.op_type == "Conv"])
    assert got.SerializeToString() == ref.SerializeToString()


def test_activation_by_activation_matmul_is_listed_with_its_reason() -> None:
    """An attention-style MatMul (both operands activations) is listed, not dropped."""
    b = M.Builder(12, 17)
    y = b.conv_bn_relu("input", 3, 8)
    f = b.node("Reshape", [y, b.init("s", np.array([0, 8, -1], np.int64))])
    t = b.node("Transpose", [f], perm=[0, 2, 1])
    a = b.node("MatMul", [f, t])
    m = b.model([("input", ["N", 3, 8, 8])], [("att", a, ["N", 8, 8])])
    _, rep = onnxlw.compress(m, CFG)
    mm = [r for r in rep.layers if r.op_type == "MatMul"]
    assert len(mm) == 1 and "activation-by-activation" in mm[0].skipped
