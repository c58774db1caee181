"""Validate an emitted model in onnxruntime: it loads, its convs fuse, it agrees with FP32.

The comparison runs on seeded synthetic inputs of the declared distribution (inside the
declared range), not on data: its SQNR and agreement are a self-consistency check of the
output, not an accuracy estimate. ``onnxlw eval`` (or ``compress --images``) measures
agreement on real images.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .config import Config
from .errors import InternalError
from .inputspec import InputSpec
from .ortutil import LEAN_LEVEL, conv_counts, optimized_session, release_memory, session
from .synth import draw_inputs

VALIDATE_CHUNK = 4
"""Validation runs the compressed model on this many inputs at a time (bounded memory)."""
BROKEN_DB = 3.0
"""Below this validation SQNR the output is flagged as looking broken. Pink noise is not the
model's data: sound outputs measure 5-30 dB on it (the bundled digits CNN: 5.4-19.9 dB at
99.7-100 % real agreement, depending on options; ResNet-56: 6.6 dB at 98.2 %), a collapsed one
is below 0 dB."""


@dataclass(frozen=True)
class Validation:
    """Measured facts about the emitted model (ORT_ENABLE_ALL, CPU)."""

    qlinear_conv: int
    float_conv: int
    op_counts: dict[str, int]
    sqnr_db: float
    synthetic_top1_agreement: float | None
    samples: int
    inputs: str = "synthetic"
    looks_broken: bool = False
    latency_ms: float | None = None
    """Median batch-1 latency of the output (one intra-op thread), when measured."""
    reference_latency_ms: float | None = None
    """The same for the original model, runs alternated with the output's."""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return asdict(self)


def validate(
    quantized: onnx.ModelProto,
    reference: onnx.ModelProto,
    inputs: InputSpec,
    config: Config,
    reference_path: str | os.PathLike | None = None,
    latency_runs: int = 0,
) -> Validation:
    """Load ``quantized`` in ORT, count fused ops, compare with ``reference``.

    ``reference_path``: the original file, which onnxruntime then reads itself (no second
    in-memory copy of a large model's weights).

    A model onnxlw wrote that onnxruntime cannot load is onnxlw's bug: InternalError.
    """
    rng = np.random.default_rng([config.seed, 3])
    n = config.validate_samples
    b0 = inputs.static_batch
    if b0 and n % b0:
        n = b0 * -(-n // b0)  # a whole number of the model's fixed batches
    feeds = draw_inputs(inputs, config, n, rng)
    chunk = b0 or VALIDATE_CHUNK
    parts = [{k: v[i : i + chunk] for k, v in feeds.items()} for i in range(0, n, chunk)]
    ref_src = reference
    if b0 is None:  # any batch runs: a lean session of the original, by path when it has one
        ref_src = reference_path if reference_path is not None else reference
    # The reference runs first and its session is freed before the compressed model's opens,
    # so a large model's weights are held by one session at a time. Chunk by chunk, so
    # outputs whose batch axis is not the first (a recognizer's [T, N, C]) compare as they come.
    rs = session(ref_src, lean=True, level=LEAN_LEVEL)
    refs = [rs.run(None, part) for part in parts]
    del rs
    release_memory()
    try:
        qs, counts = optimized_session(quantized)
    except Exception as e:  # noqa: BLE001 - ORT raises several types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InternalError(
            f"the compressed model does not load in onnxruntime: {msg}; no output was written"
        ) from None
    sig = err = 0.0
    hits = rows = 0
    classify = True
    for part, ref in zip(parts, refs, strict=True):
        got = qs.run(None, part)
        for r, g in zip(ref, got, strict=True):
            if r.dtype.kind != "f":
                continue
            sig += float(np.sum(r.astype(np.float64) ** 2))
            err += float(np.sum((r.astype(np.float64) - g) ** 2))
        r0, g0 = ref[0], got[0]
        classify = classify and r0.ndim == 2 and r0.shape[0] == len(next(iter(part.values())))
        if classify and r0.shape[1] > 1:
            hits += int(np.sum(r0.argmax(1) == g0.argmax(1)))
            rows += r0.shape[0]
    sqnr = float(10 * np.log10(sig / err)) if err > 0 else float("inf")
    agree = hits / rows if classify and rows else None
    fused, fp = conv_counts(counts)
    lat = ref_lat = None
    if latency_runs:
        del qs
        release_memory()
        ref_lat, lat = _latency(ref_src, quantized, {k: v[:1] for k, v in feeds.items()},
                                latency_runs)
    return Validation(
        fused, fp, counts, sqnr, agree, n, looks_broken=sqnr < BROKEN_DB, latency_ms=lat,
        reference_latency_ms=ref_lat,
    )


def _latency(
    reference: onnx.ModelProto | str | os.PathLike,
    out: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    runs: int,
) -> tuple[float, float]:
    """Median batch-1 latency in ms of (reference, out): one intra-op thread, alternated runs
    so that background load affects both alike, after 3 warm-up runs each."""
    sessions = [session(reference, threads=1), session(out, threads=1)]
    for s in sessions:
        for _ in range(3):
            s.run(None, feeds)
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times[0])), float(np.median(times[1]))
