"""Thin helpers around onnxruntime: sessions, optimized-graph op counts, runs."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxlwError
from .graph import all_tensors

ModelLike = onnx.ModelProto | str | os.PathLike


def session(
    model: ModelLike,
    *,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    threads: int = 0,
    optimized_path: str | None = None,
) -> ort.InferenceSession:
    """A CPU session for a model given as a path or a ModelProto."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def optimized_session(model: ModelLike) -> tuple[ort.InferenceSession, dict[str, int]]:
    """An ORT_ENABLE_ALL session plus the op-type counts of the graph it actually runs.

    Count keys are plain op types (domain dropped), e.g. ``{"QLinearConv": 52}``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        src = model if isinstance(model, onnx.ModelProto) else str(model)
        sess = session(src, optimized_path=path)
        opt = onnx.load(path, load_external_data=False)
    counts = collections.Counter(n.op_type for n in opt.graph.node)
    return sess, dict(sorted(counts.items()))


def optimized_op_counts(model: ModelLike) -> dict[str, int]:
    """Op-type counts of the graph onnxruntime actually runs at ORT_ENABLE_ALL."""
    return optimized_session(model)[1]


def conv_counts(counts: dict[str, int]) -> tuple[int, int]:
    """(integer convs, float convs) from optimized-graph op counts."""
    fp = counts.get("Conv", 0) + counts.get("FusedConv", 0) + counts.get("NhwcFusedConv", 0)
    return counts.get("QLinearConv", 0), fp


def fused_conv_counts(model: ModelLike) -> tuple[int, int]:
    """(integer convs, float convs) in the optimized graph.

    Integer convs are ``QLinearConv`` (any domain, NCHW or NHWC); float convs are ``Conv``,
    ``FusedConv`` and ``NhwcFusedConv``.
    """
    return conv_counts(optimized_op_counts(model))


def run(
    sess: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    batch: int = 0,
    outputs: list[str] | None = None,
) -> list[np.ndarray]:
    """Run a session, optionally in chunks of ``batch`` along axis 0 of every feed."""
    if not batch:
        return sess.run(outputs, feeds)
    n = next(iter(feeds.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, batch):
        parts.append(sess.run(outputs, {k: v[i : i + batch] for k, v in feeds.items()}))
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size (dim 0) of the first graph input, or None when it is symbolic."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
        return None
    return None


def with_symbolic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs have a symbolic dim 0 (outputs' shapes are dropped)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name not in inits and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_param = "onnxlw_batch"
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    return m


def run_model_batched(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
) -> tuple[list[np.ndarray], bool]:
    """Run ``model`` on feeds whose batch may differ from the model's fixed batch.

    Tries the whole batch at once (making dim 0 symbolic when it is fixed); if the graph
    hard-codes its batch, runs in chunks of the fixed batch. Returns the outputs and whether
    it had to chunk.
    """
    b0 = static_batch(model)
    n = next(iter(feeds.values())).shape[0]
    if b0 is None or b0 == n:
        return session(model).run(outputs, feeds), False
    try:
        return session(with_symbolic_batch(model)).run(outputs, feeds), False
    except Exception:  # noqa: BLE001 - the graph hard-codes its batch size
        if n % b0:
            raise OnnxlwError(
                f"the model hard-codes batch size {b0}, which does not divide {n} samples",
                f"pass --samples as a multiple of {b0}",
            ) from None
        return run(session(model), feeds, batch=b0, outputs=outputs), True


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external-data files it references."""
    p = Path(path)
    total = p.stat().st_size
    m = onnx.load(str(p), load_external_data=False)
    seen: set[str] = set()
    for t in all_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location" and kv.value not in seen:
                    seen.add(kv.value)
                    ext = p.parent / kv.value
                    if ext.exists():
                        total += ext.stat().st_size
    return total
