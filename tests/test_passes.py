"""Graph passes: each is numerically exact in onnxruntime, returns a new model, leaves its input
untouched, and records why every rule did or did not fire."""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models as M
import onnxlw.passes as P
from onnxlw.errors import InternalError
from onnxlw.graph import attrs
from onnxlw.ortutil import session
from onnxlw.passes import (
    Canonical,
    Note,
    PassResult,
    apply,
    canonicalize,
    check_canonical,
    name_nodes,
)
from onnxlw.passes.bn_fold import fold_batchnorm
from onnxlw.passes.cleanup import (
    drop_noops,
    explicit_conv_pads,
    fuse_pad_into_conv,
    normalize_gemm,
)
from onnxlw.passes.constants import fold_constants

RTOL = 1e-4


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, batch: int = 2) -> None:
    """Same outputs (names, shapes, values within 1e-4 of the output's scale) on random inputs."""
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    for seed in (0, 1):
        feeds = M.random_feeds(before, batch=batch, seed=seed)
        ref, got = outputs(before, feeds), outputs(after, feeds)
        assert len(ref) == len(got)
        for r, g in zip(ref, got, strict=True):
            assert r.shape == g.shape
            scale = float(np.abs(r).max())
            assert scale > 0
            np.testing.assert_allclose(g, r, rtol=RTOL, atol=RTOL * scale)


def run_pass(fn: Callable[[onnx.ModelProto], PassResult], model: onnx.ModelProto) -> PassResult:
    """Run a pass; check it returns a new model and left its input byte-identical."""
    before = model.SerializeToString()
    res = fn(model)
    assert model.SerializeToString() == before, f"{fn.__name__} modified its input model"
    assert res.model is not model
    assert res.notes, f"{fn.__name__} recorded no notes"
    onnx.checker.check_model(res.model)
    return res


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def notes_of(res: PassResult, rule: str | None = None) -> list:
    return [n for n in res.notes if rule is None or n.rule == rule]


def init_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# ------------------------------------------------------------------------------ fold_constants


def test_fold_constants_turns_constant_nodes_into_initializers() -> None:
    m = M.conv_bn_relu()
    assert op_counts(m)["Constant"] == 2
    res = run_pass(fold_constants, m)
    assert op_counts(res.model)["Constant"] == 0
    clip = next(n for n in res.model.graph.node if n.op_type == "Clip")
    assert float(init_array(res.model, clip.input[1])) == 0.0
    assert float(init_array(res.model, clip.input[2])) == 6.0
    (note,) = res.notes
    assert note.fired and "folded 2" in note.reason
    assert_same_outputs(m, res.model)


def test_fold_constants_evaluates_constant_subgraph() -> None:
    m = M.const_subgraph()
    res = run_pass(fold_constants, m)
    ops = op_counts(res.model)
    assert ops["Constant"] == ops["Cast"] == ops["Mul"] == 0
    clip = next(n for n in res.model.graph.node if n.op_type == "Clip")
    hi = init_array(res.model, clip.input[2])
    assert hi.dtype == np.float32 and float(hi) == 6.0
    assert "folded 5" in res.notes[0].reason  # 3 Constant + Cast + Mul
    assert_same_outputs(m, res.model)


def test_fold_constants_without_constants_records_why() -> None:
    m = M.relu_only()
    res = run_pass(fold_constants, m)
    (note,) = res.notes
    assert not note.fired and note.reason == "no constant subgraph"
    assert_same_outputs(m, res.model)


def _constant_model(attr: str) -> onnx.ModelProto:
    """input + Constant(``attr``): a sparse_value (numeric) or a value_strings (kept)."""
    if attr == "sparse_value":
        dense = np.zeros((1, 3, 1, 1), np.float32)
        dense[0, 1, 0, 0] = 2.5
        value = helper.make_sparse_tensor(
            numpy_helper.from_array(np.array([2.5], np.float32), "k"),
            numpy_helper.from_array(np.array([1], np.int64), "ki"),
            [1, 3, 1, 1],
        )
        nodes = [
            helper.make_node("Constant", [], ["k"], sparse_value=value, name="k"),
            helper.make_node("Add", ["input", "k"], ["output"], name="add"),
        ]
    else:
        nodes = [
            helper.make_node("Constant", [], ["s"], value_strings=["a", "b"], name="s"),
            helper.make_node("Relu", ["input"], ["output"], name="relu"),
        ]
    outs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 4, 4])]
    if attr != "sparse_value":
        outs.append(helper.make_tensor_value_info("s", TensorProto.STRING, [2]))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])], outs
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fold_constants_sparse_value_constant() -> None:
    m = _constant_model("sparse_value")
    res = run_pass(fold_constants, m)
    assert op_counts(res.model)["Constant"] == 0
    assert init_array(res.model, "k")[0, 1, 0, 0] == 2.5
    assert_same_outputs(m, res.model, batch=1)


def test_fold_constants_keeps_string_constant() -> None:
    m = _constant_model("value_strings")
    res = run_pass(fold_constants, m)
    assert op_counts(res.model)["Constant"] == 1
    assert not res.notes[0].fired


# ------------------------------------------------------------------------------ drop_noops


def test_drop_noops_removes_identity_and_dropout() -> None:
    m = M.identity_dropout()
    assert op_counts(m)["Identity"] == 2 and op_counts(m)["Dropout"] == 1
    res = run_pass(drop_noops, m)
    ops = op_counts(res.model)
    assert ops["Identity"] == 0 and ops["Dropout"] == 0
    fired = sorted(n.rule for n in res.notes if n.fired)
    assert fired == ["Dropout", "Identity", "Identity"]
    # the graph output keeps its name and is now produced by the Relu
    prod = {o: n for n in res.model.graph.node for o in n.output}
    assert prod["output"].op_type == "Relu"
    assert_same_outputs(m, res.model)


def test_drop_noops_identity_chain_to_graph_output() -> None:
    m = M.identity_chain()
    res = drop_noops(m)
    assert op_counts(res.model)["Identity"] == 0
    assert_same_outputs(m, res.model)


def _dropout_model(training_mode: bool | None, use_mask: bool) -> onnx.ModelProto:
    b = M.Builder(20)
    y = b.conv_bn_relu("input", 3, 8)
    ins = [y]
    if training_mode is not None:
        ins += ["", b.init("training_mode", np.array(training_mode))]
    d = b.node("Dropout", ins, n_out=2)
    mask = b.nodes[-1].output[1]
    if use_mask:
        y = b.node("Mul", [d, b.node("Cast", [mask], to=TensorProto.FLOAT)])
    else:
        y = d
    y = b.conv_bn_relu(y, 8, 8)
    return b.model(M._in(1, (16, 16)), M._out(y, 1, 8, (16, 16)))


@pytest.mark.parametrize(
    ("training_mode", "use_mask", "fires", "reason"),
    [
        (False, False, True, ""),
        (True, False, False, "training_mode"),
        (None, True, False, "mask"),
    ],
)
def test_drop_noops_dropout_rules(training_mode, use_mask, fires, reason) -> None:
    m = _dropout_model(training_mode, use_mask)
    res = run_pass(drop_noops, m)
    (note,) = [n for n in res.notes if n.rule == "Dropout"]
    assert note.fired is fires
    assert reason in note.reason
    assert op_counts(res.model)["Dropout"] == (0 if fires else 1)
    if training_mode is not True:  # a training-mode Dropout is random: nothing to compare
        assert_same_outputs(m, res.model)


def test_drop_noops_keeps_identity_from_input_to_output() -> None:
    g = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"], name="id")],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    res = run_pass(drop_noops, m)
    (note,) = res.notes
    assert not note.fired and "graph output" in note.reason
    assert op_counts(res.model)["Identity"] == 1
    assert_same_outputs(m, res.model, batch=1)


# ------------------------------------------------------------------------------ fold_batchnorm


def _bn_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "BatchNormalization"]


def _check_stats(m: onnx.ModelProto, res) -> None:  # noqa: ANN001 - FoldResult
    """Every BN's statistics harvested and keyed by its output: out_mean == B, out_std ==
    |scale| (up to the epsilon term), and both are the real moments of the BN's output on the
    data its running statistics were calibrated on (tests/models.calibrate_bn)."""
    bns = _bn_nodes(m)
    assert res.stats is not None and sorted(res.stats) == sorted(n.output[0] for n in bns)
    for n in bns:
        s = res.stats[n.output[0]]
        scale, bias, mean, var = (init_array(m, i) for i in n.input[1:5])
        np.testing.assert_array_equal(s.out_mean, bias)
        # |scale| up to the epsilon term (var is small for a BN1d after pooling)
        np.testing.assert_allclose(s.out_std, np.abs(scale), rtol=max(1e-6, s.epsilon / var.min()))
        np.testing.assert_array_equal(s.mean, mean)
        np.testing.assert_array_equal(s.var, var)
        assert s.epsilon == pytest.approx(1e-5)
        assert (s.out_std > 0).all()
        y = M.run_tensor(m, n.output[0]).astype(np.float64)  # on calibrate_bn's data
        axes = (0,) + tuple(range(2, y.ndim))
        np.testing.assert_allclose(y.mean(axis=axes), s.out_mean, atol=2e-5 * np.abs(scale).max())
        np.testing.assert_allclose(y.std(axis=axes), s.out_std, rtol=2e-5)
    assert any((init_array(m, n.input[1]) < 0).any() for n in bns), "want negative scales"


def test_fold_batchnorm_conv() -> None:
    m = M.conv_bn_relu()
    res = run_pass(fold_batchnorm, m)
    assert not _bn_nodes(res.model)
    assert op_counts(res.model)["Conv"] == 2
    folds = notes_of(res, "fold")
    assert len(folds) == 2 and all(n.fired and n.reason.startswith("into Conv") for n in folds)
    _check_stats(m, res)
    assert all(s.folded_into for s in res.stats.values())
    # the folded Conv writes the BN's output tensor, so the stats stay keyed by it
    prod = {o: n for n in res.model.graph.node for o in n.output}
    assert all(prod[t].op_type == "Conv" for t in res.stats)
    assert_same_outputs(m, res.model)


def test_fold_batchnorm_matches_numpy_fold_of_exporter() -> None:
    """onnxlw's fold and an independent numpy fold give the same network."""
    ours = run_pass(fold_batchnorm, M.conv_bn_relu()).model
    assert_same_outputs(M.bn_folded(), ours)


@pytest.mark.parametrize("kw", [{}, {"group": 2}, {"bias": False}], ids=["g1", "group2", "nobias"])
def test_fold_batchnorm_convtranspose(kw) -> None:
    m = M.convtranspose_bn(**kw)
    res = run_pass(fold_batchnorm, m)
    assert not _bn_nodes(res.model)
    (ct,) = [n for n in res.model.graph.node if n.op_type == "ConvTranspose"]
    assert len(ct.input) == 3 and attrs(ct).get("group", 1) == kw.get("group", 1)
    assert any(n.fired and "ConvTranspose" in n.reason for n in notes_of(res, "fold"))
    _check_stats(m, res)
    assert_same_outputs(m, res.model)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"trans_b": 0, "alpha": 0.5, "beta": 2.0},
        {"trans_b": 0, "alpha": 1.5, "gemm_bias": False},
    ],
    ids=["normal", "transB0-alpha-beta", "nobias"],
)
def test_fold_batchnorm_gemm_bn1d(kw) -> None:
    m = M.gemm_bn(**kw)
    res = run_pass(fold_batchnorm, m)
    assert not _bn_nodes(res.model)
    g = next(n for n in res.model.graph.node if n.op_type == "Gemm")
    a = attrs(g)
    assert a.get("transB") == 1 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    assert init_array(res.model, g.input[1]).shape == (12, 128)
    assert init_array(res.model, g.input[2]).shape == (12,)
    assert any(n.fired and "Gemm" in n.reason for n in notes_of(res, "fold"))
    _check_stats(m, res)
    assert_same_outputs(m, res.model, batch=3)


def test_fold_batchnorm_refuses_shared_weight() -> None:
    m = M.shared_weight()
    res = run_pass(fold_batchnorm, m)
    folds = notes_of(res, "fold")
    refused = [n for n in folds if not n.fired]
    assert len(folds) == 3 and len(refused) == 2
    assert all("shared" in n.reason for n in refused)
    assert len(_bn_nodes(res.model)) == 2
    # the shared weight is still one tensor, unchanged
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert len({n.input[1] for n in convs}) == 2
    _check_stats(m, res)  # statistics are harvested even where the fold is refused
    assert sum(s.folded_into is None for s in res.stats.values()) == 2
    assert_same_outputs(m, res.model)


def _bn_after(op: str) -> onnx.ModelProto:
    """A BN whose producer is ``op`` ('input': a graph input; 'Relu'; 'Conv2': a Conv with two
    consumers; 'GemmTransA': Gemm with transA=1)."""
    b = M.Builder(21)
    if op == "input":
        y = b.bn("input", 3)
        y = b.conv_bn_relu(y, 3, 8)
        out = M._out(y, 1, 8, (16, 16))
    elif op == "Relu":
        y = b.bn(b.relu(b.conv("input", 3, 8)), 8)
        out = M._out(y, 1, 8, (16, 16))
    elif op == "Conv2":
        c = b.conv("input", 3, 8)
        y = b.node("Add", [b.bn(c, 8), c])
        out = M._out(y, 1, 8, (16, 16))
    elif op == "GemmTransA":
        f = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv("input", 3, 8)])], axis=0)
        w = b.init("w", b.rng.standard_normal((1, 6)).astype(np.float32))
        y = b.bn(b.node("Gemm", [f, w], transA=1), 6)
        out = [("output", y, [8, 6])]
    else:
        raise ValueError(op)
    return b.model(M._in(1, (16, 16)), out)


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        ("input", "graph input"),
        ("Relu", "producer is Relu"),
        ("Conv2", "other consumers"),
        ("GemmTransA", "transA"),
    ],
)
def test_fold_batchnorm_refusals_record_reason(op, reason) -> None:
    m = _bn_after(op)
    res = run_pass(fold_batchnorm, m)
    refused = [n for n in notes_of(res, "fold") if not n.fired]
    assert refused and reason in refused[0].reason
    assert len(_bn_nodes(res.model)) == len(refused)
    if op != "GemmTransA":
        _check_stats(m, res)
    assert_same_outputs(m, res.model, batch=1)


def test_fold_batchnorm_without_bn() -> None:
    m = M.bn_folded()
    res = run_pass(fold_batchnorm, m)
    assert res.stats == {}
    (note,) = res.notes
    assert not note.fired and "no BatchNormalization" in note.reason
    assert_same_outputs(m, res.model)


# ------------------------------------------------------------------------------ normalize_gemm


@pytest.mark.parametrize("bias_2d", [False, True])
def test_normalize_gemm_transb0_alpha_beta(bias_2d) -> None:
    m = M.gemm_transb0(bias_2d=bias_2d)
    res = run_pass(normalize_gemm, m)
    (note,) = res.notes
    assert note.fired
    g = next(n for n in res.model.graph.node if n.op_type == "Gemm")
    a = attrs(g)
    assert a.get("transB") == 1 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    w0 = next(init_array(m, n.input[1]) for n in m.graph.node if n.op_type == "Gemm")
    np.testing.assert_allclose(init_array(res.model, g.input[1]), 0.7 * w0.T, rtol=1e-6)
    assert init_array(res.model, g.input[2]).shape == (10,)
    assert_same_outputs(m, res.model, batch=3)


def test_normalize_gemm_without_bias_adds_zero_bias() -> None:
    m = M.gemm_bn(trans_b=0, alpha=2.0, gemm_bias=False)
    res = run_pass(normalize_gemm, m)
    g = res.model.graph.node[[n.op_type for n in res.model.graph.node].index("Gemm")]
    assert len(g.input) == 3
    np.testing.assert_array_equal(init_array(res.model, g.input[2]), np.zeros(12, np.float32))
    fired = [n.fired for n in res.notes]
    assert fired == [True, False]  # the second Gemm is already normal
    assert res.notes[1].reason == "already normal"
    assert_same_outputs(m, res.model, batch=3)


def _gemm_model(c_shape: tuple[int, ...] | None, trans_a: int = 0) -> onnx.ModelProto:
    """input (2, 3, 16, 16) -> GAP -> Flatten -> Gemm(C of ``c_shape``) -> (2, 10)."""
    b = M.Builder(22, calibrate=False)  # C of shape (2, 10) fixes the batch at 2
    f = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv_bn_relu("input", 3, 8)])])
    if trans_a:
        f = b.node("Transpose", [f], perm=[1, 0])
    ins = [f, b.init("w", b.rng.standard_normal((10, 8)).astype(np.float32))]
    if c_shape is not None:
        ins.append(b.init("c", b.rng.standard_normal(c_shape).astype(np.float32)))
    y = b.node("Gemm", ins, transA=trans_a, transB=1)
    return b.model(M._in(2, (16, 16)), [("output", y, [2, 10])])


@pytest.mark.parametrize(
    ("c_shape", "trans_a", "reason"),
    [((2, 10), 0, "not a per-output bias"), ((10,), 1, "transA=1"), ((10,), 0, "already normal")],
)
def test_normalize_gemm_refusals(c_shape, trans_a, reason) -> None:
    m = _gemm_model(c_shape, trans_a)
    res = run_pass(normalize_gemm, m)
    (note,) = res.notes
    assert not note.fired and reason in note.reason
    assert_same_outputs(m, res.model, batch=2)


def test_normalize_gemm_broadcast_scalar_bias() -> None:
    m = _gemm_model((1,))
    res = run_pass(normalize_gemm, m)
    g = next(n for n in res.model.graph.node if n.op_type == "Gemm")
    assert init_array(res.model, g.input[2]).shape == (10,)
    assert_same_outputs(m, res.model)


# ------------------------------------------------------------------------------ fuse_pad_into_conv


@pytest.mark.parametrize(
    ("pads", "conv_pad", "expect"),
    [
        ((0, 0, 0, 0, 0, 0, 1, 1), 0, [0, 0, 1, 1]),  # TF 'SAME', stride 2
        ((0, 0, 1, 2, 0, 0, 1, 0), 1, [2, 3, 2, 1]),  # added to the Conv's own pads
    ],
)
def test_fuse_pad_into_conv(pads, conv_pad, expect) -> None:
    m = M.pad_conv(pads=pads, conv_pad=conv_pad)
    res = run_pass(fuse_pad_into_conv, m)
    assert op_counts(res.model)["Pad"] == 0
    (note,) = res.notes
    assert note.fired
    pad_out = next(n.output[0] for n in m.graph.node if n.op_type == "Pad")
    pad_in = next(n.input[0] for n in m.graph.node if n.op_type == "Pad")
    convs = [n for n in res.model.graph.node if n.op_type == "Conv" and n.input[0] == pad_in]
    assert len(convs) == 1 and pad_out not in {i for n in res.model.graph.node for i in n.input}
    conv = convs[0]
    assert attrs(conv)["pads"] == expect
    assert_same_outputs(m, res.model)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"pad_value": 0.5}, "pad value is not zero"),
        ({"mode": "reflect"}, "mode"),
        ({"pads": (0, 0, 0, 0, 1, 0, 1, 1)}, "batch or channel"),
    ],
    ids=["value", "reflect", "batch-pads"],
)
def test_fuse_pad_into_conv_refusals(kw, reason) -> None:
    m = M.pad_conv(**kw)
    res = run_pass(fuse_pad_into_conv, m)
    (note,) = res.notes
    assert not note.fired and reason in note.reason
    assert op_counts(res.model)["Pad"] == 1
    assert_same_outputs(m, res.model)


def test_fuse_pad_with_constant_node_pads() -> None:
    """Pads given by Constant nodes (as exporters emit them) are read too."""
    m = M.pad_conv()
    g = m.graph
    pads_name = next(n.input[1] for n in g.node if n.op_type == "Pad")
    val_name = next(n.input[2] for n in g.node if n.op_type == "Pad")
    consts = []
    for name in (pads_name, val_name):
        t = next(t for t in g.initializer if t.name == name)
        consts.append(helper.make_node("Constant", [], [name], name=f"c_{name}", value=t))
    keep = [t for t in g.initializer if t.name not in (pads_name, val_name)]
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    res = run_pass(fuse_pad_into_conv, m)
    assert res.notes[0].fired and op_counts(res.model)["Pad"] == 0
    assert_same_outputs(m, res.model)


# ------------------------------------------------------------------------------ explicit_conv_pads


def _auto_pad_model(
    mode: str, stride: int, size: int, k: int, dims=None, dil: int = 1
) -> onnx.ModelProto:
    """input (1, 3, size, size+1) -> Conv(k x k, stride, dilation) -> output."""
    rng = np.random.default_rng(size * 10 + k)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    conv = helper.make_node(
        "Conv", ["input", "w", "b"], ["output"], name="conv", auto_pad=mode,
        strides=[stride, stride], dilations=[dil, dil],
    )  # fmt: skip
    dims = dims or [1, 3, size, size + 1]
    g = helper.make_graph(
        [conv],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, "OH", "OW"])],
        [w, b],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("k", [3, 2, 4])
def test_explicit_conv_pads(mode, stride, size, k) -> None:
    m = _auto_pad_model(mode, stride, size, k)
    res = run_pass(explicit_conv_pads, m)
    (note,) = res.notes
    assert note.fired, note.reason
    (conv,) = res.model.graph.node
    a = attrs(conv)
    assert "auto_pad" not in a and len(a["pads"]) == 4
    if mode == "VALID":
        assert a["pads"] == [0, 0, 0, 0]
    assert_same_outputs(m, res.model, batch=1)


def test_explicit_conv_pads_same_lower_puts_the_odd_unit_first() -> None:
    res = run_pass(explicit_conv_pads, _auto_pad_model("SAME_LOWER", 1, 8, 2))  # total pad 1
    assert attrs(res.model.graph.node[0])["pads"] == [1, 1, 0, 0]
    res = run_pass(explicit_conv_pads, _auto_pad_model("SAME_UPPER", 1, 8, 2))
    assert attrs(res.model.graph.node[0])["pads"] == [0, 0, 1, 1]


def test_explicit_conv_pads_dilation() -> None:
    """onnxruntime refuses dilations with SAME_* ("Dilation not supported for AutoPadType"), so
    the spec's pads are checked by hand; the rewritten model runs."""
    m = _auto_pad_model("SAME_LOWER", 2, 7, 3, dil=2)  # effective kernel 5
    res = run_pass(explicit_conv_pads, m)
    # H 7: out 4, total (4-1)*2+5-7 = 4 -> 2/2; W 8: out 4, total 3 -> lower 2, upper 1
    assert attrs(res.model.graph.node[0])["pads"] == [2, 2, 2, 1]
    (y,) = outputs(res.model, M.random_feeds(m, batch=1))
    assert y.shape == (1, 4, 4, 4)


def test_explicit_conv_pads_unknown_shape_records_why() -> None:
    m = _auto_pad_model("SAME_UPPER", 2, 8, 3, dims=["N", 3, "H", "W"])
    res = run_pass(explicit_conv_pads, m)
    (note,) = res.notes
    assert not note.fired and "spatial shape unknown" in note.reason
    assert attrs(res.model.graph.node[0])["auto_pad"] == b"SAME_UPPER"
    assert_same_outputs(m, res.model, batch=1)


def test_explicit_conv_pads_reads_shapes_through_the_graph() -> None:
    """The Conv input is an inner tensor: its shape comes from shape inference."""
    m = M.pad_conv(pads=(0, 0, 0, 0, 0, 0, 0, 0))
    conv = [n for n in m.graph.node if n.op_type == "Conv"][1]
    del conv.attribute[:]
    conv.attribute.extend(
        [helper.make_attribute("strides", [2, 2]), helper.make_attribute("auto_pad", "SAME_UPPER")]
    )
    res = run_pass(explicit_conv_pads, m)
    (note,) = [n for n in res.notes]
    assert note.fired and note.reason == "SAME_UPPER -> [0, 0, 1, 1]"
    assert_same_outputs(m, res.model)


def test_explicit_conv_pads_without_auto_pad() -> None:
    res = run_pass(explicit_conv_pads, M.conv_bn_relu())
    (note,) = res.notes
    assert not note.fired and note.reason == "no Conv with auto_pad"


# ------------------------------------------------------------------------------ canonicalize

ALL = {
    "conv_bn_relu": M.conv_bn_relu,
    "conv_bn_relu_opset13": lambda: M.conv_bn_relu(opset=13),
    "conv_bn_relu_opset11": lambda: M.conv_bn_relu(opset=11),
    "depthwise": M.depthwise,
    "residual": M.residual,
    "concat": M.concat,
    "se_block": M.se_block,
    "gemm_head": M.gemm_head,
    "gemm_transb0": M.gemm_transb0,
    "gemm_bn": M.gemm_bn,
    "convtranspose_bn": M.convtranspose_bn,
    "pad_conv": M.pad_conv,
    "identity_dropout": M.identity_dropout,
    "const_subgraph": M.const_subgraph,
    "bn_folded": M.bn_folded,
    "shared_weight": M.shared_weight,
    "unsupported_op": M.unsupported_op,
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_canonicalize(name) -> None:
    m = ALL[name]()
    before = m.SerializeToString()
    canon = canonicalize(m)
    assert m.SerializeToString() == before
    onnx.checker.check_model(canon.model)
    ops = op_counts(canon.model)
    for gone in ("Constant", "Identity", "Dropout", "Pad", "Cast"):
        assert ops[gone] == 0, gone
    n_bn = len(_bn_nodes(m))
    assert ops["BatchNormalization"] == (2 if name == "shared_weight" else 0)
    assert canon.bn_found is (n_bn > 0) and len(canon.bn_stats) == n_bn
    for g in (n for n in canon.model.graph.node if n.op_type == "Gemm"):
        a = attrs(g)
        assert a.get("transB") == 1 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    names = [n.name for n in canon.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    passes = {n.pass_name for n in canon.notes}
    assert passes == {
        "name_nodes",
        "densify_sparse",
        "explicit_conv_pads",
        "fold_constants",
        "drop_noops",
        "fold_batchnorm",
        "normalize_gemm",
        "fuse_pad_into_conv",
    }
    assert all(n.fired or n.reason for n in canon.notes), "a rule that did not fire needs a reason"
    assert_same_outputs(m, canon.model)


def test_name_nodes_gives_unique_names() -> None:
    ref = M.conv_bn_relu()
    m = M.conv_bn_relu()
    m.graph.node[0].name = ""
    m.graph.node[1].name = m.graph.node[2].name
    res = run_pass(name_nodes, m)
    names = [n.name for n in res.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert res.notes[0].fired and "named 2" in res.notes[0].reason
    assert_same_outputs(ref, res.model)  # the input has duplicate names: ORT refuses it


# ------------------------------------------------------------------------------ Canonical passes


def _stats_snapshot(canon: Canonical) -> dict:
    return {
        k: {f: np.copy(getattr(v, f)) for f in ("scale", "bias")} for k, v in canon.bn_stats.items()
    }


def test_apply_and_fold_bn_leave_their_input_canonical_unchanged() -> None:
    m = M.conv_bn_relu()
    canon = canonicalize(m)
    model_bytes = canon.model.SerializeToString()
    stats, keys, notes = _stats_snapshot(canon), dict(canon.bn_stats), list(canon.notes)
    out = apply(canon, normalize_gemm)
    out2 = P.fold_bn(out)
    assert canon.model.SerializeToString() == model_bytes
    assert canon.bn_stats == keys and canon.notes == notes
    assert _stats_snapshot(canon).keys() == stats.keys()
    for k, v in stats.items():
        np.testing.assert_array_equal(canon.bn_stats[k].scale, v["scale"])
    assert out.bn_stats is not canon.bn_stats and out.notes[: len(notes)] == notes
    assert out2.bn_stats.keys() == canon.bn_stats.keys()
    assert [n.pass_name for n in out2.notes[len(notes) :]] == ["normalize_gemm", "fold_batchnorm"]


def test_bn_stats_scaled_matches_the_rescaled_tensor() -> None:
    """What a rescaling pass (cross-layer equalization) records: the moments of k * tensor."""
    m = M.conv_bn_relu()
    canon = canonicalize(m)
    t, s = next(iter(canon.bn_stats.items()))
    k = np.linspace(-2.0, 3.0, s.scale.size)
    k[k == 0] = 0.5
    before = {f: np.copy(getattr(s, f)) for f in ("scale", "bias", "mean", "var")}
    s2 = s.scaled(k)
    for f, v in before.items():
        np.testing.assert_array_equal(getattr(s, f), v)  # frozen: the original is unchanged
    y = M.run_tensor(m, t).astype(np.float64) * k.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), s2.out_mean, atol=1e-4 * np.abs(y).max())
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), s2.out_std, rtol=1e-4)
    c2 = canon.replace(bn_stats={**canon.bn_stats, t: s2})
    assert canon.bn_stats[t] is s and c2.bn_stats[t] is s2 and c2.model is canon.model


# ------------------------------------------------------------------------------ check_canonical


def _break_graph(model: onnx.ModelProto) -> PassResult:
    """A broken pass: drops the first node, so its output is read but never produced."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[0]
    return PassResult(m, [Note("broken", "drop", "graph", True)])


def test_canonicalize_raises_internal_error_on_its_own_invalid_output(monkeypatch) -> None:
    monkeypatch.setattr(P, "MODEL_PASSES_AFTER_BN", (*P.MODEL_PASSES_AFTER_BN, _break_graph))
    with pytest.raises(InternalError) as e:
        canonicalize(M.conv_bn_relu())
    assert e.value.exit_code == 3
    assert "canonicalize produced a model that fails onnx.checker" in str(e.value)
    assert "report it" in str(e.value)


def test_check_canonical_blames_an_invalid_input_not_onnxlw() -> None:
    bad = _break_graph(M.conv_bn_relu()).model
    check_canonical(bad, source=bad)  # the input was invalid already: not onnxlw's bug
    with pytest.raises(InternalError):
        check_canonical(bad, source=M.conv_bn_relu())
    check_canonical(canonicalize(M.conv_bn_relu()).model)
