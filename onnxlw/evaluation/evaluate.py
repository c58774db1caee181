"""Compare a candidate (compressed) model with its FP32 reference on real images.

Shapes: ``x`` is float32 ``[N, C, H, W]``; logits are ``[N, K]``; labels are int64 ``[N]``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import ortutil
from ..errors import OnnxlwError
from .preprocess import Preprocess, get_preset, load_images, select_preset


@dataclass(frozen=True)
class EvalResult:
    """Accuracy, fidelity, speed and size of ``cand`` against ``ref`` on ``n`` images.

    Accuracies are fractions in [0, 1] (``None`` without labels). ``top1_agreement`` is the
    fraction of images where both models predict the same class; ``kl_mean`` is the mean
    ``KL(softmax(ref) || softmax(cand))`` in nats. Latencies are batch-1 medians in ms
    (``None`` when ``latency_runs == 0``); ``threads`` is the intra-op thread count used for
    both models (0 = onnxruntime's default). Counts are ops in the graph onnxruntime runs after
    ORT_ENABLE_ALL optimization; ``*_conv`` counts float ``Conv``/``FusedConv``.
    """

    ref: str
    cand: str
    images: str
    preprocess: str
    n: int
    ref_top1: float | None
    ref_top5: float | None
    cand_top1: float | None
    cand_top5: float | None
    top1_agreement: float
    kl_mean: float
    ref_latency_ms: float | None
    cand_latency_ms: float | None
    latency_runs: int
    threads: int
    ref_qlinearconv: int
    ref_conv: int
    cand_qlinearconv: int
    cand_conv: int
    ref_bytes: int
    cand_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict of all fields."""
        return dataclasses.asdict(self)


def _require_model(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise OnnxlwError(f"{what} model {p} not found", "pass an existing .onnx file")
    return p


def _input_name_and_shape(sess: Any) -> tuple[str, list[Any]]:
    inp = sess.get_inputs()[0]
    return inp.name, list(inp.shape)


def check_input_shape(sess: Any, x: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Raise :class:`OnnxlwError` when the static dims of the model input disagree with
    ``x`` ``[N, C, H, W]`` (wrong preset is the usual cause)."""
    _, shape = _input_name_and_shape(sess)
    if len(shape) != x.ndim:
        raise OnnxlwError(
            f"{path} takes a rank-{len(shape)} input but the images are rank {x.ndim}",
            "use images and preprocessing that match the model",
        )
    for want, got in zip(shape[1:], x.shape[1:], strict=True):
        if isinstance(want, int) and want > 0 and want != got:
            raise OnnxlwError(
                f"{path} expects input {shape} but the images are {list(x.shape)}",
                "pick the preprocessing that matches the model (--preset or --preprocess)",
            )


def run_model(path: str | os.PathLike[str], x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits ``[N, K]`` (first output, flattened per image) of the model on ``x``
    ``[N, C, H, W]``, run in chunks of ``batch`` (the tail chunk may be smaller)."""
    p = _require_model(path, "ONNX")
    sess = ortutil.session(p)
    check_input_shape(sess, x, p)
    name, shape = _input_name_and_shape(sess)
    if isinstance(shape[0], int) and shape[0] > 0:  # static batch dim
        batch = shape[0]
    out = ortutil.run(sess, {name: np.ascontiguousarray(x, dtype=np.float32)}, batch=batch)[0]
    return np.asarray(out, dtype=np.float32).reshape(x.shape[0], -1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[N, K]`` logits in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """Per-row ``KL(softmax(ref) || softmax(cand))`` ``[N]`` in nats, stable in float64."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(cand_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return np.maximum(kl, 0.0)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of ``[N, K]`` logits whose ``min(k, K)`` largest include the label."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def metrics(
    ref_logits: np.ndarray, cand_logits: np.ndarray, labels: np.ndarray | None
) -> dict[str, Any]:
    """Accuracy and fidelity of ``cand`` against ``ref`` from logits ``[N, K]``.

    Returns ``n``, ``ref_top1``, ``ref_top5``, ``cand_top1``, ``cand_top5`` (``None`` when
    ``labels`` is ``None``), ``top1_agreement`` and ``kl_mean``.
    """
    if ref_logits.shape != cand_logits.shape or ref_logits.ndim != 2:
        raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {cand_logits.shape}")
    out: dict[str, Any] = {"n": int(ref_logits.shape[0])}
    for who, lg in (("ref", ref_logits), ("cand", cand_logits)):
        for k in (1, 5):
            out[f"{who}_top{k}"] = None if labels is None else topk_accuracy(lg, labels, k)
    agree = ref_logits.argmax(axis=1) == cand_logits.argmax(axis=1)
    out["top1_agreement"] = float(agree.mean())
    out["kl_mean"] = float(kl_divergence(ref_logits, cand_logits).mean())
    return out


def measure_latency(
    paths: Sequence[str | os.PathLike[str]],
    x1: np.ndarray,
    runs: int = 50,
    threads: int = 0,
    warmup: int = 5,
) -> list[float]:
    """Median batch-1 latency in ms of each model on ``x1`` ``[1, C, H, W]``.

    All sessions use the same settings (``threads`` intra-op threads, 0 = ORT default). Runs
    alternate between the models so background load affects them alike.
    """
    sessions = [ortutil.session(p, threads=threads) for p in paths]
    feeds = [{_input_name_and_shape(s)[0]: x1} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(t)) for t in times]


def resolve_preprocess(
    preprocess: Preprocess | str | None, ref: str | os.PathLike[str]
) -> Preprocess | None:
    """A :class:`Preprocess`, a preset name, a JSON path, or ``None`` (= sidecar of ``ref``)."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        if preprocess.endswith(".json"):
            return Preprocess.from_file(preprocess)
        return get_preset(preprocess)
    return select_preset(ref)


def evaluate(
    ref: str | os.PathLike[str],
    cand: str | os.PathLike[str],
    images: str | os.PathLike[str],
    preprocess: Preprocess | str | None,
    limit: int | None = None,
    batch: int = 32,
    latency_runs: int = 50,
    threads: int = 0,
) -> EvalResult:
    """Evaluate ``cand`` against ``ref`` on ``images`` (folder or .npz, see
    :func:`load_images`). ``preprocess`` may be a :class:`Preprocess`, a preset name, a JSON
    path, or ``None`` for the sidecar next to ``ref``."""
    ref_p = _require_model(ref, "reference")
    cand_p = _require_model(cand, "candidate")
    pre = resolve_preprocess(preprocess, ref_p)
    x, labels, _ = load_images(images, pre, limit)
    ref_logits = run_model(ref_p, x, batch)
    cand_logits = run_model(cand_p, x, batch)
    if labels is not None and labels.max() >= ref_logits.shape[1]:
        raise OnnxlwError(
            f"labels reach {int(labels.max())} but {ref_p.name} has {ref_logits.shape[1]} classes",
            "evaluate on the dataset the model was trained for",
        )
    m = metrics(ref_logits, cand_logits, labels)
    lat: list[float | None] = [None, None]
    if latency_runs > 0:
        lat = list(measure_latency([ref_p, cand_p], x[:1], latency_runs, threads))
    ref_q, ref_c = ortutil.fused_conv_counts(ref_p)
    cand_q, cand_c = ortutil.fused_conv_counts(cand_p)
    return EvalResult(
        ref=str(ref_p),
        cand=str(cand_p),
        images=str(images),
        preprocess=pre.kind if pre is not None else "npz",
        ref_latency_ms=lat[0],
        cand_latency_ms=lat[1],
        latency_runs=latency_runs,
        threads=threads,
        ref_qlinearconv=ref_q,
        ref_conv=ref_c,
        cand_qlinearconv=cand_q,
        cand_conv=cand_c,
        ref_bytes=ortutil.file_size(ref_p),
        cand_bytes=ortutil.file_size(cand_p),
        **m,
    )
