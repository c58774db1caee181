"""The solve stage of ``--additive``: which layers get codes, the joint codebook fit, and
each layer's solution (decoded weight, corrected bias, codes).

Layers with at least ``additive_min_params`` weights and two vectors per row get codes; the
others (the first conv, depthwise convs, small heads) keep 8-bit integer weights (solved as
in W8A8). The codebook fit itself is :mod:`onnxlw.solve.additive` (numpy/scipy only).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor

import numpy as np

from .analyze import Analysis
from .config import Config
from .ops import LayerRecord
from .problems import StatsCollector
from .schedule import solve_all
from .solve.additive import (
    AdditiveLayer,
    AdditiveSpec,
    assign_codes,
    code_dtype,
    code_order,
    decode_matrix,
    fit,
    layer_state,
    requantize,
    update_scales,
)
from .solve.problem import CodebookRef, LayerProblem, LayerSolution, QuantEncoding, QuantSpec
from .solve.prune import hessian
from .solve.weights import solve_weights

SHARED = "shared"
"""Name of the codebook set shared by every coded layer."""


def additive_spec(config: Config, damping: float, bn_found: bool = True) -> AdditiveSpec:
    """The fit's spec from the config (defaults resolved)."""
    books, dim, code_bits = config.additive_shape()
    objective = config.additive_objective
    if objective == "auto":
        objective = "output" if bn_found else "weight"
    return AdditiveSpec(
        books=books, target_bits=config.additive, code_bits=code_bits, dim=dim,
        layout=config.additive_layout,
        objective=objective, beam=config.additive_beam,
        rounds=config.additive_rounds, seed=config.seed,
        damping=damping if config.additive_damping is None else config.additive_damping,
        spread=0 if config.additive_books else config.additive_spread,
    )


def coded(rec: LayerRecord, problem: LayerProblem, config: Config, spec: AdditiveSpec) -> bool:
    """Whether a layer gets codes (else 8-bit integer weights)."""
    k = problem.weight.shape[2]
    return problem.weight.size >= config.additive_min_params and k >= 2 * spec.dim


def solve_additive(
    analysis: Analysis,
    collector: StatsCollector,
    config: Config,
    pool: Executor,
    in_flight: int,
    damping: float,
    bn_found: bool = True,
) -> tuple[dict[int, LayerSolution], dict[str, np.ndarray], dict, dict[int, tuple]]:
    """Every layer's solution, the codebooks by name, what the report shows, and how each
    layer is solved again on another problem (``Plan.jobs``, for the network-aware stage:
    codes and scales with the codebooks kept)."""
    spec = additive_spec(config, damping, bn_found)
    auto_load = config.additive_damping is None  # the load grows with K / samples
    recs = {r.index: r for r in analysis.active_layers}
    problems = dict(collector.problems())
    with_codes = [i for i in sorted(problems) if coded(recs[i], problems[i], config, spec)]
    int8 = [i for i in sorted(problems) if i not in with_codes]
    q8 = QuantSpec(bits=8, scale_method=config.weight_scale.value,
                   bias_correction=config.bias_correction.value)
    def small(p: LayerProblem) -> LayerProblem:
        # weight-only int8 in float output: no integer kernel, so no u8s8 pair limit
        return p if config.quantize else dataclasses.replace(p, pair_order=None)

    out = solve_all(((i, (small(problems[i]), q8)) for i in int8), _q8_job, pool,
                    in_flight=in_flight)
    states: dict[int, AdditiveLayer] = {}
    for i in with_codes:
        p = problems[i]
        rec = recs[i]
        perm = code_order(spec.layout, rec.weight_shape, rec.op_type == "MatMul")
        states[i] = layer_state(p.weight.astype(np.float64), hessian(p, True), perm, spec,
                                p.count if auto_load else None)
        problems[i] = dataclasses.replace(p, cov=None, x=None)  # the state holds H now
    shared = config.additive_scope == "shared"
    sets, history = fit([states[i] for i in with_codes], spec, mapper=pool.map,
                        shared=shared) if with_codes else ([], [])
    names = {i: SHARED if shared else recs[i].node for i in with_codes}
    books = {names[i]: sets[0 if shared else k] for k, i in enumerate(with_codes)}
    jobs: dict[int, tuple] = {i: (_q8_job, (q8,)) for i in int8}
    for i in with_codes:
        lay = states.pop(i)
        out[i] = finish(problems[i], lay, books[names[i]], names[i], recs[i], spec,
                        config.quantize)
        jobs[i] = (recode_job, (books[names[i]], names[i], recs[i], spec, config.quantize,
                                lay.books, auto_load))
    meta = {
        "books": spec.books, "min_books": spec.min_books, "dim": spec.dim,
        "code_bits": spec.code_bits,
        "bits": spec.bits, "scope": config.additive_scope, "objective": spec.objective,
        "objective_why": (
            "no BN statistics: the synthesized inputs are propagated noise, so the plain "
            "weight error is fitted" if config.additive_objective == "auto" and not bn_found
            else config.additive_objective
        ),
        "layout": spec.layout, "beam": spec.beam, "rounds": spec.rounds,
        "coded_layers": len(with_codes), "int8_layers": len(int8),
        "history": history,
        "codebook_bytes": int(sum(2 * b.size for b in books.values())),  # float16
    }
    return dict(sorted(out.items())), books, meta, jobs


def recode_job(args: tuple) -> LayerSolution:
    """Codes and row scales of one layer for another problem (the network-aware one), with
    the fitted codebooks and the layer's book count kept. ``args``: (problem, books, book
    name, layer record, spec, quantize, books used, load grows with K / samples). Module-level,
    for process pools."""
    p, books, name, rec, spec, quantize, nbooks, auto_load = args
    perm = code_order(spec.layout, rec.weight_shape, rec.op_type == "MatMul")
    lay = layer_state(p.weight.astype(np.float64), hessian(p, True), perm, spec,
                      p.count if auto_load else None)
    lay.books = nbooks
    for _ in range(2):
        lay.codes = assign_codes(lay, books, spec).astype(code_dtype(spec))
        lay.s = update_scales(lay, books)
    return finish(p, lay, books, name, rec, spec, quantize)


def _q8_job(args: tuple[LayerProblem, QuantSpec]) -> LayerSolution:
    problem, spec = args
    sol = solve_weights(problem, spec)
    return dataclasses.replace(sol, stats={**sol.stats, "bits_per_weight": 8.0})


def finish(
    p: LayerProblem,
    lay: AdditiveLayer,
    books: np.ndarray,
    book: str,
    rec: LayerRecord,
    spec: AdditiveSpec,
    quantize: bool,
) -> LayerSolution:
    """The layer's decoded weight (exactly what the emitted subgraph computes), its bias
    corrected for the mean shift, its codes, and stats."""
    g, o, k = p.weight.shape
    assert lay.codes is not None
    scale = lay.s.reshape(-1).astype(np.float32)  # float16 values
    m = decode_matrix(lay.codes, books, scale, k)  # (R, K) code order
    quant = None
    if quantize:
        qscale = (np.abs(m).max(axis=1) / np.float32(127)).astype(np.float32)
        if p.x_scale is not None and p.bias is not None:
            # the int32 bias (scale x_scale * qscale) must fit, as in solve_weights
            need = np.abs(p.bias.reshape(-1)) / (p.x_scale * float(2**30 - 1))
            qscale = np.maximum(qscale, (need * 1.01).astype(np.float32))
        qscale = np.where(qscale > 0, qscale, np.float32(1)).astype(np.float32)
        q = requantize(m, qscale)
        m = q.astype(np.float32) * qscale[:, None]
    w_hat = np.empty((g * o, k), np.float32)
    w_hat[:, lay.perm] = m
    w_hat = w_hat.reshape(g, o, k)
    mean = p.mean
    mq = p.xq_mean if (quantize and p.xq_mean is not None) else mean
    w64 = p.weight.astype(np.float64)
    shift = np.einsum("gok,gk->go", w64, mean) - np.einsum("gok,gk->go", w_hat, mq)
    bias0 = np.zeros((g, o)) if p.bias is None else p.bias.astype(np.float64)
    # output error on the (damped) covariance, in code order
    wp = np.zeros_like(lay.w)
    wp[..., :k] = w_hat.reshape(g, o, k)[..., lay.perm]
    e = lay.w - wp
    err = float((np.matmul(e, lay.h) * e).sum())
    sig = float((np.matmul(lay.w, lay.h) * lay.w).sum())
    kp = lay.w.shape[2]
    if quantize:
        qi = np.empty((g * o, k), np.int8)
        qi[:, lay.perm] = q
        quant = QuantEncoding(qi.reshape(g, o, k), qscale.reshape(g, o),
                              np.zeros((g, o), np.int8), 8, True)
    stats = {
        "sqnr_db": float(10 * np.log10(max(sig, 1e-30) / err)) if err > 0 else float("inf"),
        "bits_per_weight": lay.books * spec.code_bits / spec.dim * kp / k + 16.0 / k,
        "books": float(lay.books),
        "bias_shift_rms": float(np.sqrt(np.mean(shift**2))),
        "bits": float(spec.bits),
    }
    enc = CodebookRef(
        lay.codes, book, spec.dim, scale, spec.layout, tuple(rec.weight_shape),
        rec.op_type == "MatMul", quant,
    )
    return LayerSolution(w_hat, (bias0 + shift).astype(np.float32), enc, stats)
