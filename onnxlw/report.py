"""The run report: what was done, what was measured, and what was not done and why."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .io import default_opset
from .targets.ort_cpu import PLANES_OPSET
from .validate import Validation

if TYPE_CHECKING:
    from .analyze import Analysis
    from .config import Config
    from .io import LoadedModel
    from .passes import Canonical
    from .plan import Plan
    from .synth import SynthesisInfo

BN_EXPORT_HINT = (
    "export with torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, "
    "do_constant_folding=False) to keep BatchNormalization"
)


@dataclass
class LayerReport:
    """One layer's line in the report."""

    index: int
    node: str
    op_type: str
    weight_shape: list[int]
    params: int
    sources: list[str]
    skipped: str | None = None
    sqnr_db: float | None = None
    bias_shift_rms: float | None = None
    saturation_fixes: int | None = None
    bias_scale_fixes: int | None = None
    output_float: str | None = None
    """Why the layer's output is left in float (head outputs), if it is."""
    stats: dict[str, float] = field(default_factory=dict)
    """Everything the solver measured (sqnr_minmax_db, mean_clip, damping, ...)."""


@dataclass
class Report:
    """Everything a user needs to trust (or distrust) one compression run."""

    version: str
    source: str
    input_sha256: str
    config: dict[str, Any]
    bn_found: bool
    bn_count: int
    fallback: str | None
    external_data: bool = False
    warnings: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    activations_quantized: int = 0
    input_grid_bits: list[int] = field(default_factory=list)
    """Bits of the grids written for the graph inputs' data (``Analysis.input_data``)."""
    unsupported_ops: list[str] = field(default_factory=list)
    validation: Validation | None = None
    size_before: int = 0
    size_after: int = 0
    wall_time: float = 0.0
    inputs: dict[str, Any] = field(default_factory=dict)
    synthesis: dict[str, Any] = field(default_factory=dict)
    onnxruntime_version: str = ""
    size_zipped_before: int = 0
    size_zipped_after: int = 0
    sparse_storage: dict[str, Any] = field(default_factory=dict)
    """Pruned weights' storage: tensors per form (dense/bitmask/sparse) and bytes."""
    packed: dict[str, Any] = field(default_factory=dict)
    """Low-bit weights stored packed: tensors per bit width and bytes before/after."""
    network_aware: bool | str | None = None
    """True when every layer was solved again on the compressed network's input; a string
    saying why it did not run; None when it was not asked for."""
    size_budget: dict[str, Any] = field(default_factory=dict)
    """Mixed precision: target and measured bytes, allocation rounds, predicted error."""
    additive: dict[str, Any] = field(default_factory=dict)
    """Additive quantization: codebook shape, scope, objective, fit history, layers coded."""
    codebook_storage: dict[str, Any] = field(default_factory=dict)
    """Additive storage: weights per form (codes/int8), bytes before/after, codebook bytes."""
    plan: Any = field(default=None, repr=False, compare=False)
    """The solved :class:`~onnxlw.plan.Plan` (not part of the JSON)."""

    @property
    def layers_quantized(self) -> int:
        """Number of layers that were quantized."""
        return sum(1 for r in self.layers if r.skipped is None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (inf/nan become strings)."""
        plan, self.plan = self.plan, None
        try:
            d = asdict(self)
        finally:
            self.plan = plan
        d.pop("plan", None)
        d["layers_quantized"] = self.layers_quantized
        d["saturation_fixes"] = sum(r.saturation_fixes or 0 for r in self.layers)
        d["bias_scale_fixes"] = sum(r.bias_scale_fixes or 0 for r in self.layers)
        return _clean(d)

    def to_json(self) -> str:
        """Deterministic JSON text."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def _input_bits_note(self) -> str:
        """" (graph inputs N bits)" when the grid written for the inputs' data differs from
        the activations' (read from the written grids, so a loaded plan reports its own)."""
        act = self.config.get("act_bits", 8)
        other = [b for b in self.input_grid_bits if b != act]
        return f" (graph inputs {'/'.join(map(str, other))} bits)" if other else ""

    def summary(self) -> str:
        """The closing summary printed by the CLI."""
        v = self.validation
        lines = []
        if not self.bn_found:
            lines.append(
                f"WARNING: no BatchNormalization statistics found; fallback: "
                f"{self.fallback}. To keep BN: {BN_EXPORT_HINT}."
            )
        lines += [f"warning: {w}" for w in self.warnings if "BatchNormalization" not in w]
        n_layers = len(self.layers)
        lines.append(
            f"layers quantized : {self.layers_quantized}/{n_layers}"
            + (
                f" ({n_layers - self.layers_quantized} skipped, see report)"
                if self.layers_quantized < n_layers
                else ""
            )
        )
        bn = f"found ({self.bn_count})" if self.bn_found else f"MISSING -> {self.fallback}"
        lines.append(f"BN statistics    : {bn}")
        ratio = self.size_before / self.size_after if self.size_after else float("nan")
        lines.append(
            f"size             : {_mb(self.size_before)} -> {_mb(self.size_after)} "
            f"({ratio:.2f}x smaller)"
        )
        done = [r for r in self.layers if r.skipped is None]
        if any("sparsity" in r.stats for r in done):
            total = sum(r.params for r in done)
            zeros = sum(r.params * r.stats.get("sparsity", 0.0) for r in done)
            lines.append(
                f"sparsity         : {100 * zeros / max(total, 1):.1f} % of {total:,} "
                f"compressible weights are zero (target {self.config.get('prune')})"
            )
            if self.size_zipped_after:
                lines.append(
                    f"zipped size      : {_mb(self.size_zipped_before)} -> "
                    f"{_mb(self.size_zipped_after)} (zlib level 6)"
                )
            st = self.sparse_storage
            if st:
                forms = ", ".join(f"{v} {k}" for k, v in sorted(st["tensors"].items()))
                lines.append(
                    f"sparse storage   : {forms}; those tensors {_mb(st['dense_bytes'])} -> "
                    f"{_mb(st['stored_bytes'])}"
                )
        ad = self.additive
        if ad:
            coded = [r for r in done if r.stats.get("bits_per_weight", 8) < 8]
            n = sum(r.params for r in coded)
            mean = sum(r.params * r.stats["bits_per_weight"] for r in coded) / max(n, 1)
            lines.append(
                f"additive codes   : {len(coded)} layers ({n:,} weights) at {ad['bits']:g} code "
                f"bits per weight ({_books(ad)} book(s) x {2 ** ad['code_bits']} codewords, "
                f"dim {ad['dim']}; {mean:.2f} with padding and row scales), "
                f"{ad['int8_layers']} layers at 8 bits; codebooks {ad['scope']}, "
                f"{ad['objective']} error"
                + (f" ({ad['objective_why']})" if "BN" in ad.get("objective_why", "") else "")
            )
            cs = self.codebook_storage
            if cs:
                lines.append(
                    f"codebook storage : {cs['codebooks']} codebook set(s) "
                    f"{cs['codebook_bytes'] / 1e3:.1f} kB; coded/int8 weights "
                    f"{_mb(cs['dense_bytes'])} -> {_mb(cs['stored_bytes'])}; rebuilt at "
                    "session start"
                )
        bits = [int(r.stats["bits"]) for r in done if "bits" in r.stats]
        if not ad and (bits and min(bits) < 8 or self.config.get("act_bits", 8) < 8
                       or any(b < 8 for b in self.input_grid_bits)):
            hist = ", ".join(
                f"{bits.count(b)} at {b}" for b in sorted(set(bits), reverse=True)
            )
            total = sum(r.params for r in done if "bits" in r.stats)
            mean = sum(r.params * r.stats["bits"] for r in done if "bits" in r.stats)
            lines.append(
                f"weight bits      : {hist} (mean {mean / max(total, 1):.2f} bits per weight); "
                f"activations {self.config.get('act_bits', 8)} bits{self._input_bits_note()}"
            )
            sb = self.size_budget
            if sb:
                lines.append(
                    f"size budget      : {self.size_after:,} bytes written, target "
                    f"{sb['target_bytes']:,} ({len(sb['rounds'])} allocation round(s))"
                )
            pk = self.packed
            if pk:
                lines.append(
                    f"packed storage   : {sum(pk['tensors'].values())} tensors; "
                    f"{_mb(pk['dense_bytes'])} as int8 -> {_mb(pk['bytes'])} packed"
                )
        eq = [n for n in self.notes if n.get("pass_name") == "equalize"]
        if eq:
            fired = [n for n in eq if n["fired"]]
            absorbed = sum(int(m.group(1)) for n in fired
                           if (m := re.search(r"(\d+) channel biases absorbed", n["reason"])))
            why = sorted({n["reason"] for n in eq if not n["fired"]})
            streams = sum(n["rule"] == "stream" for n in fired)
            lines.append(
                f"preconditioning  : {len(fired) - streams} conv pairs and {streams} residual "
                "streams rescaled"
                + (f", {absorbed} channel biases absorbed" if absorbed else "")
                + (f"; {len(eq) - len(fired)} not ({'; '.join(why)})" if why else "")
            )
        if self.network_aware is True:
            lines.append(
                "network-aware    : each layer solved again on the compressed network's input"
            )
        elif isinstance(self.network_aware, str):
            lines.append(f"network-aware    : {self.network_aware}")
        fixes = sum(r.saturation_fixes or 0 for r in self.layers)
        bfix = sum(r.bias_scale_fixes or 0 for r in self.layers)
        lines.append(
            f"fixes            : {fixes} u8s8 weight pairs kept within int16, "
            f"{bfix} channels' weight scale raised so the int32 bias fits"
        )
        if v is not None:
            lines.append(
                f"fused convs      : {v.qlinear_conv} QLinearConv, {v.float_conv} float "
                "Conv left (onnxruntime ORT_ENABLE_ALL)"
            )
            if v.latency_ms is not None and v.reference_latency_ms:
                lines.append(
                    f"latency          : {v.latency_ms:.2f} ms vs {v.reference_latency_ms:.2f} ms "
                    f"FP32 ({v.latency_ms / v.reference_latency_ms:.2f}x; batch 1, one thread, "
                    "median)"
                )
            lines.append(
                f"self-check       : output SQNR {v.sqnr_db:.1f} dB vs FP32 on {v.samples} "
                "synthetic inputs (not an accuracy figure; pass --images DIR or run "
                "`onnxlw eval` for agreement on real images)"
            )
            if v.looks_broken:
                lines.insert(
                    0,
                    f"WARNING: THE OUTPUT LOOKS BROKEN: its SQNR vs FP32 is {v.sqnr_db:.1f} dB "
                    "on synthetic inputs; check the per-layer SQNR in the report and exclude "
                    "the worst layers with --exclude",
                )
        lines.append(
            f"wall time        : {self.wall_time:.1f} s ("
            + ", ".join(f"{k} {t:.1f}" for k, t in self.stages.items())
            + ")"
        )
        return "\n".join(lines)

    def layer_table(self) -> str:
        """One line per layer (``onnxlw compress -v``): its weights, bits, sparsity or books,
        rounding, output SQNR on the synthesized inputs, or why it was skipped."""
        rows = [("layer", "op", "weights", "bits", "sparsity", "rounding",
                 "SQNR dB (or why float)")]
        for r in self.layers:
            st = r.stats
            if r.skipped is not None:
                rows.append((r.node, r.op_type, f"{r.params:,}", "float", "", "", r.skipped))
                continue
            if "books" in st:
                bits, rnd = f"books {int(st['books'])}", "additive codes"
            elif "bits" in st:
                gptq = st.get("gptq_channels", 0) > 0
                bits = f"{int(st['bits'])}"
                rnd = f"gptq (damping {st.get('gptq_damping', 0.0):g})" if gptq else "nearest"
            else:
                bits, rnd = "", ""
            sp = f"{100 * st['sparsity']:.1f} %" if "sparsity" in st else ""
            sq = "" if r.sqnr_db is None else f"{r.sqnr_db:.1f}"
            rows.append((r.node, r.op_type, f"{r.params:,}", bits, sp, rnd, sq))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        widths[0] = min(widths[0], 60)
        out = []
        for row in rows:
            name = row[0] if len(row[0]) <= 60 else "..." + row[0][-57:]
            cells = [name.ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(row[2:5], widths[2:5], strict=True)]
            cells += [row[5].ljust(widths[5]), row[6]]
            out.append("  ".join(cells).rstrip())
        return "\n".join(out)


def _books(ad: dict[str, Any]) -> str:
    lo, hi = ad.get("min_books", ad["books"]), ad["books"]
    return f"{hi}" if lo == hi else f"{lo}-{hi}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def make_report(
    loaded: LoadedModel,
    canon: Canonical,
    analysis: Analysis,
    plan: Plan,
    config: Config,
    fallback: str | None,
    info: SynthesisInfo | None,
) -> Report:
    """The report of one run; reads only the solutions' stats (works for every method)."""
    import onnxruntime

    from ._version import __version__

    warnings = list(loaded.notes)
    spec = loaded.inputs
    if spec.declared_range is None:
        warnings.append(
            "no input range declared (no --input-range, no preprocessing sidecar): the input "
            "range is estimated from synthetic inputs"
        )
    if fallback and "per-image" in fallback:
        warnings.append(
            "the graph hard-codes its batch size, so synthesis ran one image at a "
            "time (moments matched per image)"
        )
    if info is not None:
        warnings += info.notes
    if not canon.bn_found:
        warnings.append(
            "no BatchNormalization statistics in the model (was BN folded at "
            f"export?); fallback {fallback}; {BN_EXPORT_HINT}"
        )
    if (config.equalize == "on" or config.absorb_bias) and not canon.bn_found:
        warnings.append(
            "--equalize/--absorb-bias did nothing: they need the BN statistics the model lacks"
        )
    elif config.equalizes and not canon.bn_found:
        warnings.append(
            "cross-layer equalization (on below 8 bits) skipped: it needs BN statistics"
        )
    floats = dict(analysis.float_outputs)
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
        lr.output_float = floats.get(rec.output)
        sol = plan.layers.get(rec.index)
        if sol is not None:
            st = dict(sol.stats)
            lr.stats = {k: round(float(v), 6) for k, v in sorted(st.items())}
            lr.sqnr_db = round(float(st.get("sqnr_db", float("nan"))), 2)
            lr.bias_shift_rms = float(st.get("bias_shift_rms", 0.0))
            lr.saturation_fixes = int(st.get("saturation_fixes", 0))
            lr.bias_scale_fixes = int(st.get("bias_scale_fixes", 0))
        layers.append(lr)
    unpacked = sorted({
        int(sol.stats["bits"]) for sol in plan.layers.values()
        if int(sol.stats.get("bits", 8)) not in (2, 4, 8)
    })
    opset = default_opset(loaded.model)
    if unpacked and config.pack_weights and opset < PLANES_OPSET:
        warnings.append(
            f"opset {opset}: {'/'.join(map(str, unpacked))}-bit weights are stored as "
            f"{'4' if unpacked == [3] else 'int8 (3 as 4)'} bits, not packed: the bit planes "
            f"need opset {PLANES_OPSET} (int8 Add); export the model at opset "
            f"{PLANES_OPSET} or higher for the smaller file"
        )
    if floats:
        warnings.append(
            f"{len(floats)} head conv output(s) left in float (they reach a graph output "
            "through shape/sigmoid/softmax ops; synthetic inputs do not show their real "
            "range), so those convs run in float"
        )
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
        input_grid_bits=sorted({a.bits for t, a in plan.activations.items()
                                if t in analysis.input_data}),
        unsupported_ops=analysis.unsupported_ops,
        inputs=spec.to_dict(),
        synthesis={"mode": info.mode, "segments": info.segments} if info else {"plan": "loaded"},
        onnxruntime_version=onnxruntime.__version__,
        size_budget=dict(plan.meta.get("size_budget", {})),
        network_aware=plan.meta.get("network_aware"),
        additive=dict(plan.meta.get("additive", {})),
    )
