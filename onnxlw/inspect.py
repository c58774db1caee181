"""``onnxlw inspect``: what the tool sees in a model, without compressing it."""

from __future__ import annotations

import collections
import os

from .analyze import analyze
from .config import Config
from .io import load
from .passes import canonicalize
from .pipeline import no_layers_error
from .report import BN_EXPORT_HINT


def inspect_model(path: str | os.PathLike, config: Config) -> str:
    """A human-readable listing: layers, params, BN statistics, unsupported ops, pass notes."""
    loaded = load(path, config)
    canon = canonicalize(loaded.model)
    analysis = analyze(
        canon,
        quantize_classifier=config.quantize_classifier,
        exclude=config.exclude,
        float_heads=config.float_heads,
    )
    ops = collections.Counter(n.op_type for n in loaded.model.graph.node)
    spec = loaded.inputs
    rng = (
        f"[{spec.declared_range[0]:.4g}, {spec.declared_range[1]:.4g}] from {spec.range_source}"
        if spec.declared_range
        else "none declared (estimated from synthetic inputs)"
    )
    lines = [
        f"model      : {loaded.source} (opset {loaded.original_opset}"
        + (f", compressed at {loaded.opset}" if loaded.opset != loaded.original_opset else "")
        + f", sha256 {loaded.sha256[:12]})",
        "inputs     : "
        + ", ".join(f"{i.name} {list(i.dims)}" for i in spec.inputs)
        + f"; input range {rng}",
        "ops        : " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())),
    ]
    lines += [f"note       : {n}" for n in loaded.notes]
    if canon.bn_found:
        folded = sum(1 for s in canon.bn_stats.values() if s.folded_into)
        lines.append(
            f"BN stats   : found, {len(canon.bn_stats)} BatchNormalization ({folded} foldable)"
        )
    else:
        lines.append(
            "BN stats   : MISSING (no BatchNormalization in the model: folded at export, or it "
            "never had BN); compress will fall back to propagating the input distribution. "
            f"If it had BN: {BN_EXPORT_HINT}"
        )
    lines.append("unsupported: " + (", ".join(analysis.unsupported_ops) or "none"))
    total = sum(r.params for r in analysis.layers)
    lines.append(
        f"layers     : {len(analysis.layers)} ({len(analysis.active_layers)} "
        f"compressible), {total} params"
    )
    for r in analysis.layers:
        geo = ""
        if r.geom is not None:
            geo = f" k{r.geom.kernel[0]}x{r.geom.kernel[1]} s{r.geom.strides[0]} g{r.geom.group}"
        state = f"SKIP: {r.skip}" if r.skip else ", ".join(r.sources)
        lines.append(
            f"  [{r.index:3d}] {r.op_type:6s} {list(r.weight_shape)!s:20s}{geo:14s} "
            f"{r.node}  <- {state}"
        )
    for t, why in analysis.float_outputs:
        lines.append(f"  float output {t}: {why}")
    if not analysis.active_layers:
        lines.append(f"compress would refuse: {no_layers_error(analysis, loaded.model).one_line()}")
    else:
        lines.append(
            f"compress would quantize {len(analysis.active_layers)} of {len(analysis.layers)} "
            f"layers and {len(analysis.qtensors)} activation tensors"
        )
    not_fired = [n for n in canon.notes if not n.fired]
    if not_fired:
        lines.append("rules not applied:")
        lines += [f"  {n.pass_name}/{n.rule} at {n.where}: {n.reason}" for n in not_fired]
    return "\n".join(lines)
