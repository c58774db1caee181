"""--prune through the pipeline on tiny models, checked numerically in onnxruntime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models as M
import onnxlw
from onnxlw import Config
from onnxlw.cli import main
from onnxlw.errors import OnnxlwError
from onnxlw.ortutil import fused_conv_counts, session

CFG = Config(samples=8)


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits}


def test_pruned_fp32_output_carries_the_plan_and_runs() -> None:
    m = M.gemm_head(batch="N")
    out, rep = onnxlw.compress(
        m, dataclasses.replace(CFG, prune="0.5", quantize=False, sparse_format="dense")
    )
    onnx.checker.check_model(out)
    w = weights_of(out)
    total = zeros = 0
    for r in rep.layers:
        sol = rep.plan.layers[r.index]
        got = w[r.node]
        np.testing.assert_array_equal(got, r and onnxlw.ops.OPS[r.op_type].from_matrix(
            _rec(rep, r.index), sol.weight))
        total += got.size
        zeros += int((got == 0).sum())
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    feeds = M.random_feeds(m, batch=4)
    a, b = session(m).run(None, feeds)[0], session(out).run(None, feeds)[0]
    assert a.shape == b.shape and np.isfinite(b).all()
    assert fused_conv_counts(out) == (0, 2)
    assert "sparsity         : 50.0 %" in rep.summary()


def _rec(rep, index):  # noqa: ANN001, ANN202 - the analysis record behind a report line
    from onnxlw.ops import ConvGeom, LayerRecord

    r = rep.layers[index]
    geom = ConvGeom(1, tuple(r.weight_shape[2:]), (1, 1), (0, 0, 0, 0), (1, 1)) if (
        r.op_type == "Conv") else None
    return LayerRecord(index, r.node, r.op_type, "", "", "", None, tuple(r.weight_shape), geom,
                       (), onnxlw.ops.OPS[r.op_type].out_axis)


def test_pruned_w8a8_keeps_zeros_and_fuses() -> None:
    m = M.residual(batch="N")
    out, rep = onnxlw.compress(m, dataclasses.replace(CFG, prune="0.5", sparse_format="dense"))
    n_conv = sum(1 for r in rep.layers if r.op_type == "Conv")
    assert fused_conv_counts(out) == (n_conv, 0)
    for r in rep.layers:
        sol = rep.plan.layers[r.index]
        assert (sol.encoding.q[sol.weight == 0] == 0).all()
        assert "prune_sparsity" in sol.stats
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    q = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 4]
    zeros = sum(int((v == 0).sum()) for v in q) / sum(v.size for v in q)
    assert zeros >= 0.45


def test_n_m_output_pattern_along_input_channels() -> None:
    m = M.conv_bn_relu(batch="N")
    out, rep = onnxlw.compress(
        m, dataclasses.replace(CFG, prune="2:4", quantize=False, sparse_format="dense")
    )
    w = weights_of(out)
    for r in rep.layers:
        wt = w[r.node]  # (O, C, kh, kw): groups of 4 input channels at each kernel position
        o, c = wt.shape[:2]
        full = (c // 4) * 4
        if full:
            nz = (wt[:, :full] != 0).reshape(o, full // 4, 4, *wt.shape[2:]).sum(axis=2)
            assert (nz <= 2).all()


def test_magnitude_and_no_refit_options_run_and_cost_more() -> None:
    m = M.residual(batch="N")
    errs = {}
    for name, kw in {
        "obs": {},
        "no-refit": {"prune_refit": False},
        "magnitude": {"prune_method": "magnitude"},
    }.items():
        _, rep = onnxlw.compress(m, dataclasses.replace(CFG, prune="0.6", quantize=False, **kw))
        errs[name] = sum(10 ** (-r.stats["sqnr_db"] / 10) for r in rep.layers)
    assert errs["obs"] < errs["no-refit"] and errs["obs"] < errs["magnitude"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--prune", "channels:1.5"], ["channels:FRACTION"]),
        (["--prune", "1.5"], ["not a sparsity"]),
        (["--prune", "5:4"], ["not a sparsity"]),
        (["--no-quantize"], ["nothing to do"]),
    ],
)
def test_bad_prune_options_are_one_line_errors(args, words, tmp_path, capsys) -> None:
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
    rc = main(["compress", str(src), "-o", str(tmp_path / "q.onnx"), *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and all(w in err for w in words), err
    assert not (tmp_path / "q.onnx").exists()


def test_plan_round_trip_with_masks(tmp_path) -> None:
    m = M.residual(batch="N")
    cfg = dataclasses.replace(CFG, prune="0.5", quantize=False)
    out, rep = onnxlw.compress(m, cfg)
    rep.plan.save(tmp_path / "p.npz")
    again, _ = onnxlw.compress(m, cfg, plan=tmp_path / "p.npz")
    assert again.SerializeToString() == out.SerializeToString()
    with pytest.raises(OnnxlwError):
        Config(prune="0")


@pytest.mark.parametrize("quantize", [False, True])
def test_compact_storage_is_exact_smaller_and_still_fuses(quantize: bool) -> None:
    b = M.Builder(3, 17)
    y = b.conv_bn_relu(b.conv_bn_relu("input", 3, 32), 32, 64)
    out_dims = ["N", 64, 16, 16]
    m = b.model([("input", ["N", 3, 16, 16])], [("out", b.conv_bn_relu(y, 64, 64), out_dims)])
    cfg = dataclasses.replace(CFG, prune="0.6", quantize=quantize)
    compact, rep = onnxlw.compress(m, cfg)
    dense, _ = onnxlw.compress(m, dataclasses.replace(cfg, sparse_format="dense"))
    assert compact.ByteSize() < dense.ByteSize()
    assert rep.sparse_storage["tensors"].get("bitmask", 0) >= 1
    feeds = M.random_feeds(m, batch=2)
    a, b = session(dense).run(None, feeds)[0], session(compact).run(None, feeds)[0]
    np.testing.assert_array_equal(a, b)
    assert fused_conv_counts(compact) == fused_conv_counts(dense)


def test_compact_forms_chosen_by_size() -> None:
    from onnx import TensorProto, helper

    from onnxlw.emit.compact import compact_sparse

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    very = w * (rng.random(w.shape) < 0.01)   # 99 % zeros: the sparse initializer is smallest
    half = w * (rng.random(w.shape) < 0.5)    # 50 % zeros: the bitmask is smallest
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["y1"]), helper.make_node("MatMul", ["y1", "b"],
                                                                         ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(very, "a"), numpy_helper.from_array(half, "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    out, choices = compact_sparse(m)
    forms = {c.name: c.form for c in choices}
    assert forms == {"a": "sparse", "b": "bitmask"}
    onnx.checker.check_model(out)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(
        session(out).run(None, {"x": x})[0], (x @ very) @ half, rtol=1e-5, atol=1e-5
    )


def test_prune_report_has_size_zipped_size_and_latency() -> None:
    _, rep = onnxlw.compress(M.residual(batch="N"), dataclasses.replace(CFG, prune="0.5"))
    v = rep.validation
    assert v.latency_ms > 0 and v.reference_latency_ms > 0
    assert 0 < rep.size_zipped_after < rep.size_zipped_before
    text = rep.summary()
    assert "latency          :" in text and "zipped size      :" in text
    d = rep.to_dict()
    assert all("sparsity" in lr["stats"] for lr in d["layers"] if lr["skipped"] is None)


def test_bitmask_tensors_share_one_expansion_and_expand_exactly() -> None:
    """Several zero-heavy tensors of odd sizes (bit segments not byte-aligned) are rebuilt
    bit-exactly by onnxruntime from one shared CumSum/Gather expansion."""
    from onnx import TensorProto, helper

    from onnxlw.emit.compact import compact_sparse

    rng = np.random.default_rng(1)
    shapes = [(37, 29), (29, 41), (41, 13)]
    ws = [
        (rng.standard_normal(s) * (rng.random(s) < 0.4)).astype(np.float32) for s in shapes
    ]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["y"])]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 37])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 13])],
        [numpy_helper.from_array(w, f"w{k}") for k, w in enumerate(ws)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    out, choices = compact_sparse(m)
    assert {c.form for c in choices} == {"bitmask"} and len(choices) == 3
    assert [n.op_type for n in out.graph.node].count("CumSum") == 1
    assert out.ByteSize() < 0.8 * m.ByteSize()
    onnx.checker.check_model(out)
    x = rng.standard_normal((3, 37)).astype(np.float32)
    np.testing.assert_array_equal(session(out).run(None, {"x": x})[0], session(m).run(None,
                                  {"x": x})[0])
