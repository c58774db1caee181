"""The solve stage for every method, and the network-aware refine stage.

``solve`` takes the collector's problems and returns a :class:`~onnxlw.plan.Plan`:
quantization at each layer's bits (``weight_bits``/``layer_bits``; GPTQ below 8 bits) streams
the problems through the executor; pruning (then quantization) and mixed precision under a
size budget need all problems at once (sparsity and bits are allocated from every layer's
sensitivity), so they are gathered first; so does additive quantization (one codebook set
fitted to every layer, :mod:`onnxlw.additive`). ``refine`` solves every layer again, in
topological order, on the input the compressed network produces, with the same spec.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
from onnx import numpy_helper

from .additive import solve_additive
from .analyze import Analysis
from .config import Config, parse_prune
from .errors import OnnxlwError
from .graph import GraphView
from .io import LoadedModel, default_opset
from .passes import Canonical
from .plan import Plan
from .problems import StatsCollector, layer_matrix, sample_columns
from .schedule import make_executor, solve_all
from .solve.allocate import allocate, allocate_bits, sensitivity
from .solve.aware import network_aware
from .solve.problem import LayerProblem, LayerSolution, QuantSpec, SparseEncoding
from .solve.prune import PruneSpec, prune_layer
from .solve.weights import solve_weights
from .synth.twin import run_twin
from .targets.ort_cpu import stored_bits, u8s8_pair_order

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
    measure: Callable[[Plan], int] | None = None,
) -> Plan:
    """Activation encodings (when quantizing), then every layer's solution.

    ``measure``: the output file's bytes for a plan (emit and storage stages), needed by
    ``size_budget``."""
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
    damping = KEPT_BN_DAMPING if bn_found else FALLBACK_DAMPING
    specs = layer_specs(analysis, config, qspec, damping)
    try:
        if config.additive is not None:
            plan.layers, plan.codebooks, plan.meta["additive"], plan.jobs = solve_additive(
                analysis, collector, config, pool, in_flight, damping, bn_found
            )
        elif config.size_budget is not None:
            if measure is None:
                raise ValueError("size_budget needs measure")
            plan.layers = _mixed_all(
                analysis, collector, config, specs, pool, in_flight, plan, measure,
                loaded.model.ByteSize(), default_opset(loaded.model),
            )
        elif config.prune is None or parse_prune(config.prune).kind == "channels":
            jobs = ((i, (p, specs[i])) for i, p in collector.problems())
            plan.layers = solve_all(jobs, _quant_job, pool, in_flight=in_flight)
            plan.jobs = {i: (_quant_job, (specs[i],)) for i in plan.layers}
        else:
            plan.layers, plan.jobs = _prune_all(
                analysis, collector, config, specs, pool, in_flight, damping
            )
    finally:
        collector.close()
        if own:
            pool.shutdown()
    plan.layer_names = {r.index: r.node for r in analysis.active_layers}
    return plan


def layer_specs(
    analysis: Analysis, config: Config, base: QuantSpec, damping: float
) -> dict[int, QuantSpec]:
    """Each active layer's weight spec: its bits (``layer_bits`` overrides ``weight_bits``)
    and its rounding (GPTQ with ``damping``, or nearest)."""
    out = {}
    for r in analysis.active_layers:
        bits = config.bits_for((r.node, r.weight, r.op_type))
        out[r.index] = dataclasses.replace(
            base,
            bits=bits,
            rounding="gptq" if config.uses_gptq(bits) else "nearest",
            damping=damping,
        )
    return out


BIT_CHOICES = (2, 3, 4, 5, 6, 8)
"""Weight widths the size-budget allocation picks from (7 bits saves an eighth of 8 and is
rarely worth its solve). Below opset 14 only the widths stored in fewer bytes than the next
one up count: 2, 4 and 8 (see targets.ort_cpu.stored_bits)."""
BUDGET_ROUNDS = 6
"""Allocate → solve → emit → measure rounds before giving up on a budget."""


def bit_choices(opset: int) -> tuple[int, ...]:
    """The widths of BIT_CHOICES worth choosing at ``opset``: for each stored size, the
    widest width stored in it ((2, 4, 8) below opset 14, all of them from 14)."""
    sizes = sorted({stored_bits(b, opset) for b in BIT_CHOICES})
    return tuple(max(b for b in BIT_CHOICES if stored_bits(b, opset) == s) for s in sizes)


def _mixed_all(
    analysis: Analysis,
    collector: StatsCollector,
    config: Config,
    specs: dict[int, QuantSpec],
    pool: Executor,
    in_flight: int,
    plan: Plan,
    measure: Callable[[Plan], int],
    size_in: int,
    opset: int,
) -> dict[int, LayerSolution]:
    """Mixed precision under ``config.size_budget`` (a fraction of the input file's bytes).

    Each layer's relative output error at every width of ``bit_choices(opset)`` is measured on
    its synthesized input statistics (round-to-nearest with the output-MSE scales, 10^(-SQNR/10));
    :func:`allocate_bits` picks the widths for a byte budget of the packed weights; the layers
    are then solved at their widths (GPTQ below 8 bits), the model is emitted and its bytes
    measured. While it is over the budget, the weight budget shrinks by the excess and the
    allocation runs again. Layers with a ``layer_bits`` override keep their width.
    """
    problems = dict(collector.problems())
    recs = {r.index: r for r in analysis.active_layers}
    fixed = {
        i for i in problems
        if config.bits_override((recs[i].node, recs[i].weight, recs[i].op_type)) is not None
    }
    errors: dict[int, dict[int, float]] = {i: {} for i in problems}
    costs: dict[int, dict[int, float]] = {}
    choices = bit_choices(opset)
    for i, p in problems.items():
        n = int(p.weight.size)
        widths = (specs[i].bits,) if i in fixed else choices
        costs[i] = {b: float(-(-n * stored_bits(b, opset) // 8)) for b in widths}
    solved: dict[tuple[int, int], LayerSolution] = {}
    for b in choices:
        todo = [i for i in problems if b in costs[i]]
        curve = {i: dataclasses.replace(specs[i], bits=b, rounding="nearest") for i in todo}
        jobs = ((i, (problems[i], curve[i])) for i in todo)
        for i, sol in solve_all(jobs, _quant_job, pool, in_flight=in_flight).items():
            errors[i][b] = 10 ** (-sol.stats["sqnr_db"] / 10)
            if curve[i] == _spec_at(config, specs[i], b):  # the final solve would repeat it
                solved[(i, b)] = sol
    target = config.size_budget * size_in  # type: ignore[operator]

    def solve_at(choice: dict[int, int]) -> dict[int, LayerSolution]:
        need = [i for i in problems if (i, choice[i]) not in solved]
        jobs = ((i, (problems[i], _spec_at(config, specs[i], choice[i]))) for i in need)
        for i, sol in solve_all(jobs, _quant_job, pool, in_flight=in_flight).items():
            solved[(i, choice[i])] = sol
        return {i: solved[(i, choice[i])] for i in sorted(problems)}

    # First guess of the bytes that are not weights: the 8-bit model's size minus its weights.
    eight = solve_at({i: 8 if 8 in costs[i] else specs[i].bits for i in problems})
    plan.layers = eight
    weights8 = sum(costs[i].get(8, min(costs[i].values())) for i in problems)
    nonweight = measure(plan) - weights8
    budget = target - nonweight
    history = []
    for _ in range(BUDGET_ROUNDS):
        choice = allocate_bits(errors, costs, budget)
        if choice is None:
            break
        plan.layers = solve_at(choice)
        size = measure(plan)
        history.append({"weight_budget": budget, "bytes": size})
        if size <= target:
            plan.jobs = {i: (_quant_job, (_spec_at(config, specs[i], choice[i]),))
                         for i in choice}
            plan.meta["size_budget"] = {
                "target_bytes": int(target), "bytes": int(size), "rounds": history,
                "predicted_error": float(sum(errors[i][choice[i]] for i in choice)),
            }
            return plan.layers
        budget = next_budget(budget, sum(costs[i][choice[i]] for i in choice), size, target)
    floor = nonweight + sum(min(c.values()) for c in costs.values())
    raise OnnxlwError(
        f"--size-budget {config.size_budget:g} ({target / 1e6:.2f} MB) cannot be met: the "
        f"smallest file this model reaches is about {floor / 1e6:.2f} MB "
        f"({floor / size_in:.3f} of the input; {nonweight / 1e6:.2f} MB are not weights)",
        "raise --size-budget",
    )


def next_budget(budget: float, used: float, size: float, target: float) -> float:
    """The weight budget for the next allocation round after a file of ``size`` bytes
    overshot ``target``: below what the last choice's weights cost (``used``), or the same
    choice comes back, since it fit the old budget, by the overshoot plus a margin."""
    return min(budget, used) - (size - target) * 1.02 - 64


def _spec_at(config: Config, spec: QuantSpec, bits: int) -> QuantSpec:
    return dataclasses.replace(
        spec, bits=bits, rounding="gptq" if config.uses_gptq(bits) else "nearest"
    )


def _quant_job(args: tuple[LayerProblem, QuantSpec]) -> LayerSolution:
    """Quantize one layer (module-level, so a process pool can run it)."""
    problem, spec = args
    return solve_weights(problem, spec)


def _prune_all(
    analysis: Analysis,
    collector: StatsCollector,
    config: Config,
    qspecs: dict[int, QuantSpec],
    pool: Executor,
    in_flight: int,
    damping: float,
) -> tuple[dict[int, LayerSolution], dict[int, tuple]]:
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
    args = {i: (specs[i], orders[i], qspecs[i] if config.quantize else None) for i in problems}
    jobs = ((i, (problems[i], *args[i]))
            for i in sorted(problems, key=lambda i: (-problems[i].weight.size, i)))
    solved = solve_all(jobs, _prune_job, pool, in_flight=in_flight)
    return solved, {i: (_prune_job, args[i]) for i in solved}


def _prune_job(args: tuple) -> LayerSolution:
    """Prune one layer, then quantize the pruned weights when ``qspec`` is given (zeros stay
    zero: they round to level 0). ``args``: (problem, PruneSpec, N:M order, QuantSpec or
    None[, mask to keep]). Module-level, so a process pool can run it."""
    problem, spec, order, qspec, *rest = args
    pruned = prune_layer(problem, spec, order, rest[0] if rest else None)  # type: ignore[arg-type]
    if qspec is None:
        return pruned
    q = solve_weights(
        dataclasses.replace(problem, weight=pruned.weight, bias=pruned.bias),
        dataclasses.replace(qspec, keep_zeros=True),
    )
    stats = {**q.stats, **{f"prune_{k}": v for k, v in pruned.stats.items()}}
    stats["sparsity"] = float((q.weight == 0).mean())
    return LayerSolution(q.weight, q.bias, q.encoding, stats)


AWARE_DAMPING = 1.0
"""Relative damping of Cov[x̃] in the network-aware weight W* (see solve/aware.py). Measured
on ResNet-56 `--prune 0.5 --no-quantize` (2000 CIFAR images): 0.01 → −1.6 pt, 1.0 → −1.2,
3.0 → −1.7, W* = W (bias and statistics only) → −1.7; without the refinement −2.3. Small
damping overfits W* to the synthetic images where a layer has few samples per input."""


def refine(
    canon: Canonical,
    analysis: Analysis,
    loaded: LoadedModel,
    config: Config,
    plan: Plan,
    executor: Executor | None = None,
) -> Plan:
    """Solve every layer again, in topological order, on the input the compressed network
    produces (:mod:`onnxlw.synth.twin`, :mod:`onnxlw.solve.aware`), with the same spec as in
    ``plan`` (its bits, sparsity, mask pattern). Returns a new plan."""
    view = GraphView(canon.model)
    layers = analysis.active_layers
    weights = {r.index: _const(view, r.weight) for r in layers}
    biases = {r.index: _const(view, r.bias) if r.bias else None for r in layers}
    own = executor is None
    pool = make_executor(config.executor, config.workers) if own else executor

    def solve_group(group: list) -> dict[int, LayerSolution]:
        jobs: dict[int, tuple] = {}
        extra: dict[int, dict[str, float]] = {}
        for rec, x, xc in group:
            wm, bias = layer_matrix(rec, weights[rec.index], biases[rec.index])
            cols, cols_c = sample_columns(rec, x, config), sample_columns(rec, xc, config)
            act = plan.activations.get(rec.input)
            base = LayerProblem(
                wm, bias, np.zeros(wm.shape[::2]), None, None, 0,
                x_scale=act.scale if act else None,
                pair_order=u8s8_pair_order(rec) if config.saturation_guard else None,
                name=rec.node,
            )
            problem, extra[rec.index] = network_aware(base, cols, cols_c, AWARE_DAMPING)
            fn, args = plan.jobs[rec.index]
            if fn is _prune_job:
                # Keep the first mask and refit only (no second OBS pass). Measured on ResNet-56
                # (2000 CIFAR images): 50 % −1.2 pt either way, 2:4 −1.8 pt kept against −2.8
                # re-chosen; the refit alone is cheaper.
                sol0 = plan.layers[rec.index]
                enc = sol0.encoding
                keep = enc.mask if isinstance(enc, SparseEncoding) else sol0.weight != 0
                args = (*args, keep)
            jobs[rec.index] = (problem, *args)
        fns = {i: plan.jobs[i][0] for i in jobs}
        futures = {i: pool.submit(fns[i], jobs[i]) for i in sorted(jobs)}
        out = {}
        for i, f in futures.items():
            sol = f.result()
            stats = {**sol.stats, **{f"aware_{k}": v for k, v in extra[i].items()}}
            out[i] = LayerSolution(sol.weight, sol.bias, sol.encoding, stats)
        return out

    acts = dict(plan.activations) if plan.format == "qdq" else {}
    try:
        solved = run_twin(canon, analysis, loaded.inputs, config, acts, weights, biases,
                          solve_group)
    finally:
        if own:
            pool.shutdown()
    new = Plan(
        layers=solved, layer_names=dict(plan.layer_names), activations=dict(plan.activations),
        codebooks=dict(plan.codebooks), format=plan.format,
        meta={**plan.meta, "network_aware": True}, jobs=plan.jobs,
    )
    return new


def _const(view: GraphView, name: str) -> np.ndarray:
    if name in view.initializers:
        return numpy_helper.to_array(view.initializers[name])
    return view.const(name)
