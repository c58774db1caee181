"""load -> canonicalize -> precondition -> analyze -> synthesize -> solve -> emit -> validate
-> report, one call per stage."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from ._version import __version__
from .analyze import Analysis, analyze
from .channels import prune_channels
from .config import REFERENCE_IMAGE_VALUES, Config, parse_prune
from .emit import EMITTERS
from .emit.codebook import store_codebooks
from .emit.compact import compact_sparse
from .emit.packed import pack_lowbit
from .errors import InternalError, OnnxlwError
from .graph import GraphView
from .inputspec import InputSpec
from .io import LoadedModel, load
from .method import only_channels, refine, solve
from .ortutil import release_memory
from .passes import Canonical, canonicalize
from .passes.equalize import equalize
from .plan import Plan
from .problems import StatsCollector
from .report import make_report
from .synth import SynthesisInfo, synthesize
from .synth.twin import unsupported as twin_unsupported
from .targets.ort_cpu import TUNED_FOR
from .targets.probe import require_lowbit
from .validate import validate

Progress = Callable[[str], None]
METADATA_RESERVE = 4096
"""Bytes a size budget keeps for the metadata written after validation."""
LATENCY_RUNS = 20
"""Batch-1 runs timed for the report when pruning (speed is part of what pruning promises)."""


def compress(
    model: onnx.ModelProto | str | os.PathLike,
    config: Config | None = None,
    *,
    plan: Plan | str | os.PathLike | None = None,
    executor: Executor | None = None,
    progress: Progress | None = None,
):  # noqa: ANN201 - (ModelProto, Report)
    """Compress a model with no data. Returns the compressed model and the report.

    ``plan``: re-emit a saved plan (``Plan.save``) instead of synthesizing and solving; the
    output is byte-identical to the run that saved it. The solved plan is ``report.plan``.
    ``executor``: any ``concurrent.futures.Executor`` for the layer solves (a Dask or Ray
    executor, say); by default ``Config.executor`` with ``Config.workers``. The output does not
    depend on it.
    Raises :class:`~onnxlw.errors.OnnxlwError` for bad input (the input is never modified)
    and :class:`~onnxlw.errors.InternalError` for onnxlw's own failures.
    """
    config = config or Config()
    say = progress or (lambda _msg: None)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    def stage(name: str, fn, *args, **kw):  # noqa: ANN001, ANN202 - thin timing wrapper
        say(f"{name}...")
        t = time.perf_counter()
        out = fn(*args, **kw)
        release_memory()  # a stage's temporaries (model copies, activations) go back to the OS
        stages[name] = round(time.perf_counter() - t, 3)
        return out

    if config.low_bits:
        require_lowbit()  # before any work: this onnxruntime must run the low-bit output
    loaded: LoadedModel = stage("load", load, model, config)
    if plan is None:  # a loaded plan synthesizes nothing
        config = _resolve_samples(config, loaded)
    canon: Canonical = stage("canonicalize", canonicalize, loaded.model)
    canon = stage("precondition", precondition, canon, config, loaded.inputs)
    if canon.model is not loaded.model:
        check_model(canon.model, "precondition")
    analysis: Analysis = stage(
        "analyze",
        analyze,
        canon,
        quantize_classifier=config.quantize_classifier,
        exclude=config.exclude,
        float_heads=config.float_heads,
    )
    if not analysis.active_layers:
        raise no_layers_error(analysis, loaded.model)
    info: SynthesisInfo | None = None
    if plan is None and only_channels(config):
        the_plan = Plan(format="canonical", meta={"input_sha256": loaded.sha256})
    elif plan is None:
        collector = stage("synthesize", _collect, canon, analysis, loaded, config)
        info = collector.info
        the_plan = stage(
            "solve", solve, analysis, collector, loaded, config, executor, canon.bn_found,
            lambda p: _stored(EMITTERS[p.format](canon, analysis, p), config, p)[0].ByteSize()
            + METADATA_RESERVE,
        )
        the_plan.meta["fallback"] = info.fallback
        if config.refines:
            why = twin_unsupported(loaded.inputs, config)
            if why is None:
                the_plan = stage(
                    "refine", refine, canon, analysis, loaded, config, the_plan, executor
                )
            else:
                the_plan.meta["network_aware"] = f"not run: {why}"
    else:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        the_plan.check_matches(
            {r.index: r.node for r in analysis.active_layers}, loaded.sha256
        )
        check_plan_precondition(the_plan, config)
    out = stage("emit", EMITTERS[the_plan.format], canon, analysis, the_plan)
    packed: list = []
    forms: list = []
    coded: list = []
    if the_plan.min_weight_bits() < 8 or config.prune is not None or config.additive:
        out, packed, forms, coded = stage("store", _stored, out, config, the_plan)
    check_model(out, "emit")
    release_memory()
    validation = stage(
        "validate", validate, out, loaded.model, loaded.inputs, config, loaded.path,
        LATENCY_RUNS if config.prune is not None else 0,
    )
    fallback = info.fallback if info is not None else the_plan.meta.get("fallback")
    _set_metadata(out, loaded, canon, config, fallback, validation)
    report = make_report(loaded, canon, analysis, the_plan, config, fallback, info)
    report.validation = validation
    report.stages = stages
    report.size_before = loaded.model.ByteSize()
    report.size_after = out.ByteSize()
    report.wall_time = round(time.perf_counter() - t0, 3)
    report.plan = the_plan
    report.sparse_storage = _storage(forms)
    report.packed = _packed(packed)
    report.codebook_storage = _codebook_storage(coded, the_plan)
    if config.prune is not None:  # what a pruned file really weighs once zipped
        report.size_zipped_before = len(zlib.compress(loaded.model.SerializeToString(), 6))
        report.size_zipped_after = len(zlib.compress(out.SerializeToString(), 6))
    if config.fail_under_db is not None and validation.sqnr_db < config.fail_under_db:
        raise OnnxlwError(
            f"the output's validation SQNR {validation.sqnr_db:.1f} dB is below "
            f"--fail-under {config.fail_under_db:g} dB (nothing was written)",
            "see the report's per-layer SQNR, exclude the worst layers with --exclude, "
            "or lower --fail-under",
        )
    return out, report


def _stored(
    out: onnx.ModelProto, config: Config, plan: Plan
) -> tuple[onnx.ModelProto, list, list, list]:
    """The emitted model with its weights in their stored form: weights below 8 bits packed,
    pruned weights compact, additive codes with their codebooks. Returns the model, what was
    packed, the compact forms and the coded weights."""
    coded: list = []
    if config.additive is not None:
        out, coded = store_codebooks(out, plan)
    packed: list = []
    if config.pack_weights and plan.min_weight_bits() < 8:
        out, packed = pack_lowbit(out)
    forms: list = []
    if config.prune is not None and config.sparse_format == "compact":
        out, forms = compact_sparse(out)
    return out, packed, forms, coded


def _codebook_storage(coded: list, plan: Plan) -> dict[str, Any]:
    """Additive storage: weights per form, their bytes before/after, the codebooks' bytes."""
    out = _storage(coded)
    if not out:
        return {}
    out["codebook_bytes"] = int(sum(2 * b.size for b in plan.codebooks.values()))  # float16
    out["codebooks"] = len(plan.codebooks)
    return out


def _packed(packed: list) -> dict[str, Any]:
    """Low-bit weights stored packed: tensors per bit width and bytes before/after."""
    if not packed:
        return {}
    by_bits: dict[int, int] = {}
    for p in packed:
        by_bits[p.bits] = by_bits.get(p.bits, 0) + 1
    return {
        "tensors": {str(b): n for b, n in sorted(by_bits.items())},
        "dense_bytes": sum(p.dense_bytes for p in packed),
        "bytes": sum(p.bytes for p in packed),
    }


def _storage(forms: list) -> dict[str, Any]:
    """How pruned (or coded) weights were stored: tensors per form and bytes before/after."""
    if not forms:
        return {}
    out: dict[str, Any] = {"tensors": {}, "dense_bytes": 0, "stored_bytes": 0}
    for c in forms:
        out["tensors"][c.form] = out["tensors"].get(c.form, 0) + 1
        out["dense_bytes"] += c.dense_bytes
        out["stored_bytes"] += c.bytes
    return out


def check_model(model: onnx.ModelProto, after: str) -> None:
    """onnx.checker on a model onnxlw produced; a failure is onnxlw's bug."""
    if model.ByteSize() > 1_800_000_000:
        return  # the in-memory checker cannot take it; onnxruntime still loads it in validate
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InternalError(f"the model after {after} fails onnx.checker: {first}") from None


def _resolve_samples(config: Config, loaded: LoadedModel) -> Config:
    """The config with ``samples`` set when the input's size lowers the default count
    (:meth:`Config.samples_for`); a note says so."""
    values = sum(int(np.prod(s[1:], dtype=np.int64))
                 for s in loaded.inputs.shapes(1).values())
    n = config.samples_for(values)
    if n == config.synth_samples:
        return config
    loaded.notes.append(
        f"{n} synthetic images instead of {config.synth_samples}: the inputs have {values:,} "
        f"values per image, {values / REFERENCE_IMAGE_VALUES:.1f}x a 3x224x224 image, and memory "
        "grows with both (pass --samples to choose)"
    )
    return dataclasses.replace(config, samples=n)


def precondition(canon: Canonical, config: Config, inputs: InputSpec) -> Canonical:
    """Passes that change the model before analysis: channel removal (``--prune
    channels:F``), then cross-layer equalization and high-bias absorption (``--equalize``,
    ``--absorb-bias``), which keep the function."""
    if config.prune is not None:
        target = parse_prune(config.prune)
        if target.kind == "channels":
            canon = prune_channels(canon, inputs, config, target.sparsity)
    if config.equalizes or config.absorb_bias:
        m, st, notes = equalize(
            canon.model, canon.bn_stats, scale=config.equalizes, absorb=config.absorb_bias
        )
        canon = canon.replace(model=m, bn_stats=st, notes=[*canon.notes, *notes])
    return canon


def check_plan_precondition(plan: Plan, config: Config) -> None:
    """OnnxlwError unless ``config`` preconditions the model as the run that solved ``plan``
    did: its weights were solved on the rescaled model, so another rescaling gives a wrong
    output. A plan from before equalization existed (no ``equalize`` option) was solved
    without it."""
    opts = plan.meta.get("options")
    if not opts:
        return
    saved = Config.from_dict(opts)
    was = {
        "cross-layer equalization": ("equalize" in opts and saved.equalizes, config.equalizes,
                                     "--equalize on|off"),
        "high-bias absorption": (saved.absorb_bias, config.absorb_bias, "--absorb-bias"),
    }
    then_in = saved.input_act_bits if "input_bits" in opts else saved.act_bits
    if then_in != config.input_act_bits:
        raise OnnxlwError(
            f"the plan was solved with the graph inputs on a {then_in}-bit grid and this run "
            f"asks for {config.input_act_bits} bits",
            f"pass --input-bits {then_in}, or solve again without --load-plan",
        )
    for what, (then, now, flag) in was.items():
        if then != now:
            raise OnnxlwError(
                f"the plan was solved with {what} {'on' if then else 'off'} and this run has it "
                f"{'on' if now else 'off'}",
                f"pass the options the plan was saved with ({flag}, or the same --weight-bits)",
            )


def _collect(
    canon: Canonical, analysis: Analysis, loaded: LoadedModel, config: Config
) -> StatsCollector:
    view = GraphView(canon.model)
    by_index = {r.index: r for r in analysis.active_layers}
    weights = _Consts(view, {i: r.weight for i, r in by_index.items()})
    biases = _Consts(view, {i: r.bias for i, r in by_index.items()})
    collector = StatsCollector(analysis, loaded.inputs, config, weights, biases)
    try:
        collector.info = synthesize(canon, collector.wanted, loaded.inputs, config, collector)
        collector.finish()
        missing = collector.missing(analysis.active_layers)
        if missing:
            raise InternalError(f"synthesis produced no input for layer {missing[0].node!r}")
    except BaseException:
        collector.close()
        raise
    release_memory()
    return collector


class _Consts(Mapping):
    """Layer index -> weight (or bias) array, read from the graph when asked and not kept, so
    only the layers being worked on hold a numpy copy of their weights."""

    def __init__(self, view: GraphView, names: dict[int, str | None]) -> None:
        self.view, self.names = view, names

    def __getitem__(self, index: int) -> np.ndarray | None:
        name = self.names[index]
        if not name:
            return None
        if name in self.view.initializers:
            return numpy_helper.to_array(self.view.initializers[name])
        return self.view.const(name)

    def __iter__(self):  # noqa: ANN204
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def no_layers_error(analysis: Analysis, model: onnx.ModelProto) -> OnnxlwError:
    """One short line naming why nothing can be compressed, and the real fix."""
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
              "ConvInteger", "MatMulInteger"}:
        return OnnxlwError(
            "the model is already quantized (it has QuantizeLinear/DequantizeLinear or "
            "integer ops)",
            "pass the original FP32 model",
        )
    reasons = [r.skip for r in analysis.layers if r.skip]
    if reasons and all("float16" in r for r in reasons):
        return OnnxlwError(
            f"all {len(reasons)} layers have float16 weights; onnxlw compresses float32 models",
            "convert the model to float32 first (or export it in float32)",
        )
    if not analysis.layers:
        return OnnxlwError(
            "no compressible layer: no Conv, Gemm or MatMul in the graph",
            "pass a CNN with Conv/Gemm layers",
        )
    counts: dict[str, int] = {}
    for r in reasons:
        counts[r] = counts.get(r, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[0]
    return OnnxlwError(
        f"no compressible layer: {top[1]} of {len(analysis.layers)} layers: {top[0][:160]}",
        "run `onnxlw inspect` for every layer's reason",
    )


def _set_metadata(
    out: onnx.ModelProto,
    loaded: LoadedModel,
    canon: Canonical,
    config: Config,
    fallback: str | None,
    validation: Any,
) -> None:
    meta = {p.key: p.value for p in out.metadata_props}
    spec = loaded.inputs
    meta.update(
        {
            "onnxlw.version": __version__,
            "onnxlw.options": json.dumps(config.to_dict(), sort_keys=True),
            "onnxlw.seed": str(config.seed),
            "onnxlw.input_sha256": loaded.sha256,
            "onnxlw.bn_statistics": "found" if canon.bn_found else f"missing; fallback={fallback}",
            "onnxlw.onnxruntime_version": onnxruntime.__version__,
            "onnxlw.saturation_guard": (
                f"on (u8s8 pair order verified on onnxruntime {TUNED_FOR})"
                if config.saturation_guard
                else "off"
            ),
            "onnxlw.input_range": (
                f"[{spec.declared_range[0]:.6g}, {spec.declared_range[1]:.6g}] from "
                f"{spec.range_source}"
                if spec.declared_range
                else "none declared"
            ),
            "onnxlw.validation": (
                f"sqnr_db={validation.sqnr_db:.2f} on {validation.samples} synthetic inputs; "
                + ("LOOKS BROKEN" if validation.looks_broken else "ok")
            ),
        }
    )
    del out.metadata_props[:]
    for k in sorted(meta):
        out.metadata_props.add(key=k, value=meta[k])


__all__ = ["check_model", "compress", "no_layers_error"]
