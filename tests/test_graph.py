"""graph.py and the passes across scopes: readers inside If/Loop/Scan bodies (D3), names that
are unique over every scope (D4), sparse initializers and value_info kept by every pass (D5).

Models from the review's reproductions (design/code-review-2026-11-30.md, appendix R2, R5, R6).
Every rewritten model is checked with onnx.checker and compared in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from test_passes import assert_same_outputs, op_counts, run_pass

import models as M
from onnxlw.graph import GraphView, NameAllocator, rebuild, sparse_to_dense
from onnxlw.passes import canonicalize
from onnxlw.passes.bn_fold import fold_batchnorm
from onnxlw.passes.cleanup import drop_noops, fuse_pad_into_conv, normalize_gemm
from onnxlw.passes.constants import fold_constants
from onnxlw.passes.sparse import densify_sparse_initializers

C = 4
PASSES = [fold_constants, drop_noops, fold_batchnorm, normalize_gemm, fuse_pad_into_conv]


def _model(nodes, inits, outputs=None) -> onnx.ModelProto:
    outputs = outputs or [h.make_tensor_value_info("out", T.FLOAT, ["N", C, 8, 8])]
    g = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("input", T.FLOAT, ["N", 3, 8, 8])], outputs, inits
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _bn_inits() -> list[onnx.TensorProto]:
    rng = np.random.default_rng(0)
    return [
        nh.from_array(a, n)
        for a, n in [
            (rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "w"),
            (np.linspace(0.5, 1.5, C).astype(np.float32), "s"),
            (np.linspace(-0.2, 0.3, C).astype(np.float32), "b"),
            (np.linspace(-0.1, 0.1, C).astype(np.float32), "m"),
            (np.full(C, 4.0, np.float32), "v"),
            (np.array(True), "cond"),
        ]
    ]


def _branch(reads: str, out: str = "br", nested: bool = False) -> onnx.GraphProto:
    """A body whose Relu reads the outer tensor ``reads`` (inside a nested If when asked)."""
    inner = h.make_graph(
        [h.make_node("Relu", [reads], [out + "_in"], name=out + "_relu")],
        out + "_inner",
        [],
        [h.make_tensor_value_info(out + "_in", T.FLOAT, None)],
    )
    if not nested:
        return inner
    return h.make_graph(
        [
            h.make_node(
                "If", ["cond"], [out], name=out + "_if", then_branch=inner, else_branch=inner
            )
        ],
        out + "_outer",
        [],
        [h.make_tensor_value_info(out, T.FLOAT, None)],
    )


def r2(nested: bool = False) -> onnx.ModelProto:
    """R2: Conv -> BN, and an If whose body reads the Conv output (pre-BN) ``c``."""
    br = _branch("c", nested=nested)
    nodes = [
        h.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4, name="conv"),
        h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn"),
        h.make_node("If", ["cond"], ["side"], then_branch=br, else_branch=br, name="if"),
        h.make_node("Add", ["bn", "side"], ["out"], name="add"),
    ]
    return _model(nodes, _bn_inits())


# ------------------------------------------------------------------------------ D3


@pytest.mark.parametrize("nested", [False, True], ids=["body", "nested-body"])
def test_consumers_see_readers_inside_bodies(nested) -> None:
    view = GraphView(r2(nested))
    copies = 4 if nested else 2  # then and else branch (each holding then and else when nested)
    assert [n.op_type for n in view.consumers["c"]] == ["BatchNormalization"] + ["Relu"] * copies
    assert view.read_in_subgraph("c")
    assert [n.name for n in view.subgraph_readers["c"]] == ["br_relu"] * copies
    assert view.single_consumer("c") is None
    assert view.single_consumer("bn").name == "add"
    assert not view.read_in_subgraph("br_in")  # defined inside the body: not an outer read


def test_fold_batchnorm_refuses_when_pre_bn_output_is_read_in_a_body() -> None:
    m = r2()
    onnx.checker.check_model(m, full_check=True)
    res = run_pass(fold_batchnorm, m)
    (note,) = [n for n in res.notes if n.rule == "fold"]
    assert not note.fired and "If/Loop/Scan body" in note.reason
    assert res.stats["bn"].folded_into is None  # still harvested
    onnx.checker.check_model(res.model, full_check=True)
    assert_same_outputs(m, res.model)


@pytest.mark.parametrize("nested", [False, True], ids=["body", "nested-body"])
def test_canonicalize_r2_is_valid_and_exact(nested) -> None:
    m = r2(nested)
    canon = canonicalize(m)
    onnx.checker.check_model(canon.model, full_check=True)
    assert canon.bn_found
    assert_same_outputs(m, canon.model)


def test_drop_noops_renames_readers_inside_bodies() -> None:
    """Identity c -> idc with idc read in a body; and an Identity from the body-read tensor
    ``c2`` to the graph output (c2 takes the output's name, so the body must follow)."""
    br1, br2 = _branch("idc", "b1", nested=True), _branch("c2", "b2")
    nodes = [
        h.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4, name="conv"),
        h.make_node("Identity", ["c"], ["idc"], name="id1"),
        h.make_node("If", ["cond"], ["side"], then_branch=br1, else_branch=br1, name="if1"),
        h.make_node("Add", ["idc", "side"], ["c2"], name="add"),
        h.make_node("If", ["cond"], ["side2"], then_branch=br2, else_branch=br2, name="if2"),
        h.make_node("Identity", ["c2"], ["out"], name="id2"),
    ]
    outs = [
        h.make_tensor_value_info("out", T.FLOAT, ["N", C, 8, 8]),
        h.make_tensor_value_info("side2", T.FLOAT, ["N", C, 8, 8]),
    ]
    m = _model(nodes, _bn_inits()[::5], outs)
    onnx.checker.check_model(m, full_check=True)
    res = run_pass(drop_noops, m)
    assert op_counts(res.model)["Identity"] == 0
    onnx.checker.check_model(res.model, full_check=True)
    assert_same_outputs(m, res.model)


def test_fold_constants_keeps_tensors_read_in_bodies() -> None:
    """A Constant and a constant Mul read only inside a body stay available to it."""
    k = nh.from_array(np.full((1, C, 1, 1), 0.5, np.float32), "kv")
    body = h.make_graph(
        [h.make_node("Mul", ["c", "k2"], ["bo"], name="body_mul")],
        "body",
        [],
        [h.make_tensor_value_info("bo", T.FLOAT, None)],
    )
    nodes = [
        h.make_node("Constant", [], ["k"], value=k, name="const"),
        h.make_node("Mul", ["k", "k"], ["k2"], name="kmul"),
        h.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4, name="conv"),
        h.make_node("If", ["cond"], ["out"], then_branch=body, else_branch=body, name="if"),
    ]
    m = _model(nodes, _bn_inits()[::5])
    onnx.checker.check_model(m, full_check=True)
    res = run_pass(fold_constants, m)
    assert op_counts(res.model)["Constant"] == 0 and op_counts(res.model)["Mul"] == 0
    onnx.checker.check_model(res.model, full_check=True)
    assert_same_outputs(m, res.model)


# ------------------------------------------------------------------------------ D4


def r6() -> onnx.ModelProto:
    """R6: an If branch defines ``input_scale`` (and more names) the top level does not."""
    body = h.make_graph(
        [
            h.make_node(
                "Constant", [], ["input_scale"], value=nh.from_array(np.ones(1, np.float32), "v")
            ),
            h.make_node("Add", ["input_scale", "bias_init"], ["bo"], name="body_node"),
        ],
        "then",
        [],
        [h.make_tensor_value_info("bo", T.FLOAT, [1])],
        [nh.from_array(np.ones(1, np.float32), "bias_init")],
        value_info=[h.make_tensor_value_info("body_vi", T.FLOAT, [1])],
    )
    nodes = [
        h.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4, name="conv"),
        h.make_node("Relu", ["c"], ["out"], name="relu"),
        h.make_node("If", ["cond"], ["side"], then_branch=body, else_branch=body, name="if"),
    ]
    outs = [
        h.make_tensor_value_info("out", T.FLOAT, ["N", C, 8, 8]),
        h.make_tensor_value_info("side", T.FLOAT, [1]),
    ]
    return _model(nodes, _bn_inits()[::5], outs)


@pytest.mark.parametrize("name", ["input_scale", "bo", "bias_init", "body_vi", "body_node"])
def test_name_allocator_reserves_names_of_every_scope(name) -> None:
    m = r6()
    onnx.checker.check_model(m, full_check=True)
    assert NameAllocator(m).fresh(name) == f"{name}_1"


def test_name_allocator_new_top_level_tensor_keeps_ssa() -> None:
    """A top-level tensor named by the allocator from a body's name keeps the model valid."""
    m = r6()
    alloc = NameAllocator(m)
    t = alloc.fresh("input_scale")
    g = m.graph
    nodes = list(g.node) + [h.make_node("Mul", ["out", t], ["out2"], name=alloc.fresh("mul"))]
    scale = nh.from_array(np.array(2.0, np.float32), t)
    m2 = rebuild(m, nodes, list(g.initializer) + [scale])
    m2.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, ["N", C, 8, 8]))
    onnx.checker.check_model(m2, full_check=True)


# ------------------------------------------------------------------------------ D5


def r5(value_info: bool = False) -> onnx.ModelProto:
    """R5: conv_bn_relu with its first Conv weight given as a sparse_initializer."""
    m = M.conv_bn_relu(batch="N")
    g = m.graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    wt = next(t for t in g.initializer if t.name == conv.input[1])
    w = nh.to_array(wt).copy()
    w[np.abs(w) < 0.3] = 0
    idx = np.flatnonzero(w).astype(np.int64)
    sp = h.make_sparse_tensor(
        nh.from_array(w.ravel()[idx], wt.name), nh.from_array(idx, "idx"), list(w.shape)
    )
    rest = [t for t in g.initializer if t.name != wt.name]
    del g.initializer[:]
    g.initializer.extend(rest)
    g.sparse_initializer.append(sp)
    if value_info:
        m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    return m


def test_sparse_to_dense_linear_and_coordinate_indices() -> None:
    dense = np.zeros((3, 4), np.float32)
    dense[0, 1], dense[2, 3] = 1.5, -2.0
    values = nh.from_array(np.array([1.5, -2.0], np.float32), "x")
    lin = h.make_sparse_tensor(values, nh.from_array(np.array([1, 11], np.int64), "i"), [3, 4])
    coo = h.make_sparse_tensor(
        values, nh.from_array(np.array([[0, 1], [2, 3]], np.int64), "i"), [3, 4]
    )
    np.testing.assert_array_equal(sparse_to_dense(lin), dense)
    np.testing.assert_array_equal(sparse_to_dense(coo), dense)


@pytest.mark.parametrize("fn", PASSES, ids=lambda f: f.__name__)
def test_every_pass_keeps_sparse_initializers(fn) -> None:
    m = r5()
    res = run_pass(fn, m)
    sparse = {t.values.name for t in res.model.graph.sparse_initializer}
    if fn is fold_batchnorm:  # folds the sparse weight into a new dense one: the old is unused
        assert not sparse
    else:
        assert sparse == {t.values.name for t in m.graph.sparse_initializer}
    assert_same_outputs(m, res.model)


@pytest.mark.parametrize("fn", PASSES, ids=lambda f: f.__name__)
def test_every_pass_keeps_value_info_of_surviving_tensors(fn) -> None:
    m = onnx.shape_inference.infer_shapes(M.conv_bn_relu(batch="N"))
    before = {v.name: v for v in m.graph.value_info}
    assert before
    res = run_pass(fn, m)
    g = res.model.graph
    alive = {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
    after = {v.name: v for v in g.value_info}
    assert set(after) == {k for k in before if k in alive}
    assert all(after[k] == before[k] for k in after)
    onnx.checker.check_model(res.model, full_check=True)  # no stale shape contradicts


def test_canonicalize_keeps_value_info_and_metadata_deterministically() -> None:
    m = onnx.shape_inference.infer_shapes(M.conv_bn_relu(batch="N"))
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.graph.node[0].doc_string = "node doc"
    h.set_model_props(m, {"k": "v"})
    canon = canonicalize(m)
    out = canon.model
    assert out.doc_string == "model doc" and out.graph.doc_string == "graph doc"
    assert out.graph.node[0].doc_string == "node doc"
    assert [(p.key, p.value) for p in out.metadata_props] == [("k", "v")]
    assert out.graph.value_info  # the tensors that survive the folds keep their shapes
    assert canonicalize(m).model.SerializeToString() == out.SerializeToString()


def test_rebuild_drops_unused_sparse_initializer_and_its_input() -> None:
    m = r5()
    g = m.graph
    name = g.sparse_initializer[0].values.name
    m.ir_version = 3  # IR<4 style: initializers listed as graph inputs too
    g.input.append(h.make_tensor_value_info(name, T.FLOAT, list(g.sparse_initializer[0].dims)))
    conv = next(n for n in g.node if n.input[1:2] == [name])
    dense = nh.from_array(np.zeros(tuple(g.sparse_initializer[0].dims), np.float32), "w_dense")
    nodes = [n for n in g.node]
    i = nodes.index(conv)
    nodes[i] = h.make_node("Conv", [conv.input[0], "w_dense", *conv.input[2:]], list(conv.output))
    out = rebuild(m, nodes, list(g.initializer) + [dense])
    assert not out.graph.sparse_initializer
    assert name not in {i.name for i in out.graph.input}
    kept = rebuild(m, g.node, g.initializer)
    assert [t.values.name for t in kept.graph.sparse_initializer] == [name]
    assert name in {i.name for i in kept.graph.input}


def test_densify_sparse_initializers() -> None:
    m = r5()
    res = run_pass(densify_sparse_initializers, m)
    g = res.model.graph
    (sp,) = m.graph.sparse_initializer
    assert not g.sparse_initializer
    dense = next(t for t in g.initializer if t.name == sp.values.name)
    np.testing.assert_array_equal(nh.to_array(dense), sparse_to_dense(sp))
    (note,) = res.notes
    assert note.fired and note.where == sp.values.name and "dense" in note.reason
    onnx.checker.check_model(res.model, full_check=True)
    assert_same_outputs(m, res.model)
    (note,) = run_pass(densify_sparse_initializers, M.conv_bn_relu()).notes
    assert not note.fired and note.reason == "none present"


def test_canonicalize_r5_densifies_and_folds() -> None:
    m = r5()
    canon = canonicalize(m)
    assert not canon.model.graph.sparse_initializer
    assert op_counts(canon.model)["BatchNormalization"] == 0 and len(canon.bn_stats) == 2
    assert any(n.pass_name == "densify_sparse" and n.fired for n in canon.notes)
    onnx.checker.check_model(canon.model, full_check=True)
    assert_same_outputs(m, canon.model)


@pytest.mark.parametrize("name", ["R2", "R2-nested", "R5", "R6"])
def test_compress_reproductions(name) -> None:
    """The review's reproductions compress end to end into a valid model."""
    import onnxlw

    m = {"R2": r2, "R2-nested": lambda: r2(True), "R5": r5, "R6": r6}[name]()
    q, _ = onnxlw.compress(m, onnxlw.Config(samples=4))
    onnx.checker.check_model(q)
