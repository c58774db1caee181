"""Thin helpers around onnxruntime: sessions, optimized-graph op counts, runs."""

from __future__ import annotations

import collections
import ctypes
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
    quiet: bool = False,
    lean: bool = False,
) -> ort.InferenceSession:
    """A CPU session for a model given as a path or a ModelProto.

    A ModelProto over 2 GB cannot be serialized: it is saved with external data to a
    temporary folder and loaded by path. ``quiet`` silences onnxruntime's error log (for runs
    whose failure is expected and handled). ``lean`` turns the memory arena and memory
    patterns off, so memory is returned after each run (synthesis runs once per session).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 4 if quiet else 3
    if lean:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if isinstance(model, onnx.ModelProto) and model.ByteSize() > LARGE_PROTO:
        with tempfile.TemporaryDirectory(prefix="onnxlw-session-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, path, save_as_external_data=True, location="model.data")
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


LARGE_PROTO = 1_800_000_000
"""ModelProtos beyond this go to onnxruntime by path (protobuf's limit is 2 GB)."""


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


def with_symbolic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs have a symbolic dim 0 (outputs' shapes are dropped)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name not in inits and len(vi.type.tensor_type.shape.dim) > 1:
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_param = "onnxlw_batch"
    for vi in m.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    return m


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Synthesis and validation free large activations between runs; without this glibc keeps
    them mapped and the process's resident size reports the high-water mark of every run.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_batched(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    outputs: list[str] | None,
    n: int,
    static: int | None,
) -> tuple[list[np.ndarray], bool]:
    """Run ``model`` on a batch of ``n`` whatever batch ``static`` the graph hard-codes.

    Tries the whole batch at once (dim 0 made symbolic). A graph that hard-codes its batch
    (an error, or float outputs whose dim 0 is not ``n``: a ``[1, -1, C]`` Reshape that
    mixed the images) runs in chunks of ``static`` instead. Feeds whose dim 0 is not ``n``
    (shape vectors) go unchanged to every chunk; float outputs are concatenated along their
    first axis of the chunk's size (dim 0, or dim 1 of a sequence-first [T, N, C]), others are
    taken from the first chunk. Returns (outputs, chunked).
    """
    if static is None or static == n:
        return session(model, lean=True, level=LEAN_LEVEL).run(outputs, feeds), False
    try:
        res = session(
            with_symbolic_batch(model), quiet=True, lean=True, level=LEAN_LEVEL
        ).run(outputs, feeds)
        if all(r.dtype.kind != "f" or r.ndim < 2 or r.shape[0] == n for r in res):
            return res, False
    except Exception:  # noqa: BLE001 - the graph hard-codes its batch size
        pass
    if n % static:
        raise OnnxlwError(
            f"the model hard-codes batch size {static}, which does not divide {n} samples",
            f"pass --samples as a multiple of {static}",
        )
    sess = session(model, lean=True, level=LEAN_LEVEL)
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, static):
        chunk = {
            k: v[i : i + static] if v.ndim and v.shape[0] == n else v for k, v in feeds.items()
        }
        parts.append(sess.run(outputs, chunk))
    out = []
    for j, first in enumerate(parts[0]):
        axis = next((a for a, d in enumerate(first.shape) if d == static), None)
        if first.dtype.kind == "f" and axis is not None:  # batch axis: first of the chunk size
            out.append(np.concatenate([p[j] for p in parts], axis=axis))
        else:  # batch-independent (shape vectors)
            out.append(first)
    return out, True


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


LEAN_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
"""Synthesis sessions run each graph once: basic optimizations only (no channels-last
layout copies, which raise peak memory)."""
