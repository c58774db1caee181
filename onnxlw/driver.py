"""The solve driver: turns analysis records and samples into numpy problems, runs the solvers.

The solvers in :mod:`onnxlw.solve` see only arrays; this module is the only place that knows
how a layer's weight tensor maps to a grouped matrix and back.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .analyze import Analysis, LayerRecord
from .config import Config
from .errors import OnnxlwError
from .graph import GraphView
from .passes import Canonical
from .solve.patches import conv_patches, dense_rows
from .solve.problem import ActRange, LayerProblem, QuantSpec, WeightSolution
from .solve.ranges import affine_params, choose_range, fake_quant
from .solve.weights import solve_weights
from .synth import Samples

RANGE_SAMPLE_LIMIT = 1 << 20
"""Values per tensor used for the range search (a seeded subsample beyond this)."""


@dataclass
class QuantPlan:
    """Every decision of the solve stage, keyed by analysis records."""

    act: dict[str, ActRange] = field(default_factory=dict)
    weights: dict[int, WeightSolution] = field(default_factory=dict)


def layer_matrix(rec: LayerRecord, w: np.ndarray) -> np.ndarray:
    """Weight tensor -> grouped matrix (G, O, K)."""
    if rec.op_type == "Conv":
        assert rec.geom is not None
        g = rec.geom.group
        return w.reshape(g, w.shape[0] // g, -1)
    if rec.op_type == "MatMul":
        return w.T[None]
    return w[None]


def matrix_to_weight(rec: LayerRecord, m: np.ndarray) -> np.ndarray:
    """Grouped matrix (G, O, K) -> weight tensor of ``rec.weight_shape``."""
    if rec.op_type == "MatMul":
        return m[0].T
    return m.reshape(rec.weight_shape)


def solve_plan(
    canon: Canonical,
    analysis: Analysis,
    samples: Samples,
    config: Config,
    progress: Callable[[int, int], None] | None = None,
) -> QuantPlan:
    """Activation ranges for every quantized tensor, then weight solutions per layer.

    Layers are independent problems: they are solved on ``config.workers`` threads (numpy
    releases the GIL), each with its own generator seeded by (seed, layer index), so the
    result does not depend on scheduling.
    """
    plan = QuantPlan()
    todo = [(n, qt) for n, qt in analysis.qtensors.items() if qt.same_as is None]
    view = GraphView(canon.model)
    spec = QuantSpec(
        bits=config.weight_bits,
        scale_method=config.weight_scale.value,
        bias_correction=config.bias_correction.value,
    )

    def act_range(k: int) -> tuple[str, ActRange]:
        name, qt = todo[k]
        rng = np.random.default_rng([config.seed, 1, k])
        v = samples.values[name].reshape(-1)
        if not np.isfinite(v).all():
            raise OnnxlwError(
                f"synthesized values of tensor {name!r} contain NaN/Inf (an op upstream is "
                "undefined on the declared input distribution)",
                "declare the real input range with --input-range, or report the model",
            )
        if v.size > RANGE_SAMPLE_LIMIT:
            v = v[rng.integers(0, v.size, RANGE_SAMPLE_LIMIT)]
        r = choose_range(
            v,
            bits=config.act_bits,
            method=config.act_range.value,
            lo_bound=qt.lo_bound,
            hi_bound=qt.hi_bound,
        )
        return name, r

    def layer(rec: LayerRecord) -> tuple[int, WeightSolution]:
        rng = np.random.default_rng([config.seed, 2, rec.index])
        w = view.const(rec.weight).astype(np.float32)
        x = _layer_inputs(rec, samples.values[rec.input], config, rng)
        r = plan.act.get(rec.input)
        xq = fake_quant(x, r.scale, r.zero_point, config.act_bits) if r is not None else None
        b = view.const(rec.bias) if rec.bias else None
        wm = layer_matrix(rec, w)
        bias = b.reshape(wm.shape[0], wm.shape[1]) if b is not None else None
        pairs = u8s8_pair_order(rec) if config.saturation_guard else None
        return rec.index, solve_weights(LayerProblem(wm, x, xq, bias, spec, pairs))

    active = analysis.active_layers
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        plan.act.update(pool.map(act_range, range(len(todo))))
        if config.input_range is not None:  # declared: exact bounds of any real input
            lo, hi = config.input_range
            for name in samples.inputs:
                if name in plan.act:
                    s, z = affine_params(lo, hi, config.act_bits)
                    plan.act[name] = ActRange(
                        min(lo, 0.0), max(hi, 0.0), s, z, float("nan"), "declared"
                    )
        for name, qt in analysis.qtensors.items():
            if qt.same_as is not None:
                plan.act[name] = plan.act[qt.same_as]
        # Largest problems first so the pool stays busy; results are keyed, order-free.
        order = sorted(active, key=lambda r: -samples.values[r.input].size * r.params)
        for k, (idx, sol) in enumerate(pool.map(layer, order)):
            plan.weights[idx] = sol
            if progress:
                progress(k + 1, len(active))
    plan.weights = dict(sorted(plan.weights.items()))
    return plan


def u8s8_pair_order(rec: LayerRecord) -> np.ndarray | None:
    """K in onnxruntime's x86 u8s8 GEMM packing order, whose consecutive pairs it adds in int16.

    The GEMM packs K in onnxruntime's order: (kh, kw, c) for a conv (its QLinearConv runs
    channels-last), plain input order for Gemm/MatMul. Depthwise convs use a kernel that
    accumulates in int32 and need no guard.
    """
    if rec.op_type == "Conv":
        assert rec.geom is not None
        cin_g = rec.weight_shape[1]
        if cin_g == 1 and rec.geom.group > 1:
            return None
        kh, kw = rec.weight_shape[2], rec.weight_shape[3]
        order = np.arange(cin_g * kh * kw).reshape(cin_g, kh, kw).transpose(1, 2, 0).ravel()
    else:
        k = rec.weight_shape[1] if rec.op_type == "Gemm" else rec.weight_shape[0]
        order = np.arange(k)
    return order


def _layer_inputs(
    rec: LayerRecord, x: np.ndarray, config: Config, rng: np.random.Generator
) -> np.ndarray:
    if rec.op_type == "Conv":
        assert rec.geom is not None
        gm = rec.geom
        k = rec.weight_shape[1] * gm.kernel[0] * gm.kernel[1]
        return conv_patches(
            x,
            group=gm.group,
            kernel=gm.kernel,
            strides=gm.strides,
            pads=gm.pads,
            dilations=gm.dilations,
            positions=min(config.max_positions, max(1024, 8 * k)),
            rng=rng,
        )
    return dense_rows(x, config.max_positions, rng)
