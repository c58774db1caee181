"""Validate an emitted model in onnxruntime: it loads, its convs fuse, it agrees with FP32."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .config import Config
from .errors import OnnxlwError
from .ortutil import conv_counts, optimized_session, run, run_model_batched, static_batch
from .synth import input_shapes
from .synth.inputs import synthetic_input


@dataclass(frozen=True)
class Validation:
    """Measured facts about the emitted model (ORT_ENABLE_ALL, CPU)."""

    qlinear_conv: int
    float_conv: int
    op_counts: dict[str, int]
    sqnr_db: float
    top1_agreement: float | None
    samples: int

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return asdict(self)


def validate(quantized: onnx.ModelProto, reference: onnx.ModelProto, config: Config) -> Validation:
    """Load ``quantized`` in ORT (failing loudly), count fused ops, compare with ``reference``.

    Inputs are seeded synthetic draws of the declared input distribution.
    """
    try:
        qs, counts = optimized_session(quantized)
    except Exception as e:  # noqa: BLE001 - ORT raises several types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxlwError(
            f"the compressed model does not load in onnxruntime: {msg}",
            "rerun with -v and report it; no output was written",
        ) from None

    rng = np.random.default_rng(config.seed + 2)
    b0 = static_batch(quantized)
    n = config.validate_samples
    if b0 and n % b0:
        n = b0 * -(-n // b0)  # a whole number of the model's fixed batches
    shapes = input_shapes(reference, config, n)
    feeds = {k: synthetic_input(v, config.input_distribution, rng) for k, v in shapes.items()}
    ref, _ = run_model_batched(reference, feeds)
    got = run(qs, feeds, batch=b0 if b0 and b0 != n else 0)
    sig = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    err = sum(float(np.sum((r.astype(np.float64) - g) ** 2)) for r, g in zip(ref, got, strict=True))
    sqnr = float(10 * np.log10(sig / err)) if err > 0 else float("inf")
    agree = None
    if ref[0].ndim == 2 and ref[0].shape[1] > 1:
        agree = float(np.mean(ref[0].argmax(1) == got[0].argmax(1)))
    fused, fp = conv_counts(counts)
    return Validation(fused, fp, counts, sqnr, agree, n)
