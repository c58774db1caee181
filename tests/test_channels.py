"""Channel removal (--prune channels:F): chains found, shapes and statistics consistent, the
slimmer model close to the original in onnxruntime, residual/branch channels left alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models as M
import onnxlw
from onnxlw import Config
from onnxlw.channels import find_chains, kept_width
from onnxlw.ortutil import fused_conv_counts, session
from onnxlw.passes import canonicalize

CFG = Config(samples=8)


def chain_model() -> onnx.ModelProto:
    """3 -> 32 (conv-bn-relu) -> 32 (conv-bn-relu6) -> depthwise 32 -> bn-relu6 -> 16."""
    b = M.Builder(31, 17)
    y = b.conv_bn_relu("input", 3, 32)
    y = b.relu6(b.conv_bn(y, 32, 32, 1))
    y = b.relu6(b.conv_bn(y, 32, 32, 3, group=32))
    y = b.conv_bn(y, 32, 16, 1)
    return b.model([("input", ["N", 3, 16, 16])], [("out", y, ["N", 16, 16, 16])])


def conv_shapes(m: onnx.ModelProto) -> list[tuple[tuple[int, ...], int]]:
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type == "Conv":
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            out.append((inits[n.input[1]].shape, g))
    return out


@pytest.mark.parametrize(("c", "f", "keep"), [(96, 0.1, 88), (16, 0.5, 8), (10, 0.5, 8),
                                              (32, 0.3, 24), (8, 0.5, 8)])
def test_kept_widths_are_simd_multiples(c: int, f: float, keep: int) -> None:
    assert kept_width(c, f) == keep


def test_chains_through_activations_and_depthwise() -> None:
    chains, notes = find_chains(canonicalize(chain_model()))
    assert [(c.channels, c.depthwise is not None) for c in chains] == [(32, False), (32, True)]
    assert any(not n.fired and "graph output" in n.reason for n in notes)


def test_channel_removal_shapes_and_numerics() -> None:
    m = chain_model()
    out, rep = onnxlw.compress(m, dataclasses.replace(CFG, prune="channels:0.5", quantize=False))
    onnx.checker.check_model(out)
    shapes = conv_shapes(out)
    assert shapes == [((16, 3, 3, 3), 1), ((16, 16, 1, 1), 1), ((16, 1, 3, 3), 16),
                      ((16, 16, 1, 1), 1)]
    feeds = M.random_feeds(m, batch=4)
    a, b = session(m).run(None, feeds)[0], session(out).run(None, feeds)[0]
    assert a.shape == b.shape
    sqnr = 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2))
    assert sqnr > 3, sqnr  # half the channels gone (4.7 dB measured), refit on synthesis
    assert any(n["pass_name"] == "channels" and n["fired"] for n in rep.notes)


def test_channel_removal_then_w8a8_fuses() -> None:
    out, _ = onnxlw.compress(chain_model(), dataclasses.replace(CFG, prune="channels:0.5"))
    assert fused_conv_counts(out) == (3, 1)  # the last conv writes the graph output: a head


def test_group_obs_beats_dropping_by_magnitude() -> None:
    """Choosing channels by group OBS with the least-squares update (and the mean moved into
    the bias) beats dropping the channels with the smallest weights and keeping the rest."""
    from onnxlw import channels as C

    m = chain_model()
    cfg = dataclasses.replace(CFG, prune="channels:0.5", quantize=False)
    refit, _ = onnxlw.compress(m, cfg)
    orig = C.select_channels

    def by_magnitude(w, h, mean, bias, per, keep):  # noqa: ANN001, ANN202
        norm = (w**2).reshape(w.shape[0], -1, per).sum(axis=(0, 2))
        kept = np.sort(np.argsort(-norm, kind="stable")[:keep])
        cols = (kept[:, None] * per + np.arange(per)).ravel()
        return kept, w[:, cols], bias

    C.select_channels = by_magnitude
    try:
        plain, _ = onnxlw.compress(m, cfg)
    finally:
        C.select_channels = orig
    feeds = M.random_feeds(m, batch=8, seed=3)
    a = session(m).run(None, feeds)[0]
    e_refit = np.mean((session(refit).run(None, feeds)[0] - a) ** 2)
    e_plain = np.mean((session(plain).run(None, feeds)[0] - a) ** 2)
    assert e_refit < 0.7 * e_plain, (e_refit, e_plain)


def test_residual_channels_are_left_with_a_reason() -> None:
    out, rep = onnxlw.compress(
        M.residual(batch="N"), dataclasses.replace(CFG, prune="channels:0.5", quantize=False)
    )
    reasons = [n["reason"] for n in rep.notes if n["pass_name"] == "channels" and not n["fired"]]
    assert any("several readers" in r for r in reasons)
