"""From synthesized tensors to picklable layer problems, streamed with bounded memory.

:class:`StatsCollector` receives each synthesized tensor once, right after the synthesis run
that produced it, and reduces it on the spot:

- an activation tensor to quantize becomes its range (:class:`~onnxlw.solve.ActQuant`),
  chosen on a seeded subsample (seed ``(seed, 1, k)``);
- a layer input becomes that layer's :class:`~onnxlw.solve.LayerProblem`: sampled im2col
  columns (seed ``(seed, 2, layer index)``) reduced to their mean and covariance, or kept as
  samples when there are fewer samples than inputs, plus E[Q(x)] for bias correction.

The full activation is dropped afterwards, so memory grows with the largest layer, not with
the network. Problems larger than ``SPILL_BYTES`` go to a temporary folder and come back
memory-mapped when solved.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .analyze import Analysis
from .config import Config
from .errors import OnnxlwError
from .inputspec import InputSpec
from .ops import LayerRecord
from .solve.problem import ActQuant, LayerProblem
from .solve.ranges import affine_params, choose_range, fake_quant_mean
from .targets.ort_cpu import u8s8_pair_order

RANGE_SAMPLE_LIMIT = 1 << 20
"""Values per tensor used for the range search (a seeded subsample beyond this)."""
SPILL_BYTES = 8 << 20
OVERLAP_SEGMENTS = 0
"""Segments whose reductions may still run while synthesis runs the next one. Measured on
MobileNetV2 / EfficientNet-Lite0 (2 cores): 1 saves 0.1-0.6 s of 5-7 s but raises the peak
RSS from ~410 to ~465 MB and ~545 to ~660 MB (an ORT run and a segment's reductions at once),
so the default keeps them apart."""
"""Problems above this size are kept on disk until solved."""


FEW_ROWS = 256
"""[N, C] tensors (heads after pooling, BatchNorm1d) with fewer rows than this get their range
from a per-channel Gaussian fit as well as from the rows themselves."""


def _widen_rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Values for the range of an [N, C] tensor with few rows: the rows plus 1024 draws per
    channel from N(mean_c, std_c^2) of those rows (16 rows of a tensor that feeds a classifier
    do not show its tails; a Gaussian per channel does, about as real inputs would)."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    draws = mean + std * rng.standard_normal((FEW_ROWS * 4, x.shape[1])).astype(np.float32)
    return np.concatenate([x.reshape(-1), draws.reshape(-1)])


def sample_columns(rec: LayerRecord, x: np.ndarray, cfg: Config) -> np.ndarray:
    """The layer's sampled input columns (M, G, K) of its input tensor ``x``; the positions
    are seeded by ``(seed, 2, layer index)``, so two tensors of one shape (the original and
    the compressed network's input) are sampled at the same positions."""
    rng = np.random.default_rng([cfg.seed, 2, rec.index])
    ad = rec.adapter
    return ad.columns(rec, x, ad.positions(rec, cfg.max_positions), rng)


def layer_matrix(
    rec: LayerRecord, weight: np.ndarray, bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's weight as its grouped matrix (G, O, K) float32 and its bias as (G, O)."""
    wm = rec.adapter.to_matrix(rec, weight.astype(np.float32))
    return wm, bias.reshape(wm.shape[0], wm.shape[1]) if bias is not None else None


class StatsCollector:
    """Reduces synthesized tensors to activation ranges and layer problems as they arrive."""

    def __init__(
        self,
        analysis: Analysis,
        inputs: InputSpec,
        config: Config,
        weights: Mapping[int, np.ndarray],
        biases: Mapping[int, np.ndarray | None],
    ) -> None:
        self.config = config
        self.inputs = inputs
        self.roots = [n for n, qt in analysis.qtensors.items() if qt.same_as is None]
        self.root_index = {n: k for k, n in enumerate(self.roots)}
        self.same_as = {n: qt.same_as for n, qt in analysis.qtensors.items() if qt.same_as}
        self.qtensors = analysis.qtensors
        self.input_data = analysis.input_data  # the graph inputs included
        self.by_input: dict[str, list[LayerRecord]] = {}
        for r in analysis.active_layers:
            self.by_input.setdefault(r.input, []).append(r)
        self.weights, self.biases = weights, biases
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._problems: dict[int, LayerProblem | Path] = {}
        self.sizes: dict[int, int] = {}
        self.peak_tensor_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=config.workers)
        self._range_jobs: dict[str, Future] = {}
        self._in_flight: list[list[Future]] = []
        self._lock = threading.Lock()

    @property
    def wanted(self) -> list[str]:
        """Tensors synthesis must deliver: activation roots and layer inputs."""
        out = list(self.roots)
        out += [t for t in self.by_input if t not in out]
        return out

    def __call__(self, batch: list[tuple[str, np.ndarray]]) -> None:
        """Reduce synthesized tensors (N, C, ...) that arrived together, on the worker threads.

        Range jobs go first; a problem job waits for its input's range. Up to
        ``OVERLAP_SEGMENTS`` earlier segments may still be reducing while synthesis runs the
        next one. Each job has its own seeded generator, so the result is the same on any
        number of threads. :meth:`finish` waits for the rest.
        """
        for name, x in batch:
            self.peak_tensor_bytes = max(self.peak_tensor_bytes, x.nbytes)
            if not np.isfinite(np.sum(x, dtype=np.float64)):
                raise OnnxlwError(
                    f"synthesized values of tensor {name!r} contain NaN/Inf (an op upstream is "
                    "undefined on the declared input distribution)",
                    "declare the real input range with --input-range, or report the model",
                )
        jobs: list[Future] = []
        for name, x in batch:
            if name in self.root_index:
                self._range_jobs[name] = self._pool.submit(self._range, name, x)
                jobs.append(self._range_jobs[name])
        for name, x in batch:
            for rec in self.by_input.get(name, []):
                jobs.append(self._pool.submit(self._problem_job, rec, x))
        self._in_flight.append(jobs)
        while len(self._in_flight) > OVERLAP_SEGMENTS:
            self._drain(self._in_flight.pop(0))

    def finish(self) -> None:
        """Wait for every queued reduction."""
        while self._in_flight:
            self._drain(self._in_flight.pop(0))

    def _drain(self, jobs: list[Future]) -> None:
        for f in jobs:
            f.result()  # re-raises a job's error here

    def _problem_job(self, rec: LayerRecord, x: np.ndarray) -> None:
        self._store(rec.index, self._problem(rec, x))

    def _range(self, name: str, x: np.ndarray) -> ActQuant:
        cfg = self.config
        declared = self.inputs.declared_range
        bits = cfg.input_act_bits if name in self.input_data else cfg.act_bits
        if declared is not None and name in self.inputs.names:
            lo, hi = declared  # the exact bounds of any real input
            s, z = affine_params(lo, hi, bits)
            return ActQuant(min(lo, 0.0), max(hi, 0.0), s, z, float("nan"), "declared", bits)
        rng = np.random.default_rng([cfg.seed, 1, self.root_index[name]])
        v = x.reshape(-1)
        if x.ndim == 2 and x.shape[0] < FEW_ROWS:
            v = _widen_rows(x, rng)
        if v.size > RANGE_SAMPLE_LIMIT:
            v = v[rng.integers(0, v.size, RANGE_SAMPLE_LIMIT)]
        qt = self.qtensors[name]
        return choose_range(
            v, bits=bits, method=cfg.act_range.value, lo_bound=qt.lo_bound,
            hi_bound=qt.hi_bound,
        )

    def act_for(self, name: str) -> ActQuant | None:
        """The activation encoding of ``name`` (following pass-through ops to the root);
        waits for its range job."""
        while name in self.same_as:
            name = self.same_as[name]
        job = self._range_jobs.get(name)
        return job.result() if job is not None else None

    def _problem(self, rec: LayerRecord, x: np.ndarray) -> LayerProblem:
        cfg = self.config
        cols = sample_columns(rec, x, cfg)
        act = self.act_for(rec.input)
        xq_mean = fake_quant_mean(cols, act.scale, act.zero_point, act.bits) if act else None
        wm, bias = layer_matrix(rec, self.weights[rec.index], self.biases[rec.index])
        pairs = u8s8_pair_order(rec) if cfg.saturation_guard else None
        return LayerProblem.from_samples(
            wm, cols, bias=bias, xq_mean=xq_mean, x_scale=act.scale if act else None,
            pair_order=pairs,
            name=rec.node,
        )

    def _store(self, index: int, p: LayerProblem) -> None:
        kept = self._spill(index, p) if p.nbytes > SPILL_BYTES else p
        with self._lock:
            self.sizes[index] = p.nbytes
            self._problems[index] = kept

    def _spill(self, index: int, p: LayerProblem) -> Path:
        with self._lock:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="onnxlw-problems-")
        folder = Path(self._tmp.name) / str(index)
        folder.mkdir()
        for f in ("weight", "bias", "mean", "cov", "x", "xq_mean", "pair_order"):
            a = getattr(p, f)
            if a is not None:
                np.save(folder / f"{f}.npy", a)
        (folder / "meta.txt").write_text(f"{p.count}\n{p.x_scale!r}\n{p.name}")
        return folder

    def _unspill(self, folder: Path) -> LayerProblem:
        def arr(f: str) -> np.ndarray | None:
            path = folder / f"{f}.npy"
            return np.load(path, mmap_mode="r") if path.exists() else None

        count, x_scale, name = (folder / "meta.txt").read_text().split("\n", 2)
        return LayerProblem(
            arr("weight"), arr("bias"), arr("mean"), arr("cov"), arr("x"), int(count),  # type: ignore[arg-type]
            arr("xq_mean"), None if x_scale == "None" else float(x_scale), arr("pair_order"),
            name,
        )

    def problems(self) -> Iterator[tuple[int, LayerProblem]]:
        """(layer index, problem), largest first so a pool stays busy; each loaded lazily."""
        for idx in sorted(self._problems, key=lambda i: (-self.sizes[i], i)):
            p = self._problems.pop(idx)  # handed over: the collector keeps no reference
            yield idx, self._unspill(p) if isinstance(p, Path) else p

    def missing(self, layers: list[LayerRecord]) -> list[LayerRecord]:
        """Active layers whose input never arrived (before ``problems`` hands them over)."""
        return [r for r in layers if r.index not in self._problems]

    def close(self) -> None:
        """Stop the worker threads; remove spilled problems."""
        self._pool.shutdown(cancel_futures=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
