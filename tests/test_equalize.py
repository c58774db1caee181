"""Cross-layer equalization and high-bias absorption (passes/equalize.py): exact in onnxruntime
(FP32), equal activation ranges where promised, the Min absorbed into the Q so every conv still
fuses, the reasons when a pair does not fire."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models as M
from onnxlw import Config, compress
from onnxlw.graph import GraphView
from onnxlw.io import load
from onnxlw.ortutil import fused_conv_counts, session
from onnxlw.passes import canonicalize
from onnxlw.passes.equalize import (
    K_SIGMA,
    channel_scales,
    equalize,
    find_pairs,
    find_streams,
)


def block(seed: int = 21, project_relu: bool = False, pad_last: int = 0) -> onnx.ModelProto:
    """MobileNetV2-like: 1x1 expand + BN + ReLU6 -> 3x3 depthwise + BN + ReLU6 -> 1x1 project +
    BN [+ Relu] -> 1x1 (pad ``pad_last``) conv + BN + Relu. Wide BN scales so channel ranges
    differ by ~20x."""
    b = M.Builder(seed, 17)
    b.bn_params = _wide_bn(b)  # type: ignore[method-assign]
    y = b.relu6(b.conv_bn("input", 3, 16, 1))
    y = b.relu6(b.conv_bn(y, 16, 16, 3, group=16))
    y = b.conv_bn(y, 16, 8, 1)
    if project_relu:
        y = b.relu(y)
    y = b.conv_bn_relu(y, 8, 8, 1, pad=pad_last)
    return b.model(M._in(1, (16, 16)), M._out(y, 1, 8, (16 + 2 * pad_last,) * 2))


def _wide_bn(b: M.Builder):  # noqa: ANN202 - a bound replacement for Builder.bn_params
    def params(c: int) -> tuple[np.ndarray, ...]:
        scale = b.rng.uniform(0.1, 2.0, c)
        bias = b.rng.normal(0.5, 1.0, c)
        return tuple(a.astype(np.float32) for a in (scale, bias, np.zeros(c), np.ones(c)))

    return params


def canon_of(model: onnx.ModelProto):  # noqa: ANN201
    return canonicalize(load(model, Config()).model)


def max_rel_diff(a: onnx.ModelProto, b: onnx.ModelProto, batch: int = 4) -> float:
    feeds = M.random_feeds(M.dynamic_batch(a), batch=batch, seed=3)
    ra = session(M.dynamic_batch(a)).run(None, feeds)[0]
    rb = session(M.dynamic_batch(b)).run(None, feeds)[0]
    return float(np.abs(ra - rb).max() / np.abs(ra).max())


def test_equalization_keeps_the_fp32_function_relu6_included() -> None:
    c = canon_of(block())
    before = c.model.SerializeToString()
    m, stats, notes = equalize(c.model, c.bn_stats, scale=True, absorb=False)
    assert c.model.SerializeToString() == before  # the input is not modified
    fired = [n for n in notes if n.fired]
    assert len(fired) == 3  # expand -> dw, dw -> project, project -> last
    assert max_rel_diff(c.model, m) < 1e-5
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Min") == 2 and "Clip" not in ops  # the two ReLU6 became Relu -> Min(c)
    changed = [t for t in stats if not np.array_equal(stats[t].bias, c.bn_stats[t].bias)]
    assert len(changed) == 3


def test_depthwise_consumer_gets_equal_channel_ranges() -> None:
    c = canon_of(block())
    pairs, _ = find_pairs(c.model, c.bn_stats)
    dw = next(p for p in pairs if p.depthwise)
    m, stats, _ = equalize(c.model, c.bn_stats, scale=True, absorb=False)
    st = stats[dw.tensor]
    clip = next(n for n in m.graph.node if n.op_type == "Min" and
                GraphView(m).producer[n.input[0]].input[0] == dw.tensor)
    hi = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == clip.input[1]))
    top = np.minimum(hi.ravel(), np.maximum(st.out_mean + K_SIGMA * st.out_std, 0))
    alive = top > top.max() / 64 * 1.01
    assert alive.sum() >= 8
    np.testing.assert_allclose(top[alive], top.max(), rtol=1e-6)
    # every channel's clip is at or above the tensor's range top: the Q may clip there alone
    assert hi.min() == pytest.approx(top.max(), rel=1e-6)


def test_saturating_channels_share_the_largest_scale() -> None:
    mu = np.array([8.0, 1.0, 7.0, 0.2])
    sd = np.array([1.0, 0.1, 0.5, 0.01])
    s = channel_scales(mu, sd, np.full(4, 6.0), np.array([1.0, 0.5, 2.0, 1.0]))
    assert s[0] == s[2] == s.max() == 1.0
    assert np.all(6.0 / s >= 6.0)  # no channel clipped below the original ReLU6


def test_equalized_model_fuses_every_conv_and_drops_the_min() -> None:
    model = block()
    base, _ = compress(model, Config(weight_bits=4, samples=32, equalize="off"))
    out, rep = compress(model, Config(weight_bits=4, samples=32))  # equalize auto: on
    assert fused_conv_counts(out) == fused_conv_counts(base) == (4, 0)
    assert not any(n.op_type == "Min" for n in out.graph.node)
    assert any(n["pass_name"] == "equalize" and n["fired"] for n in rep.notes)
    assert rep.validation.sqnr_db > 15
    # W8A8 keeps the model as it was (equalization off by default at 8 bits)
    _, rep8 = compress(model, Config(samples=32))
    assert not any(n["pass_name"] == "equalize" for n in rep8.notes)


def test_high_bias_absorption_moves_the_always_on_part_and_skips_padded_consumers() -> None:
    model = block(project_relu=True)
    c = canon_of(model)
    pairs = {p.producer: p for p in find_pairs(c.model, c.bn_stats)[0]}
    m, stats, notes = equalize(c.model, c.bn_stats, scale=False, absorb=True)
    by = {n.where: n for n in notes}
    moved = [w for w, n in by.items() if n.fired and "absorbed" in n.reason]
    assert moved, "the wide BN biases leave channels that are always on"
    for w in moved:  # only unpadded consumers take the bias
        assert not pairs[w].padded
    padded = [p for p in pairs.values() if p.padded]
    assert padded and all("absorbed" not in by[p.producer].reason for p in padded)
    # exact while every channel stays above mean - 3 std: true on most inputs here
    assert max_rel_diff(c.model, m) < 2e-2
    for p in pairs.values():
        if "absorbed" in by[p.producer].reason:
            assert np.all(stats[p.tensor].out_mean <= c.bn_stats[p.tensor].out_mean)


def stream_model(seed: int = 23, tail: str = "conv") -> onnx.ModelProto:
    """1x1 conv+BN (a stream of 8 channels) -> two residual bottlenecks (expand + ReLU6, 1x1
    project + BN, Add) -> a 1x1 conv (``tail="conv"``) or a GlobalAveragePool reading it."""
    b = M.Builder(seed, 17)
    b.bn_params = _wide_bn(b)  # type: ignore[method-assign]
    x = b.conv_bn("input", 3, 8, 1)
    for _ in range(2):
        y = b.conv_bn(b.relu6(b.conv_bn(x, 8, 16, 1)), 16, 8, 1)
        x = b.node("Add", [x, y])
    if tail == "conv":
        x = b.conv_bn_relu(x, 8, 8, 1)
        return b.model(M._in(1, (16, 16)), M._out(x, 1, 8, (16, 16)))
    x = b.node("GlobalAveragePool", [x])
    return b.model(M._in(1, (16, 16)), M._out(x, 1, 8, (1, 1)))


def test_a_residual_stream_is_rescaled_as_one_and_exactly() -> None:
    c = canon_of(stream_model())
    streams, _ = find_streams(c.model, c.bn_stats)
    assert len(streams) == 1
    st = streams[0]
    assert len(st.tensors) == 5 and len(st.producers) == 3 and len(st.consumers) == 3
    m, stats, notes = equalize(c.model, c.bn_stats, scale=True, absorb=False)
    assert max_rel_diff(c.model, m) < 1e-5
    assert any(n.rule == "stream" and n.fired for n in notes)
    # every producer's output statistics moved by the same per-channel factor 1 / s
    written = [t for t in st.tensors if t in c.bn_stats]
    assert len(written) == 3
    ratios = [stats[t].out_std / c.bn_stats[t].out_std for t in written]
    assert ratios[0].max() / ratios[0].min() > 1.2  # the channels were rescaled unevenly
    for r in ratios[1:]:
        np.testing.assert_allclose(r, ratios[0], rtol=1e-9)


def test_a_stream_read_by_something_else_is_left_with_the_reason() -> None:
    c = canon_of(stream_model(tail="pool"))
    streams, notes = find_streams(c.model, c.bn_stats)
    assert streams == []
    assert any("read by a GlobalAveragePool" in n.reason for n in notes)


def test_no_bn_statistics_no_pair_with_the_reason() -> None:
    c = canon_of(M.bn_folded())
    m, _, notes = equalize(c.model, c.bn_stats)
    assert m is c.model
    assert notes and all(not n.fired and ("no BN statistics" in n.reason
                                          or "without BN statistics" in n.reason)
                         for n in notes)


def test_cli_flags_reach_the_config() -> None:
    from onnxlw.cli import _config, _parser

    a = _parser().parse_args(["compress", "m.onnx", "-o", "o.onnx", "--equalize", "on",
                              "--absorb-bias"])
    cfg = _config(a)
    assert cfg.equalizes and cfg.absorb_bias
    assert not Config().absorb_bias


@pytest.mark.parametrize(
    ("kw", "on"),
    [({}, False), ({"weight_bits": 4}, True), ({"act_bits": 6}, False),
     ({"size_budget": 0.2}, True), ({"weight_bits": 4, "equalize": "off"}, False),
     ({"equalize": "on"}, True), ({"additive": 3.0}, False)],
)
def test_equalization_is_on_by_default_only_below_8_bit_weights(kw: dict, on: bool) -> None:
    assert Config(**kw).equalizes is on


def test_an_unknown_equalize_value_is_refused() -> None:
    from onnxlw.errors import OnnxlwError

    with pytest.raises(OnnxlwError, match="equalize"):
        Config(equalize="yes")


def test_an_equalized_plan_is_re_emitted_only_with_the_same_preconditioning(tmp_path) -> None:  # noqa: ANN001
    """The plan's weights were solved on the rescaled model: re-emitting it on a model that was
    not rescaled would be wrong, so it is refused with the option to pass."""
    from onnxlw.errors import OnnxlwError

    model = block()
    cfg = Config(weight_bits=4, samples=16)
    out, rep = compress(model, cfg)
    path = tmp_path / "plan.npz"
    rep.plan.save(path)
    again, _ = compress(model, cfg, plan=path)
    assert again.graph.SerializeToString() == out.graph.SerializeToString()
    with pytest.raises(OnnxlwError, match="cross-layer equalization on"):
        compress(model, Config(weight_bits=4, samples=16, equalize="off"), plan=path)
