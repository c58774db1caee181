"""The solve stage for every method: W8A8, pruning, or pruning then W8A8.

Takes the collector's problems and returns a :class:`~onnxlw.plan.Plan`. Pruning needs all
problems at once (the sparsity of each layer is allocated from every layer's sensitivity), so
they are gathered first; quantization alone streams them through the executor.
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Executor

from .analyze import Analysis
from .config import Config, parse_prune
from .io import LoadedModel
from .plan import Plan
from .problems import StatsCollector
from .schedule import make_executor, solve_all
from .solve.allocate import allocate, sensitivity
from .solve.problem import LayerProblem, LayerSolution, QuantSpec
from .solve.prune import PruneSpec, prune_layer
from .solve.weights import solve_weights

FALLBACK_DAMPING = 1.0
"""Relative damping of H for pruning when the model has no BN statistics: H then describes
propagated noise, not the data, and is pulled toward its diagonal. Measured with `--prune 0.5`:
BN-folded ResNet-20 -16.9 pt at 0.01, -5.1 pt at 1.0 (magnitude -12.8); BN-folded MobileNetV2
at 20 %: -0.9 / -0.1 pt."""
KEPT_BN_DAMPING = 0.01
"""Relative damping of H for pruning when BN statistics were found (as in SparseGPT)."""


def only_channels(config: Config) -> bool:
    """Channel removal with FP32 output: the precondition did all the work."""
    return (
        config.prune is not None
        and parse_prune(config.prune).kind == "channels"
        and not config.quantize
    )


def solve(
    analysis: Analysis,
    collector: StatsCollector,
    loaded: LoadedModel,
    config: Config,
    executor: Executor | None = None,
    bn_found: bool = True,
) -> Plan:
    """Activation encodings (when quantizing), then every layer's solution."""
    fmt = "qdq" if config.quantize else "dense"
    plan = Plan(format=fmt, meta={"input_sha256": loaded.sha256, "options": config.to_dict()})
    if config.quantize:
        for name in analysis.qtensors:
            plan.activations[name] = collector.act_for(name)
    qspec = QuantSpec(
        bits=config.weight_bits,
        scale_method=config.weight_scale.value,
        bias_correction=config.bias_correction.value,
    )
    own = executor is None
    pool = make_executor(config.executor, config.workers) if own else executor
    in_flight = config.workers if own else 2
    try:
        if config.prune is None or parse_prune(config.prune).kind == "channels":
            solver = functools.partial(solve_weights, spec=qspec)
            plan.layers = solve_all(collector.problems(), solver, pool, in_flight=in_flight)
        else:
            damping = KEPT_BN_DAMPING if bn_found else FALLBACK_DAMPING
            plan.layers = _prune_all(
                analysis, collector, config, qspec, pool, in_flight, damping
            )
    finally:
        collector.close()
        if own:
            pool.shutdown()
    plan.layer_names = {r.index: r.node for r in analysis.active_layers}
    return plan


def _prune_all(
    analysis: Analysis,
    collector: StatsCollector,
    config: Config,
    qspec: QuantSpec,
    pool: Executor,
    in_flight: int,
    damping: float,
) -> dict[int, LayerSolution]:
    target = parse_prune(config.prune or "")
    problems = dict(collector.problems())
    recs = {r.index: r for r in analysis.active_layers}
    orders = {i: recs[i].adapter.input_order(recs[i]) for i in problems}
    base = PruneSpec(
        damping=damping,
        method=config.prune_method,
        refit=config.prune_refit,
        bias_correction=config.bias_correction.value != "none",
    )
    if target.kind == "nm":
        specs = {i: dataclasses.replace(base, n=target.n, m=target.m) for i in problems}
    else:
        if config.prune_allocation == "uniform":
            levels = {i: target.sparsity for i in problems}
        else:
            mag = config.prune_method == "magnitude"
            curves = dict(
                zip(
                    problems,
                    pool.map(
                        functools.partial(sensitivity, damping=damping, magnitude=mag),
                        problems.values(),
                    ),
                    strict=True,
                )
            )
            sizes = {i: int(problems[i].weight.size) for i in problems}
            levels = allocate(curves, sizes, target.sparsity)
        specs = {i: dataclasses.replace(base, sparsity=levels[i]) for i in problems}
    jobs = ((i, (problems[i], specs[i], orders[i], qspec if config.quantize else None))
            for i in sorted(problems, key=lambda i: (-problems[i].weight.size, i)))
    return solve_all(jobs, _prune_job, pool, in_flight=in_flight)


def _prune_job(
    args: tuple[LayerProblem, PruneSpec, object, QuantSpec | None],
) -> LayerSolution:
    """Prune one layer, then quantize the pruned weights when ``qspec`` is given (zeros stay
    zero: they round to level 0). Module-level, so a process pool can run it."""
    problem, spec, order, qspec = args
    pruned = prune_layer(problem, spec, order)  # type: ignore[arg-type]
    if qspec is None:
        return pruned
    q = solve_weights(dataclasses.replace(problem, weight=pruned.weight, bias=pruned.bias), qspec)
    stats = {**q.stats, **{f"prune_{k}": v for k, v in pruned.stats.items()}}
    stats["sparsity"] = float((q.weight == 0).mean())
    return LayerSolution(q.weight, q.bias, q.encoding, stats)
