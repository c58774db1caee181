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
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .analyze import Analysis
from .config import Config
from .errors import OnnxlwError
from .inputspec import InputSpec
from .ops import LayerRecord
from .solve.problem import ActQuant, LayerProblem
from .solve.ranges import affine_params, choose_range, fake_quant
from .targets.ort_cpu import u8s8_pair_order

RANGE_SAMPLE_LIMIT = 1 << 20
"""Values per tensor used for the range search (a seeded subsample beyond this)."""
SPILL_BYTES = 8 << 20
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
        self.by_input: dict[str, list[LayerRecord]] = {}
        for r in analysis.active_layers:
            self.by_input.setdefault(r.input, []).append(r)
        self.weights, self.biases = weights, biases
        self.acts: dict[str, ActQuant] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._problems: dict[int, LayerProblem | Path] = {}
        self.sizes: dict[int, int] = {}
        self.peak_tensor_bytes = 0

    @property
    def wanted(self) -> list[str]:
        """Tensors synthesis must deliver: activation roots and layer inputs."""
        out = list(self.roots)
        out += [t for t in self.by_input if t not in out]
        return out

    def __call__(self, name: str, x: np.ndarray) -> None:
        """Reduce one synthesized tensor (N, C, ...)."""
        self.peak_tensor_bytes = max(self.peak_tensor_bytes, x.nbytes)
        if not np.isfinite(np.sum(x, dtype=np.float64)):
            raise OnnxlwError(
                f"synthesized values of tensor {name!r} contain NaN/Inf (an op upstream is "
                "undefined on the declared input distribution)",
                "declare the real input range with --input-range, or report the model",
            )
        if name in self.root_index:
            self.acts[name] = self._range(name, x)
        for rec in self.by_input.get(name, []):
            self._add_problem(rec, x)

    def _range(self, name: str, x: np.ndarray) -> ActQuant:
        cfg = self.config
        declared = self.inputs.declared_range
        if declared is not None and name in self.inputs.names:
            lo, hi = declared  # the exact bounds of any real input
            s, z = affine_params(lo, hi, cfg.act_bits)
            return ActQuant(min(lo, 0.0), max(hi, 0.0), s, z, float("nan"), "declared",
                            cfg.act_bits)
        rng = np.random.default_rng([cfg.seed, 1, self.root_index[name]])
        v = x.reshape(-1)
        if x.ndim == 2 and x.shape[0] < FEW_ROWS:
            v = _widen_rows(x, rng)
        if v.size > RANGE_SAMPLE_LIMIT:
            v = v[rng.integers(0, v.size, RANGE_SAMPLE_LIMIT)]
        qt = self.qtensors[name]
        return choose_range(
            v, bits=cfg.act_bits, method=cfg.act_range.value, lo_bound=qt.lo_bound,
            hi_bound=qt.hi_bound,
        )

    def act_for(self, name: str) -> ActQuant | None:
        """The activation encoding of ``name`` (following pass-through ops to the root)."""
        while name in self.same_as:
            name = self.same_as[name]
        return self.acts.get(name)

    def _add_problem(self, rec: LayerRecord, x: np.ndarray) -> None:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 2, rec.index])
        ad = rec.adapter
        cols = ad.columns(rec, x, ad.positions(rec, cfg.max_positions), rng)
        act = self.act_for(rec.input)
        xq = fake_quant(cols, act.scale, act.zero_point, cfg.act_bits) if act else None
        wm = ad.to_matrix(rec, self.weights[rec.index].astype(np.float32))
        b = self.biases[rec.index]
        bias = b.reshape(wm.shape[0], wm.shape[1]) if b is not None else None
        pairs = u8s8_pair_order(rec) if cfg.saturation_guard else None
        p = LayerProblem.from_samples(
            wm, cols, bias=bias, xq=xq, x_scale=act.scale if act else None, pair_order=pairs,
            name=rec.node,
        )
        self.sizes[rec.index] = p.nbytes
        if p.nbytes > SPILL_BYTES:
            self._problems[rec.index] = self._spill(rec.index, p)
        else:
            self._problems[rec.index] = p

    def _spill(self, index: int, p: LayerProblem) -> Path:
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
        """Remove spilled problems."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
