"""The numpy solvers (no ONNX): weight scales, bias correction, the u8s8 pair guard, activation
ranges and im2col patches, each checked against real numbers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxlw.solve import LayerProblem, QuantSpec, choose_range, fake_quant, solve_weights
from onnxlw.solve.patches import conv_patches, dense_rows
from onnxlw.solve.ranges import affine_params
from onnxlw.solve.weights import limit_pairs

K, NOUT = 36, 16


class Layer:
    """A dense layer y = W x + b with correlated, offset inputs and heavy-tailed weights."""

    def __init__(self, seed: int, k: int = K, o: int = NOUT) -> None:
        rng = np.random.default_rng(seed)
        # random mixing plus a shared factor: strongly correlated input channels
        self.mix = rng.standard_normal((k, k)) / np.sqrt(k) + 0.8 / k
        self.offset = rng.uniform(0.5, 1.5, k)  # non-zero mean (post-activation-like)
        self.w = (rng.standard_t(3, (o, k)) * 0.1).astype(np.float32)  # heavy tails
        self.b = rng.normal(0, 0.1, o).astype(np.float32)
        self.k = k
        self.seed = seed

    def draw(self, m: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((m, self.k))
        return (z @ self.mix + self.offset).astype(np.float32)

    def solve(self, x: np.ndarray, **spec) -> tuple:
        xq = spec.pop("xq", None)
        order = spec.pop("pair_order", None)
        xq3 = xq[:, None, :] if xq is not None and xq.ndim == 2 else xq
        p = LayerProblem.from_samples(
            self.w[None], x[:, None, :], bias=self.b[None], xq=xq3, pair_order=order
        )
        qs = QuantSpec(**spec)
        s = Sol(solve_weights(p, qs), self.w[None], self.b[None], qs.qmax)
        return s, s.dequantized()[0].astype(np.float64), s.bias[0].astype(np.float64)


class Sol:
    """A LayerSolution with a quantized encoding, seen through the old field names."""

    def __init__(self, sol, w: np.ndarray, b: np.ndarray | None, qmax: int) -> None:  # noqa: ANN001
        enc = sol.encoding
        self.solution = sol
        self.q, self.scale, self.bias = enc.q, enc.scale, sol.bias
        self.sqnr_db = sol.stats["sqnr_db"]
        self.sqnr_minmax_db = sol.stats["sqnr_minmax_db"]
        self.saturation_fixes = sol.stats["saturation_fixes"]
        self.bias_shift = sol.bias - (b if b is not None else 0)
        base = np.abs(w).max(axis=2) / qmax
        self.clip = self.scale / np.where(base > 0, base, 1)

    def dequantized(self) -> np.ndarray:
        """q * scale, shape (G, O, K); equals the solution's float weight."""
        d = self.q * self.scale[..., None]
        np.testing.assert_allclose(d, self.solution.weight, rtol=1e-6)
        return d


def out_err(w: np.ndarray, wq: np.ndarray, x: np.ndarray) -> float:
    """E ||(W - Wq) x||^2 over the rows of x."""
    d = x.astype(np.float64) @ (w.astype(np.float64) - wq).T
    return float(np.mean(np.sum(d**2, axis=1)))


# ------------------------------------------------------------------------------ weight scales


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_mse_scale_beats_minmax_on_held_out(seed) -> None:
    layer = Layer(seed)
    x, held_out = layer.draw(4096, seed + 10), layer.draw(4096, seed + 20)
    _, wq_mse, _ = layer.solve(x, scale_method="output-mse", bias_correction="none")
    _, wq_mm, _ = layer.solve(x, scale_method="minmax", bias_correction="none")
    e_mse, e_mm = out_err(layer.w, wq_mse, held_out), out_err(layer.w, wq_mm, held_out)
    assert e_mse < 0.9 * e_mm, (e_mse, e_mm)


def test_output_mse_scale_beats_minmax_after_bias_correction() -> None:
    """With bias correction the objective is the centered error: compare whole outputs."""
    layer = Layer(3)
    x, held_out = layer.draw(4096, 30), layer.draw(4096, 31)
    ref = held_out @ layer.w.T.astype(np.float64) + layer.b
    errs = {}
    for method in ("output-mse", "minmax"):
        _, wq, bq = layer.solve(x, scale_method=method, bias_correction="weights")
        errs[method] = float(np.mean(np.sum((ref - (held_out @ wq.T + bq)) ** 2, axis=1)))
    assert errs["output-mse"] < errs["minmax"], errs


def test_reported_sqnr_matches_measured_error() -> None:
    layer = Layer(4)
    x = layer.draw(4096, 40)
    s, wq, _ = layer.solve(x, scale_method="output-mse", bias_correction="none")
    sig = float(np.mean(np.sum((x.astype(np.float64) @ layer.w.T.astype(np.float64)) ** 2, 1)))
    measured = 10 * np.log10(sig / out_err(layer.w, wq, x))
    assert s.sqnr_db == pytest.approx(measured, abs=0.05)
    assert s.sqnr_db > s.sqnr_minmax_db
    _, wq_mm, _ = layer.solve(x, scale_method="minmax", bias_correction="none")
    measured_mm = 10 * np.log10(sig / out_err(layer.w, wq_mm, x))
    assert s.sqnr_minmax_db == pytest.approx(measured_mm, abs=0.05)


# ------------------------------------------------------------------------------ bias correction


@pytest.mark.parametrize("method", ["output-mse", "minmax"])
@pytest.mark.parametrize("correction", ["weights", "full"])
def test_bias_correction_removes_mean_output_shift(method, correction) -> None:
    layer = Layer(5)
    x = layer.draw(2048, 50)
    xd = x.astype(np.float64)
    ref = xd @ layer.w.T.astype(np.float64) + layer.b
    scale = float(np.sqrt(np.mean(ref**2)))

    def shift(wq: np.ndarray, bq: np.ndarray) -> float:
        return float(np.abs(np.mean(ref - (xd @ wq.T + bq), axis=0)).max()) / scale

    s, wq, bq = layer.solve(x, scale_method=method, bias_correction=correction)
    uncorrected = layer.b.astype(np.float64)  # the same weights with the original bias
    assert shift(wq, bq) < 1e-6
    assert shift(wq, uncorrected) > 1e-3
    assert shift(wq, uncorrected) > 1e4 * shift(wq, bq)
    np.testing.assert_allclose(s.bias_shift[0], bq - layer.b, atol=1e-6)
    _, wq0, bq0 = layer.solve(x, scale_method=method, bias_correction="none")
    np.testing.assert_array_equal(bq0, layer.b)  # no correction: bias untouched
    assert shift(wq0, bq0) > 1e4 * shift(wq, bq)
    if method == "minmax":  # the correction changes only the bias
        np.testing.assert_array_equal(wq, wq0)


def test_full_bias_correction_accounts_for_input_quantization() -> None:
    """'full' removes the mean shift of W x + b -> Wq Q(x) + b', Q the activation quantizer."""
    layer = Layer(6)
    x = layer.draw(2048, 60)
    r = choose_range(x, method="minmax")
    xq = fake_quant(x * 1.02, r.scale, r.zero_point)  # a deliberately biased quantizer
    _, wq, bq = layer.solve(x, xq=xq[:, None, :], bias_correction="full")
    _, _, bw = layer.solve(x, xq=xq[:, None, :], bias_correction="weights")
    xd, xqd = x.astype(np.float64), xq.astype(np.float64)
    ref = xd @ layer.w.T.astype(np.float64) + layer.b
    scale = float(np.sqrt(np.mean(ref**2)))
    full = np.abs(np.mean(ref - (xqd @ wq.T + bq), axis=0)).max() / scale
    weights_only = np.abs(np.mean(ref - (xqd @ wq.T + bw), axis=0)).max() / scale
    assert full < 1e-6
    assert weights_only > 1e-3


# ------------------------------------------------------------------------------ solution levels


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", ["output-mse", "minmax"])
def test_solution_levels_and_scales(bits, method) -> None:
    layer = Layer(7)
    x = layer.draw(1024, 70)
    s, wq, _ = layer.solve(x, bits=bits, scale_method=method)
    qmax = 2 ** (bits - 1) - 1
    assert s.q.dtype == np.int8 and s.q.shape == (1, NOUT, K)
    assert s.q.min() >= -qmax and s.q.max() <= qmax
    assert s.q.max() == qmax or s.q.min() == -qmax  # the range is used
    assert s.scale.shape == (1, NOUT) and np.isfinite(s.scale).all() and (s.scale > 0).all()
    assert s.bias.shape == (1, NOUT)
    np.testing.assert_allclose(wq, s.q[0] * s.scale[0, :, None].astype(np.float64), rtol=1e-6)
    # scale search never goes past max|w| / qmax (no clipping ratio above 1 without the guard)
    assert (s.clip <= 1.0 + 1e-6).all() and (s.clip >= 0.5 - 1e-6).all()
    if method == "minmax":
        np.testing.assert_allclose(s.scale[0], np.abs(layer.w).max(axis=1) / qmax, rtol=1e-6)


def test_zero_weight_row_is_harmless() -> None:
    layer = Layer(8)
    layer.w[3] = 0.0
    s, wq, _ = layer.solve(layer.draw(512, 80))
    assert (s.q[0, 3] == 0).all() and np.isfinite(s.scale).all() and (s.scale > 0).all()


# ------------------------------------------------------------------------------ pair guard


def _violations(pairs: np.ndarray, limit: int = 128) -> np.ndarray:
    """(…, 2) integer pairs -> bool: positive or negative part beyond ``limit``."""
    pos = np.clip(pairs, 0, None).sum(-1)
    neg = np.clip(pairs, None, 0).sum(-1)
    return (pos > limit) | (neg < -limit)


def _closest_feasible(r: np.ndarray, limit: int = 128, qmax: int = 127) -> float:
    """Brute force: smallest squared distance from r (2,) to a feasible integer pair."""
    g = np.arange(-qmax, qmax + 1)
    a, b = np.meshgrid(g, g, indexing="ij")
    cand = np.stack([a, b], -1).reshape(-1, 2)
    cand = cand[~_violations(cand, limit)]
    return float(((cand - r) ** 2).sum(-1).min())


@pytest.mark.parametrize(
    ("r", "expect"),
    [
        ((100.2, 49.9), (89, 39)),  # excess 22.1 split evenly: 100.2 - 11.05 = 89.15
        ((-100.2, -49.9), (-89, -39)),  # same for negative pairs
        ((70.4, 70.4), (64, 64)),
        ((140.0, 10.0), (127, 1)),  # clipped weight: na capped at qmax
        ((10.0, 126.9), (6, 122)),
        ((64.0, 64.0), (64, 64)),  # exactly at the limit: untouched
        ((127.0, -127.0), (127, -127)),  # mixed signs never overflow: untouched
        ((120.0, 3.0), (120, 3)),
    ],
)
def test_limit_pairs_hand_cases(r, expect) -> None:
    r = np.array([r], np.float64)
    q = np.clip(np.rint(r), -127, 127)
    out, changed = limit_pairs(q, r, 128, 127)
    assert tuple(int(v) for v in out[0]) == expect
    assert changed == int(tuple(q[0]) != expect)
    assert ((out[0] - r[0]) ** 2).sum() == pytest.approx(_closest_feasible(r[0]))


def test_limit_pairs_random_properties() -> None:
    rng = np.random.default_rng(0)
    r = rng.uniform(-135, 135, (6, 40, 2))
    r[..., 1] = np.where(rng.random((6, 40)) < 0.5, r[..., 1], np.sign(r[..., 0]) * 64)
    q = np.clip(np.rint(r), -127, 127)
    out, changed = limit_pairs(q, r, 128, 127)
    before = _violations(q)
    assert before.sum() > 20  # the test data does exercise the guard
    assert changed == before.sum()
    assert not _violations(out).any()
    np.testing.assert_array_equal(out[~before], q[~before])  # untouched pairs are unchanged
    assert np.abs(out).max() <= 127 and (out == np.rint(out)).all()
    assert (np.sign(out[before]) == np.sign(q[before])).all()
    for idx in zip(*np.nonzero(before), strict=True):  # each fixed pair is the closest feasible
        d = ((out[idx] - r[idx]) ** 2).sum()
        assert d == pytest.approx(_closest_feasible(r[idx]), abs=1e-9)


def _big_same_sign_layer(seed: int) -> Layer:
    """Weights whose neighbours often share sign and are near max|w|: pairs overflow."""
    layer = Layer(seed)
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.6, 1.0, layer.w.shape)
    sign = np.repeat(np.where(rng.random((NOUT, K // 2)) < 0.5, -1.0, 1.0), 2, axis=1)
    layer.w = (mag * sign).astype(np.float32)
    return layer


@pytest.mark.parametrize("method", ["output-mse", "minmax"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_solve_weights_respects_pair_order(method, shuffle) -> None:
    layer = _big_same_sign_layer(9)
    x, held_out = layer.draw(1024, 90), layer.draw(1024, 91)
    order = np.random.default_rng(9).permutation(K) if shuffle else np.arange(K)
    free, _, _ = layer.solve(x, scale_method=method, bias_correction="none")
    assert _violations(free.q[0][:, order].reshape(NOUT, K // 2, 2)).sum() > 10  # needs the guard
    s, wq, _ = layer.solve(x, scale_method=method, bias_correction="none", pair_order=order)
    assert not _violations(s.q[0][:, order].reshape(NOUT, K // 2, 2)).any()
    assert np.abs(s.q).max() <= 127 and (s.scale > 0).all()
    assert s.clip.max() <= 2.0 + 1e-6  # the guard's search stops at twice max|w| / qmax
    if method == "output-mse":  # the searched scale still beats the guarded max|w| reference
        _, wq_mm, _ = layer.solve(
            x, scale_method="minmax", bias_correction="none", pair_order=order
        )
        assert out_err(layer.w, wq, held_out) < 0.8 * out_err(layer.w, wq_mm, held_out)


def test_pair_guard_odd_k_leaves_last_weight_unpaired() -> None:
    layer = _big_same_sign_layer(12)
    layer.w = layer.w[:, :-1].copy()
    layer.k = K - 1
    layer.mix = layer.mix[:-1, :-1]
    layer.offset = layer.offset[:-1]
    x = layer.draw(512, 120)
    order = np.arange(K - 1)
    s, _, _ = layer.solve(x, pair_order=order)
    assert s.q.shape == (1, NOUT, K - 1)
    assert not _violations(s.q[0][:, : K - 2].reshape(NOUT, (K - 2) // 2, 2)).any()


def test_pair_guard_costs_little_on_ordinary_layers() -> None:
    layer = Layer(10)
    x, held_out = layer.draw(2048, 100), layer.draw(2048, 101)
    _, wq_free, _ = layer.solve(x, bias_correction="none")
    s, wq_g, _ = layer.solve(x, bias_correction="none", pair_order=np.arange(K))
    assert not _violations(s.q[0].reshape(NOUT, K // 2, 2)).any()
    assert out_err(layer.w, wq_g, held_out) < 1.5 * out_err(layer.w, wq_free, held_out)


# ------------------------------------------------------------------------------ activation ranges


def _qmse(v: np.ndarray, r) -> float:  # noqa: ANN001 - ActRange
    return float(np.mean((fake_quant(v, r.scale, r.zero_point).astype(np.float64) - v) ** 2))


@pytest.mark.parametrize("dist", ["laplace", "student-t3", "relu-laplace"])
def test_mse_range_beats_minmax_on_heavy_tails(dist) -> None:
    rng = np.random.default_rng(0)
    lo_bound = None
    if dist == "laplace":
        v = rng.laplace(0.0, 1.0, 50_000)
    elif dist == "student-t3":
        v = rng.standard_t(3, 50_000)
    else:
        v, lo_bound = np.maximum(rng.laplace(0.2, 1.0, 50_000), 0.0), 0.0
    v = v.astype(np.float32)
    mse = choose_range(v, method="mse", lo_bound=lo_bound)
    mm = choose_range(v, method="minmax", lo_bound=lo_bound)
    assert mm.lo == pytest.approx(min(float(v.min()), 0.0)) and mm.hi == pytest.approx(v.max())
    assert mse.hi < mm.hi and (mse.lo > mm.lo or lo_bound == 0.0)  # the tails are clipped
    assert _qmse(v, mse) < (0.9 if dist == "laplace" else 0.99) * _qmse(v, mm)
    # and it is (near) the best range: brute force over a grid of real fake-quant errors
    fr = np.linspace(0.3, 1.0, 25)
    los = [0.0] if lo_bound == 0.0 else float(v.min()) * fr
    best = min(
        _qmse(v, choose_range(np.array([lo, hi], np.float32), method="minmax"))
        for lo in los
        for hi in float(v.max()) * fr
    )
    assert _qmse(v, mse) < 1.03 * best


def test_mse_range_close_to_minmax_on_uniform() -> None:
    v = np.random.default_rng(1).uniform(-1.0, 3.0, 100_000).astype(np.float32)
    r = choose_range(v, method="mse")
    assert r.lo == pytest.approx(float(v.min()), rel=0.03)
    assert r.hi == pytest.approx(float(v.max()), rel=0.03)
    assert _qmse(v, r) <= 1.05 * _qmse(v, choose_range(v, method="minmax"))


@pytest.mark.parametrize("method", ["mse", "minmax"])
@pytest.mark.parametrize("data", ["normal", "positive", "negative", "relu", "clip6", "constant"])
def test_range_invariants(method, data) -> None:
    rng = np.random.default_rng(2)
    lo_bound = hi_bound = None
    if data == "normal":
        v = rng.normal(0.5, 2.0, 50_000)
    elif data == "positive":
        v = rng.uniform(1.0, 3.0, 50_000)
    elif data == "negative":
        v = -rng.uniform(1.0, 3.0, 50_000)
    elif data == "relu":  # absorbed Relu: values synthesized after it, range must start at 0
        v, lo_bound = np.maximum(rng.normal(0.3, 1.0, 50_000), 0), 0.0
    elif data == "clip6":
        v, lo_bound, hi_bound = np.clip(rng.normal(3.0, 3.0, 50_000), 0, 6), 0.0, 6.0
    else:
        v = np.full(1000, 0.0)
    v = v.astype(np.float32)
    r = choose_range(v, method=method, lo_bound=lo_bound, hi_bound=hi_bound)
    assert r.lo <= 0.0 <= r.hi
    assert r.scale > 0 and 0 <= r.zero_point <= 255 and isinstance(r.zero_point, int)
    assert fake_quant(np.zeros(3, np.float32), r.scale, r.zero_point).tolist() == [0.0] * 3
    if lo_bound == 0.0:
        assert r.lo == 0.0 and r.zero_point == 0
    if hi_bound is not None:
        assert r.hi <= hi_bound
    if data == "positive":
        assert r.lo == 0.0 and r.zero_point == 0
    if data == "negative":
        assert r.hi == 0.0 and r.zero_point == 255
    if data != "constant":  # the quantized range covers [lo, hi] to within one step
        assert r.scale * (0 - r.zero_point) == pytest.approx(r.lo, abs=r.scale)
        assert r.scale * (255 - r.zero_point) == pytest.approx(r.hi, abs=r.scale)


@pytest.mark.parametrize(
    ("lo", "hi"), [(-1.0, 3.0), (0.0, 6.0), (-2.5, 0.0), (-0.013, 7.7), (0.2, 1.0), (-3.0, -1.0)]
)
def test_affine_params_zero_is_exact(lo, hi) -> None:
    scale, zp = affine_params(lo, hi)
    assert isinstance(zp, int) and 0 <= zp <= 255 and scale > 0
    assert float(np.rint(0.0 / scale) + zp) == zp  # 0 quantizes to the zero point ...
    assert scale * (zp - zp) == 0.0  # ... which dequantizes to exactly 0
    assert fake_quant(np.array([0.0], np.float32), scale, zp)[0] == 0.0
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    assert scale == pytest.approx((hi0 - lo0) / 255)
    assert scale * -zp == pytest.approx(lo0, abs=scale / 2 + 1e-12)
    assert scale * (255 - zp) == pytest.approx(hi0, abs=scale / 2 + 1e-12)


def test_fake_quant_rounds_half_to_even_and_saturates() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0], np.float32)
    out = fake_quant(x, 1.0, 128)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, 127.0, -128.0]


# ------------------------------------------------------------------------------ conv patches


def conv_ref(x, w, strides, pads, dilations, group) -> np.ndarray:  # noqa: ANN001
    """Direct 2-D convolution (cross-correlation) in numpy, NCHW / OIHW, no bias."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = strides
    pt, pl, pb, pr = pads
    dh, dw = dilations
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = o // group
    out = np.zeros((n, o, oh, ow))
    for g, i, j in itertools.product(range(group), range(kh), range(kw)):
        tap = xp[
            :,
            g * cg : (g + 1) * cg,
            i * dh : i * dh + sh * (oh - 1) + 1 : sh,
            j * dw : j * dw + sw * (ow - 1) + 1 : sw,
        ]
        out[:, g * og : (g + 1) * og] += np.einsum(
            "nchw,oc->nohw", tap, w[g * og : (g + 1) * og, :, i, j]
        )
    return out


CONV_CASES = {
    "3x3-s1-p1": dict(c=4, o=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=1),
    "3x3-s2-p1": dict(c=4, o=6, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), group=1),
    "asym-pads": dict(c=3, o=5, k=(3, 3), strides=(2, 2), pads=(0, 1, 1, 0), dil=(1, 1), group=1),
    "dilation2": dict(c=4, o=4, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), group=1),
    "group2": dict(c=6, o=4, k=(3, 3), strides=(1, 2), pads=(1, 1, 1, 1), dil=(1, 1), group=2),
    "depthwise": dict(c=5, o=5, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), group=5),
    "depthwise-x2": dict(
        c=4, o=8, k=(5, 5), strides=(1, 1), pads=(2, 2, 2, 2), dil=(1, 1), group=4
    ),
    "rect-kernel": dict(c=3, o=4, k=(3, 1), strides=(1, 1), pads=(1, 0, 1, 0), dil=(2, 1), group=1),
    "1x1-s2": dict(c=4, o=6, k=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0), dil=(1, 1), group=1),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_patches_times_weights_is_the_convolution(case) -> None:
    p = CONV_CASES[case]
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, p["c"], 9, 10)).astype(np.float32)
    w = rng.standard_normal((p["o"], p["c"] // p["group"], *p["k"])).astype(np.float32)
    ref = conv_ref(x, w, p["strides"], p["pads"], p["dil"], p["group"])
    n, o, oh, ow = ref.shape
    ref_rows = ref.transpose(0, 2, 3, 1).reshape(-1, o)  # (n * oh * ow, o), row-major positions
    kw_ = dict(
        group=p["group"], kernel=p["k"], strides=p["strides"], pads=p["pads"], dilations=p["dil"]
    )
    wm = w.reshape(p["group"], o // p["group"], -1).astype(np.float64)  # driver's layer_matrix

    # every position: exactly the convolution, in (n, y, x) order
    full = conv_patches(x, positions=10**6, rng=np.random.default_rng(0), **kw_)
    assert full.shape == (n * oh * ow, p["group"], (p["c"] // p["group"]) * p["k"][0] * p["k"][1])
    got = np.einsum("mgk,gok->mgo", full.astype(np.float64), wm).reshape(len(full), o)
    np.testing.assert_allclose(got, ref_rows, rtol=1e-5, atol=1e-5)

    # sampled positions: distinct, sorted, and each equals the convolution at its position
    m = 17
    sub = conv_patches(x, positions=m, rng=np.random.default_rng(1), **kw_)
    assert sub.shape == (m,) + full.shape[1:]
    flat_full = full.reshape(len(full), -1)
    idx = []
    for row in sub.reshape(m, -1):
        hits = np.nonzero((flat_full == row).all(axis=1))[0]
        assert len(hits) >= 1
        idx.append(hits[0] if len(hits) == 1 else next(h for h in hits if h not in idx))
    assert len(set(idx)) == m and idx == sorted(idx)
    got_sub = np.einsum("mgk,gok->mgo", sub.astype(np.float64), wm).reshape(m, o)
    np.testing.assert_allclose(got_sub, ref_rows[idx], rtol=1e-5, atol=1e-5)


def test_dense_rows() -> None:
    x = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    all_rows = dense_rows(x, 100, np.random.default_rng(0))
    np.testing.assert_array_equal(all_rows[:, 0, :], x.reshape(-1, 4))
    sub = dense_rows(x, 6, np.random.default_rng(0))
    assert sub.shape == (6, 1, 4)
    starts = sub[:, 0, 0].astype(int) // 4
    assert len(set(starts)) == 6 and list(starts) == sorted(starts)
    np.testing.assert_array_equal(sub[:, 0, :], x.reshape(-1, 4)[starts])
