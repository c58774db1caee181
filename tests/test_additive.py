"""Additive quantization with shared codebooks: solver properties, and tiny models whose
rebuilt weights are checked exactly in onnxruntime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper

import models as M
import onnxlw
from onnxlw import Config
from onnxlw.errors import OnnxlwError
from onnxlw.ortutil import fused_conv_counts, session
from onnxlw.plan import Plan
from onnxlw.solve.additive import (
    AdditiveSpec,
    _beam,
    decode_rows,
    fit,
    layer_error,
    layer_state,
    update_books,
    update_scales,
)
from onnxlw.solve.problem import CodebookRef, QuantEncoding

SMALL = dict(samples=8, additive_min_params=500)


def model3(seed: int = 3) -> onnx.ModelProto:
    """conv 3->16 (K=27: padded vectors), conv 16->32, grouped conv 32->32 (g=2), GAP, Gemm,
    MatMul: every op and layout the codes rebuild."""
    b = M.Builder(seed, 17)
    y = b.conv_bn_relu("input", 3, 16)
    y = b.conv_bn_relu(y, 16, 32)
    y = b.conv_bn_relu(y, 32, 32, group=2)
    f = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    w = b.init("fc_w", (b.rng.standard_normal((24, 32)) * 0.3).astype(np.float32))
    y = b.node("Gemm", [f, w, b.init("fc_b", np.zeros(24, np.float32))], transB=1)
    y = b.node("Relu", [y])
    w2 = b.init("mm_w", (b.rng.standard_normal((24, 40)) * 0.3).astype(np.float32))
    y = b.node("MatMul", [y, w2])
    return b.model([("input", ["N", 3, 12, 12])], [("output", y, ["N", 40])])


def correlated(o: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((3000, k)) @ a + 0.3 * rng.standard_normal((3000, k))
    return rng.standard_normal((1, o, k)), np.cov(x.T)[None]


def prototypes() -> np.ndarray:
    """Weights (1, 32, 64) whose 8-vectors are 4 prototypes, each row holding every one
    twice (so the row scales are equal and the normalized vectors are 4 points)."""
    proto = np.random.default_rng(4).standard_normal((4, 8))
    rng = np.random.default_rng(5)
    return np.stack([proto[rng.permutation(np.arange(8) % 4)] for _ in range(32)]).reshape(
        1, 32, 64)


def states(spec: AdditiveSpec, seed: int = 0) -> tuple[list, list]:
    probs = [correlated(32, 96, seed), correlated(48, 64, seed + 1)]
    return probs, [layer_state(w, h, np.arange(w.shape[2]), spec) for w, h in probs]


def true_error(probs: list, lays: list, books: np.ndarray) -> float:
    """Summed relative output error on the undamped covariances."""
    err = sig = 0.0
    for (w, h), lay in zip(probs, lays, strict=True):
        v = decode_rows(lay.codes, books).reshape(lay.w.shape)[..., : w.shape[2]]
        e = w - v * lay.s[..., None]
        err += float((np.matmul(e, h) * e).sum())
        sig += float((np.matmul(w, h) * w).sum())
    return err / sig


# ------------------------------------------------------------------------------ solvers


def test_output_objective_beats_weight_objective_on_correlated_inputs() -> None:
    errs = {}
    for obj in ("weight", "output"):
        spec = AdditiveSpec(books=2, dim=8, objective=obj, rounds=2, seed=1)
        probs, lays = states(spec)
        (books,), _ = fit(lays, spec)
        errs[obj] = true_error(probs, lays, books)
    # measured 10 log10 ratio about 1.5 dB on this case
    assert errs["output"] < 0.85 * errs["weight"]


def test_every_step_of_the_alternation_lowers_the_objective() -> None:
    spec = AdditiveSpec(books=2, dim=8, rounds=2, seed=2)
    _, lays = states(spec, 4)
    (books,), hist = fit(lays, spec)
    for r in hist:
        assert r["books"] <= r["codes"] + 1e-12  # codebook least squares never hurts
    # the scales are least-squares optimal per row: perturbing them costs
    lay = lays[0]
    base = layer_error(lay, books)[0]
    for f in (0.97, 1.03):
        moved = dataclasses.replace(lay, s=lay.s * f)
        assert layer_error(moved, books)[0] > base
    s = update_scales(lay, books)
    assert layer_error(dataclasses.replace(lay, s=s), books)[0] <= base * (1 + 1e-3)


def test_codebook_update_solves_the_normal_equations() -> None:
    """With H = I and one book, the least-squares codeword is the mean of its vectors."""
    spec = AdditiveSpec(books=1, dim=4, objective="weight", code_bits=3, seed=0)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((1, 16, 32))
    lay = layer_state(w, np.eye(32)[None], np.arange(32), spec)
    lay.s = np.ones_like(lay.s)
    lay.codes = rng.integers(0, 8, (1, 16, 8)).astype(np.uint8)
    books = update_books([lay], np.zeros((1, 8, 4), np.float32), spec, iters=100)
    vecs = w.reshape(-1, 4)
    for e in range(8):
        np.testing.assert_allclose(books[0, e], vecs[lay.codes.ravel() == e].mean(axis=0),
                                   atol=1e-4)


def test_beam_search_finds_the_exhaustive_optimum_more_often_than_greedy() -> None:
    rng = np.random.default_rng(6)
    books = rng.standard_normal((2, 16, 4))
    t = rng.standard_normal((400, 4))
    sums = (books[0][:, None, :] + books[1][None, :, :]).reshape(-1, 4)
    best = ((t[:, None, :] - sums[None]) ** 2).sum(-1).min(axis=1)

    def cost(c: np.ndarray) -> np.ndarray:
        return ((t - books[0][c[:, 0]] - books[1][c[:, 1]]) ** 2).sum(-1)

    greedy, beam = cost(_beam(t, books, 1)), cost(_beam(t, books, 8))
    assert np.all(beam >= best - 1e-9)
    assert np.mean(np.isclose(beam, best)) > np.mean(np.isclose(greedy, best))
    assert beam.mean() <= greedy.mean()


# ------------------------------------------------------------------------------ onnx


def rebuilt(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of ``names`` as onnxruntime computes them (no graph optimization)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = session(m, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    x = np.zeros((1, 3, 12, 12), np.float32)
    out = sess.run(names, {"input": x})
    return dict(zip(names, out, strict=True))


def weight_inputs(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Layer node name -> (op, the tensor its weight is rebuilt into, before a DQ if any)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            w = n.input[1]
            if w in prod and prod[w].op_type == "DequantizeLinear":
                w = prod[w].input[0]
            out[n.name] = (n.op_type, w)
    return out


def as_matrix(op: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An ONNX weight tensor as the plan's (G, O, K) matrix."""
    return w.T[None] if op == "MatMul" else w.reshape(shape)


def assert_rebuilt_exactly(out: onnx.ModelProto, plan: Plan) -> None:
    """Every layer's weight, as onnxruntime rebuilds it, equals the plan's bit for bit."""
    names = weight_inputs(out)
    got = rebuilt(out, [t for _, t in names.values()])
    by_node = {n: i for i, n in plan.layer_names.items()}
    for node, (op, tensor) in names.items():
        sol = plan.layers[by_node[node]]
        np.testing.assert_array_equal(as_matrix(op, got[tensor], sol.weight.shape), sol.weight)


@pytest.mark.parametrize("layout", ["channels", "kernel"])
def test_float_output_rebuilds_the_plan_weights_exactly(layout: str) -> None:
    model = model3()
    cfg = Config(additive=2, quantize=False, additive_layout=layout, **SMALL)
    out, rep = onnxlw.compress(model, cfg)
    plan = rep.plan
    assert_rebuilt_exactly(out, plan)
    kinds = {type(sol.encoding).__name__ for sol in plan.layers.values()}
    assert kinds == {"CodebookRef", "QuantEncoding"}  # the first conv stays 8-bit
    # every float initializer left is small (biases, codebooks): no dead FP32 weights
    big = [t.name for t in out.graph.initializer
           if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 2048]
    assert big == []
    # one codebook set, stored once
    assert len(plan.codebooks) == 1
    books = [t for t in out.graph.initializer if "book" in t.name]
    used = max(s.encoding.codes.shape[0] for s in plan.layers.values()
               if isinstance(s.encoding, CodebookRef))
    assert len(books) == used  # each book once, however many layers read it


def test_qdq_output_rebuilds_int8_levels_exactly_and_every_conv_fuses() -> None:
    model = model3()
    out, rep = onnxlw.compress(model, Config(additive=2, **SMALL))
    plan = rep.plan
    names = weight_inputs(out)
    got = rebuilt(out, [t for _, t in names.values()])
    by_node = {n: i for i, n in plan.layer_names.items()}
    coded = 0
    for node, (op, tensor) in names.items():
        enc = plan.layers[by_node[node]].encoding
        q = enc.quant if isinstance(enc, CodebookRef) else enc
        assert isinstance(q, QuantEncoding) and got[tensor].dtype == np.int8
        np.testing.assert_array_equal(as_matrix(op, got[tensor], q.q.shape), q.q)
        coded += isinstance(enc, CodebookRef)
    assert coded >= 3
    qconv, fconv = fused_conv_counts(out)
    assert qconv == 3 and fconv == 0
    assert rep.validation.sqnr_db > 10


def test_additive_file_is_smaller_than_int4_and_reports_bits() -> None:
    model = M.Builder(9, 17)
    y = model.conv_bn_relu("input", 3, 32)
    y = model.conv_bn_relu(y, 32, 64)
    y = model.conv_bn_relu(y, 64, 64)
    m = model.model([("input", ["N", 3, 12, 12])], [("output", y, ["N", 64, 12, 12])])
    a2, rep = onnxlw.compress(m, Config(additive=2, quantize=False, samples=8))
    w4, _ = onnxlw.compress(m, Config(weight_bits=4, samples=8))
    # the 16 kB codebooks are shared by the whole network; in this tiny one, count them apart
    assert a2.ByteSize() - rep.codebook_storage["codebook_bytes"] < 0.75 * w4.ByteSize()
    text = rep.summary()
    assert "additive codes" in text and "codebook storage" in text
    coded = [r for r in rep.layers if r.stats.get("bits_per_weight", 8) < 8]
    assert len(coded) == 2 and all(2 <= r.stats["bits_per_weight"] < 2.2 for r in coded)


def test_plan_round_trip_and_worker_count_give_the_same_bytes(tmp_path) -> None:  # noqa: ANN001
    model = model3(5)
    cfg = Config(additive=2, **SMALL)
    out1, rep = onnxlw.compress(model, cfg)
    path = tmp_path / "plan.npz"
    rep.plan.save(path)
    out2, _ = onnxlw.compress(model, cfg, plan=Plan.load(path))
    assert out1.SerializeToString() == out2.SerializeToString()
    out3, _ = onnxlw.compress(model, dataclasses.replace(cfg, workers=1))
    assert out1.graph.SerializeToString() == out3.graph.SerializeToString()  # options differ


def test_per_layer_codebooks_are_one_set_per_coded_layer() -> None:
    out, rep = onnxlw.compress(model3(), Config(additive=2, quantize=False,
                                                additive_scope="layer", **SMALL))
    coded = [s for s in rep.plan.layers.values() if isinstance(s.encoding, CodebookRef)]
    assert len(rep.plan.codebooks) == len(coded) >= 3
    assert rep.validation.sqnr_db > 5


@pytest.mark.parametrize(
    "kw",
    [dict(additive=0.5), dict(additive=2.3, additive_books=2), dict(additive=2, prune="0.5"),
     dict(additive=2, weight_bits=4), dict(additive=2, size_budget=0.1),
     dict(additive=2, additive_scope="global"), dict(additive=2, additive_code_bits=9)],
)
def test_bad_additive_options_are_refused(kw: dict) -> None:
    with pytest.raises(OnnxlwError):
        Config(**kw)


def test_cli_additive_keeps_float_activations_unless_act_bits_given(tmp_path) -> None:  # noqa: ANN001
    from onnxlw.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(model3(), src)
    for extra, qdq in (([], False), (["--act-bits", "8"], True)):
        dst = tmp_path / f"o{qdq}.onnx"
        rc = main(["compress", str(src), "-o", str(dst), "--additive", "2", "--samples", "8",
                   *extra])
        assert rc == 0
        ops = {n.op_type for n in onnx.load(dst).graph.node}
        assert ("QuantizeLinear" in ops) == qdq
    assert main(["compress", str(src), "-o", str(tmp_path / "x.onnx"), "--additive", "0.5"]) == 2


@pytest.mark.parametrize("code_bits", [4, 6])
def test_small_codebooks_are_packed_and_rebuilt_exactly(code_bits: int) -> None:
    model = model3(7)
    cfg = Config(additive=2, quantize=False, additive_code_bits=code_bits,
                 additive_dim=code_bits, additive_scope="layer", **SMALL)
    out, rep = onnxlw.compress(model, cfg)
    assert_rebuilt_exactly(out, rep.plan)
    codes = sum(s.codes.size for s in (x.encoding for x in rep.plan.layers.values())
                if isinstance(s, CodebookRef))
    stored = sum(t.ByteSize() for t in out.graph.initializer if t.name.endswith("_codes"))
    # 4-bit codes two to a byte; 6-bit codes one byte each
    assert stored < codes * (0.6 if code_bits == 4 else 1.2)
    assert stored > codes * (0.45 if code_bits == 4 else 0.95)


def test_fractional_bits_mix_book_counts_by_sensitivity_and_meet_the_mean() -> None:
    out, rep = onnxlw.compress(model3(11), Config(additive=2.5, quantize=False,
                                                  additive_spread=0, **SMALL))
    coded = {i: s for i, s in rep.plan.layers.items() if isinstance(s.encoding, CodebookRef)}
    counts = {i: s.encoding.codes.shape[0] for i, s in coded.items()}
    assert set(counts.values()) == {2, 3}
    n = {i: s.weight.size for i, s in coded.items()}
    mean = sum(counts[i] * n[i] for i in coded) / sum(n.values())
    assert mean <= 2.5 + 1e-9
    assert_rebuilt_exactly(out, rep.plan)
    assert sum("book" in t.name for t in out.graph.initializer) == 3  # the set, stored once


def test_allocation_gives_the_extra_book_where_it_pays() -> None:
    """Two layers of equal size; the second's vectors are 4 prototypes (two books already
    hold them): with room for one extra book, the first layer gets it."""
    spec = AdditiveSpec(books=3, target_bits=2.5 * 4 / 8, code_bits=4, dim=8, rounds=1, seed=3)
    (w1, h1), (_, h2) = correlated(32, 64, 1), correlated(32, 64, 2)
    w2 = prototypes()
    for order in ((0, 1), (1, 0)):  # not a matter of position
        pair = [(w1, h1), (w2, h2)]
        lays = [layer_state(*pair[i], np.arange(64), spec) for i in order]
        fit(lays, spec)
        assert lays[order.index(0)].books == 3 and lays[order.index(1)].books == 2


def test_spread_lets_layers_take_one_book_less_or_more_within_the_mean() -> None:
    """Mean 2 books, spread 1: the layer of 4 prototypes needs one book, the random one
    gets three."""
    spec = AdditiveSpec(books=3, target_bits=1.0, code_bits=4, dim=8, rounds=1, seed=3,
                        spread=1)
    assert (spec.min_books, spec.books) == (1, 3)
    (w1, h1), (_, h2) = correlated(32, 64, 1), correlated(32, 64, 2)
    lays = [layer_state(w1, h1, np.arange(64), spec),
            layer_state(prototypes(), h2, np.arange(64), spec)]
    fit(lays, spec)
    assert [lay.books for lay in lays] == [3, 1]
    assert [lay.codes.shape[0] for lay in lays] == [3, 1]


def test_per_layer_books_are_allocated_over_all_layers() -> None:
    """Each layer with its own books still meets the mean book count across layers."""
    spec = AdditiveSpec(books=3, target_bits=1.0, code_bits=4, dim=8, rounds=1, seed=3,
                        spread=1)
    probs = [correlated(32, 64, s) for s in (1, 2, 3)]
    lays = [layer_state(w, h, np.arange(64), spec) for w, h in probs]
    sets, _ = fit(lays, spec, shared=False)
    assert len(sets) == 3 and all(b.shape == (3, 16, 8) for b in sets)
    assert sum(lay.books for lay in lays) <= 6
    assert all(lay.codes.shape[0] == lay.books for lay in lays)


def test_without_bn_statistics_auto_fits_the_weight_error_and_says_why() -> None:
    _, rep = onnxlw.compress(M.bn_folded(), Config(additive=2, quantize=False, samples=8,
                                                   additive_min_params=256))
    assert rep.additive["objective"] == "weight"
    assert "no BN statistics" in rep.summary()
    _, rep = onnxlw.compress(model3(), Config(additive=2, quantize=False, **SMALL))
    assert rep.additive["objective"] == "output"
