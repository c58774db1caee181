"""Evaluation on real images: preprocessing from sidecars, metrics, the ``eval`` subcommand.

Pillow is needed only to decode image files (the ``eval`` extra); ``.npz`` sources work
without it.
"""

from __future__ import annotations

from .evaluate import EvalResult, evaluate, measure_latency, metrics, run_model
from .preprocess import PRESETS, Preprocess, load_images, select_preset

__all__ = [
    "PRESETS",
    "EvalResult",
    "Preprocess",
    "evaluate",
    "load_images",
    "measure_latency",
    "metrics",
    "run_model",
    "select_preset",
]
