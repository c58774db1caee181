"""Graph passes. None mutates its input.

Two kinds:

- a *model pass* ``fn(model) -> PassResult`` (new model plus notes) knows nothing of BN
  statistics; :func:`apply` runs one on a :class:`Canonical` and keeps the statistics;
- a *Canonical pass* ``fn(canon) -> Canonical`` returns a new Canonical. A pass that changes
  the values of a tensor with BN statistics (e.g. cross-layer equalization, which rescales
  output channels) must be one, and return the rescaled statistics (:meth:`BNStats.scaled`),
  e.g. ``canon.replace(model=m, bn_stats={**canon.bn_stats, t: s.scaled(1 / k)},
  notes=[*canon.notes, *new_notes])``.

:func:`canonicalize` chains them and checks its own output (:func:`check_canonical`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from ..errors import InternalError
from ..graph import NameAllocator
from .base import Note, PassResult
from .bn_fold import BNStats, fold_batchnorm
from .cleanup import drop_noops, explicit_conv_pads, fuse_pad_into_conv, normalize_gemm
from .constants import fold_constants
from .sparse import densify_sparse_initializers

__all__ = [
    "BNStats",
    "Canonical",
    "CanonicalPass",
    "ModelPass",
    "Note",
    "PassResult",
    "apply",
    "canonicalize",
    "check_canonical",
    "fold_bn",
    "name_nodes",
]

ModelPass = Callable[[onnx.ModelProto], PassResult]


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

    def replace(self, **changes: object) -> Canonical:
        """A new Canonical with ``changes`` (model, bn_stats, notes); this one is unchanged."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


CanonicalPass = Callable[[Canonical], Canonical]


def apply(canon: Canonical, fn: ModelPass) -> Canonical:
    """Run a model pass on ``canon.model``: a new Canonical with its notes appended.

    For model passes that keep the values of every tensor with BN statistics (they may drop
    the BN node itself, as long as its output tensor keeps its name and values).
    """
    res = fn(canon.model)
    return Canonical(res.model, dict(canon.bn_stats), [*canon.notes, *res.notes])


def fold_bn(canon: Canonical) -> Canonical:
    """Harvest every BN's statistics (added to ``canon``'s) and fold BN where safe."""
    res = fold_batchnorm(canon.model)
    return Canonical(res.model, {**canon.bn_stats, **(res.stats or {})}, [*canon.notes, *res.notes])


def check_canonical(model: onnx.ModelProto, source: onnx.ModelProto | None = None) -> None:
    """Run ``onnx.checker`` on a model onnxlw produced; raise InternalError when it fails.

    With ``source`` (the model onnxlw was given), a failure counts as onnxlw's only when
    ``source`` itself passes the checker; otherwise the input was already invalid and nothing
    is raised here (``io.load`` reports that to the user). A proto over 2 GB cannot be checked
    in memory and is skipped.
    """
    if model.ByteSize() >= 2**31:
        return
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        if source is not None and source.ByteSize() < 2**31:
            try:
                onnx.checker.check_model(source)
            except (onnx.checker.ValidationError, ValueError):
                return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InternalError(
            f"canonicalize produced a model that fails onnx.checker: {first}"
        ) from e


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


MODEL_PASSES_BEFORE_BN: tuple[ModelPass, ...] = (
    name_nodes,
    densify_sparse_initializers,
    fold_constants,
    drop_noops,
)
MODEL_PASSES_AFTER_BN: tuple[ModelPass, ...] = (
    normalize_gemm,
    explicit_conv_pads,
    fuse_pad_into_conv,
)


def canonicalize(model: onnx.ModelProto) -> Canonical:
    """Name nodes, densify sparse initializers, fold constants, drop no-ops, harvest and fold BN,
    normalize Gemm, make Conv pads explicit, fuse Pad into Conv; then check the result.

    Raises :class:`~onnxlw.errors.InternalError` when the result fails ``onnx.checker`` while
    ``model`` passes it.
    """
    canon = Canonical(model, {}, [])
    for p in MODEL_PASSES_BEFORE_BN:
        canon = apply(canon, p)
    canon = fold_bn(canon)
    for p in MODEL_PASSES_AFTER_BN:
        canon = apply(canon, p)
    check_canonical(canon.model, model)
    return canon
