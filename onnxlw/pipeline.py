"""load -> canonicalize -> analyze -> synthesize -> solve -> emit -> validate -> report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import numpy as np
import onnx

from ._version import __version__
from .analyze import Analysis, analyze
from .config import Config
from .driver import QuantPlan, solve_plan
from .emit.qdq import emit_qdq
from .errors import OnnxlwError
from .io import LoadedModel, load
from .passes import Canonical, canonicalize
from .report import BN_EXPORT_HINT, LayerReport, Report
from .synth import synthesize
from .validate import validate

Progress = Callable[[str], None]


def compress(
    model: onnx.ModelProto | str | os.PathLike,
    config: Config | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Compress a model with no data. Returns the QDQ model and the report.

    Raises :class:`~onnxlw.errors.OnnxlwError` for bad input; the input is never modified.
    """
    config = config or Config()
    say = progress or (lambda _msg: None)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    def stage(name: str, fn, *args, **kw):  # noqa: ANN001, ANN202 - thin timing wrapper
        say(f"{name}...")
        t = time.perf_counter()
        out = fn(*args, **kw)
        stages[name] = round(time.perf_counter() - t, 3)
        return out

    loaded: LoadedModel = stage("load", load, model, config)
    canon: Canonical = stage("canonicalize", canonicalize, loaded.model)
    analysis: Analysis = stage(
        "analyze", analyze, canon, quantize_classifier=config.quantize_classifier
    )
    if not analysis.active_layers:
        why = "; ".join(f"{n}: {r}" for n, r in analysis.skips) or "none in the graph"
        raise OnnxlwError(
            f"no compressible layer (Conv, Gemm, MatMul with a constant weight): {why}",
            "pass a CNN with Conv/Gemm layers",
        )
    samples = stage("synthesize", synthesize, canon, analysis, config)
    plan: QuantPlan = stage("solve", solve_plan, canon, analysis, samples, config)
    out = stage("emit", emit_qdq, canon.model, analysis, plan)
    _set_metadata(out, loaded, canon, config, samples.fallback)
    validation = stage("validate", validate, out, loaded.model, config)
    report = _report(loaded, canon, analysis, plan, config, samples.fallback)
    report.validation = validation
    report.stages = stages
    report.size_before = loaded.model.ByteSize()
    report.size_after = out.ByteSize()
    report.wall_time = round(time.perf_counter() - t0, 3)
    return out, report


def _set_metadata(
    out: onnx.ModelProto,
    loaded: LoadedModel,
    canon: Canonical,
    config: Config,
    fallback: str | None,
) -> None:
    meta = {p.key: p.value for p in out.metadata_props}
    meta.update(
        {
            "onnxlw.version": __version__,
            "onnxlw.options": json.dumps(config.to_dict(), sort_keys=True),
            "onnxlw.seed": str(config.seed),
            "onnxlw.input_sha256": loaded.sha256,
            "onnxlw.bn_statistics": "found" if canon.bn_found else f"missing; fallback={fallback}",
        }
    )
    del out.metadata_props[:]
    for k in sorted(meta):
        out.metadata_props.add(key=k, value=meta[k])


def _report(
    loaded: LoadedModel,
    canon: Canonical,
    analysis: Analysis,
    plan: QuantPlan,
    config: Config,
    fallback: str | None,
) -> Report:
    warnings = list(loaded.notes)
    if fallback and "per-image" in fallback:
        warnings.append(
            "the graph hard-codes its batch size, so synthesis ran one image at a "
            "time (moments matched per image)"
        )
    if not canon.bn_found:
        warnings.append(
            "no BatchNormalization statistics in the model (was BN folded at "
            f"export?); fallback {fallback}; {BN_EXPORT_HINT}"
        )
    layers = []
    for rec in analysis.layers:
        lr = LayerReport(
            rec.index,
            rec.node,
            rec.op_type,
            list(rec.weight_shape),
            rec.params,
            list(rec.sources),
            rec.skip,
        )
        sol = plan.weights.get(rec.index)
        if sol is not None:
            lr.sqnr_db = round(sol.sqnr_db, 2)
            lr.sqnr_minmax_db = round(sol.sqnr_minmax_db, 2)
            lr.mean_clip = round(float(sol.clip.mean()), 4)
            lr.dead_columns = sol.dead_columns
            lr.damping = sol.damping
            lr.bias_shift_rms = float(np.sqrt(np.mean(sol.bias_shift.astype(np.float64) ** 2)))
        layers.append(lr)
    return Report(
        version=__version__,
        source=loaded.source,
        input_sha256=loaded.sha256,
        config=config.to_dict(),
        bn_found=canon.bn_found,
        bn_count=len(canon.bn_stats),
        fallback=fallback,
        external_data=loaded.external_data,
        warnings=warnings,
        notes=[n.to_dict() for n in canon.notes],
        layers=layers,
        activations_quantized=len(analysis.qtensors),
        unsupported_ops=analysis.unsupported_ops,
    )
