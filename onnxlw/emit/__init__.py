"""Emitters, one per output format: ``(canonical, analysis, plan) -> ModelProto``."""

from .qdq import emit_qdq

EMITTERS = {"qdq": emit_qdq}

__all__ = ["EMITTERS", "emit_qdq"]
