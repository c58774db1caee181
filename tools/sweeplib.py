"""What tools/prune_sweep.py and tools/lowbit_sweep.py share: compress a shared model with
one config, evaluate it against its FP32 model and time both at batch 1."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from onnxlw import Config, compress  # noqa: E402
from onnxlw.evaluation.evaluate import evaluate, measure_latency  # noqa: E402
from onnxlw.evaluation.preprocess import load_images, select_preset  # noqa: E402
from onnxlw.io import save_atomic  # noqa: E402


@dataclass
class Row:
    """One compressed model: its file, report, evaluation, latency ratio and compress time."""

    out: Path
    report: Any
    agree: float
    dtop1: float
    latency: float
    secs: float
    kl: float = float("nan")
    """Mean KL(FP32 || compressed) of the softmax outputs on the images: steadier than the
    agreement when comparing two close variants."""


class Bench:
    """A shared model with its evaluation images (ImageNet samples: all 1000; CIFAR-10: an
    even 2000) and one image for batch-1 latency."""

    def __init__(self, shared: Path, model: str) -> None:
        self.src = shared / "models" / f"{model}.onnx"
        cifar = "cifar" in model
        self.imgs = shared / "data" / ("cifar10-test-jpg" if cifar else "imagenet-sample-images")
        self.limit = 2000 if cifar else None
        self.x1, _, _ = load_images(self.imgs, select_preset(self.src), 1)
        self.model = model

    def run(self, cfg: Config, tmp: Path) -> Row:
        """Compress with ``cfg`` (in-process), evaluate, and time 30 batch-1 runs alternated
        with the FP32 model on one intra-op thread."""
        t0 = time.perf_counter()
        m, rep = compress(self.src, cfg)
        secs = time.perf_counter() - t0
        out = tmp / f"{self.model}.onnx"
        save_atomic(m, out)
        e = evaluate(self.src, out, self.imgs, None, limit=self.limit, latency_runs=0)
        lat = measure_latency([self.src, out], self.x1[:1], runs=30, threads=1)
        return Row(out, rep, 100 * e.top1_agreement, 100 * (e.cand_top1 - e.ref_top1),
                   lat[1] / lat[0], secs, e.kl_mean)
