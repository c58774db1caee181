"""Graph passes. Each takes a model and returns a new model plus notes; none mutates its input."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..graph import NameAllocator
from .base import Note, PassResult
from .bn_fold import BNStats, fold_batchnorm
from .cleanup import drop_noops, fuse_pad_into_conv, normalize_gemm
from .constants import fold_constants

__all__ = ["BNStats", "Canonical", "Note", "PassResult", "canonicalize", "name_nodes"]


@dataclass
class Canonical:
    """The canonical FP32 model (BN folded) plus the BN statistics and every pass's notes."""

    model: onnx.ModelProto
    bn_stats: dict[str, BNStats]
    notes: list[Note] = field(default_factory=list)

    @property
    def bn_found(self) -> bool:
        """True when the model had BatchNormalization statistics to harvest."""
        return bool(self.bn_stats)


def name_nodes(model: onnx.ModelProto) -> PassResult:
    """Give every node a unique name (from the allocator) so records can refer to it."""
    alloc = NameAllocator(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    seen: set[str] = set()
    renamed = 0
    for n in m.graph.node:
        if not n.name or n.name in seen:
            n.name = alloc.fresh(f"{n.op_type}_{n.output[0] if n.output else 'node'}")
            renamed += 1
        seen.add(n.name)
    return PassResult(
        m,
        [
            Note(
                "name_nodes",
                "unique-name",
                "graph",
                renamed > 0,
                f"named {renamed} nodes" if renamed else "all nodes named",
            )
        ],
    )


def canonicalize(model: onnx.ModelProto) -> Canonical:
    """Fold constants, drop no-ops, harvest and fold BN, normalize Gemm, fuse Pad into Conv."""
    notes: list[Note] = []
    res = name_nodes(model)
    notes += res.notes
    for p in (fold_constants, drop_noops):
        res = p(res.model)
        notes += res.notes
    fold = fold_batchnorm(res.model)
    notes += fold.notes
    res = fold
    for p in (normalize_gemm, fuse_pad_into_conv):
        res = p(res.model)
        notes += res.notes
    return Canonical(res.model, fold.stats or {}, notes)
