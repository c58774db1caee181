"""Emitters, one per output format: ``(canonical, analysis, plan) -> ModelProto``."""

from .dense import emit_dense
from .qdq import emit_qdq


def emit_canonical(canon, analysis, plan):  # noqa: ANN001, ANN201 - same signature as the others
    """The canonical model itself (channel removal with FP32 output), unused weights dropped."""
    from ..graph import rebuild

    return rebuild(canon.model, list(canon.model.graph.node), list(canon.model.graph.initializer))


EMITTERS = {"qdq": emit_qdq, "dense": emit_dense, "canonical": emit_canonical}

__all__ = ["EMITTERS", "emit_canonical", "emit_dense", "emit_qdq"]
