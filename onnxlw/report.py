"""The run report: what was done, what was measured, and what was not done and why."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .validate import Validation

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
    sqnr_minmax_db: float | None = None
    mean_clip: float | None = None
    dead_columns: int | None = None
    damping: float | None = None
    bias_shift_rms: float | None = None


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
    unsupported_ops: list[str] = field(default_factory=list)
    validation: Validation | None = None
    size_before: int = 0
    size_after: int = 0
    wall_time: float = 0.0

    @property
    def layers_quantized(self) -> int:
        """Number of layers that were quantized."""
        return sum(1 for r in self.layers if r.skipped is None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (inf/nan become strings)."""
        d = asdict(self)
        d["layers_quantized"] = self.layers_quantized
        return _clean(d)

    def to_json(self) -> str:
        """Deterministic JSON text."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

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
        if v is not None:
            lines.append(
                f"fused convs      : {v.qlinear_conv} QLinearConv, {v.float_conv} float "
                "Conv left (onnxruntime ORT_ENABLE_ALL)"
            )
            agree = "n/a" if v.top1_agreement is None else f"{100 * v.top1_agreement:.1f}%"
            lines.append(
                f"vs FP32          : SQNR {v.sqnr_db:.1f} dB, top-1 agreement {agree} on "
                f"{v.samples} synthetic noise inputs (a sanity check, not an accuracy "
                "estimate: run `onnxlw eval` on real images)"
            )
        lines.append(
            f"wall time        : {self.wall_time:.1f} s ("
            + ", ".join(f"{k} {t:.1f}" for k, t in self.stages.items())
            + ")"
        )
        return "\n".join(lines)


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
