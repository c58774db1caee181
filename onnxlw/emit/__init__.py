"""Emitters, one per output format: ``(canonical, analysis, plan) -> ModelProto``."""

from .dense import emit_dense
from .qdq import emit_qdq

EMITTERS = {"qdq": emit_qdq, "dense": emit_dense}

__all__ = ["EMITTERS", "emit_dense", "emit_qdq"]
