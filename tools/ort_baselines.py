"""onnxruntime's own quantizations of a model, as baselines for onnxlw.

Each producer returns ``(output_path, wall_seconds)``; the wall time covers everything the tool
does (``quant_pre_process``, calibration, quantization, saving).

- :func:`ort_static`: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel QInt8
  weights, MinMax calibration, S8S8 or U8S8) on real calibration data;
- :func:`ort_dynamic`: ``quant_pre_process`` then ``quantize_dynamic`` (weights only;
  activations quantized at run time, Conv becomes ``ConvInteger``);
- :func:`gaussian_calibration`: N(0, 1) noise as calibration data, the naive data-free baseline.

Run as a script to measure them on one model (keep ``--limit`` small on shared machines)::

    python tools/ort_baselines.py MODEL.onnx --calib DIR --images DIR --limit 200
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxlw import ortutil  # noqa: E402

PathLike = str | os.PathLike[str]


class ArrayReader(CalibrationDataReader):
    """Feeds ``calib`` ``[N, C, H, W]`` float32 to the calibrator in chunks of ``batch``."""

    def __init__(self, input_name: str, calib: np.ndarray, batch: int = 8) -> None:
        self.input_name = input_name
        self.calib = np.ascontiguousarray(calib, dtype=np.float32)
        self.batch = batch
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.calib.shape[0]:
            return None
        chunk = self.calib[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def input_info(model_path: PathLike) -> tuple[str, list[int | str | None]]:
    """Name and shape (``None``/str for symbolic dims) of the model's first graph input."""
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in inp.type.tensor_type.shape.dim
    ]
    return inp.name, dims


def gaussian_calibration(shape: tuple[int, ...] | list, n: int, seed: int = 0) -> np.ndarray:
    """``n`` samples of N(0, 1) float32 noise, ``[n, C, H, W]``.

    ``shape`` is the per-sample shape ``(C, H, W)`` or a model input shape
    ``(batch, C, H, W)`` whose (possibly symbolic) batch dim is dropped.
    """
    dims = list(shape)
    if len(dims) == 4:
        dims = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"need a static per-sample shape, got {shape}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *dims), dtype=np.float32)


def _has_sympy() -> bool:
    return importlib.util.find_spec("sympy") is not None


def _pre_process(model_path: PathLike, tmp: str) -> str:
    """``quant_pre_process`` (shape inference and ORT basic optimization, which folds
    BatchNorm into Conv) into ``tmp``; returns the new path.

    Symbolic shape inference needs sympy, which onnxruntime does not install; without it
    it is skipped (ONNX shape inference still runs, enough for static-shape CNNs).
    """
    out = os.path.join(tmp, "pre.onnx")
    quant_pre_process(str(model_path), out, skip_symbolic_shape=not _has_sympy())
    return out


def ort_static(
    model_path: PathLike,
    out_path: PathLike,
    calib: np.ndarray,
    activation_type: str = "S8",
    batch: int = 8,
    reduce_range: bool = False,
) -> tuple[str, float]:
    """onnxruntime static QDQ quantization calibrated on ``calib`` ``[N, C, H, W]`` float32.

    Per-channel QInt8 weights, MinMax calibration, activations QInt8 (``"S8"``, ORT's default)
    or QUInt8 (``"U8"``). Returns ``(out_path, wall_seconds)``; the time includes
    pre-processing and calibration.
    """
    act = {"S8": QuantType.QInt8, "U8": QuantType.QUInt8}[activation_type.upper()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pre = _pre_process(model_path, tmp)
        name, _ = input_info(pre)
        quantize_static(
            pre,
            str(out_path),
            ArrayReader(name, calib, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=act,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )
    return str(out_path), time.perf_counter() - t0


def ort_dynamic(
    model_path: PathLike, out_path: PathLike, weight_type: str = "S8"
) -> tuple[str, float]:
    """onnxruntime dynamic quantization (``quant_pre_process`` + ``quantize_dynamic``).

    Conv becomes ``DynamicQuantizeLinear`` + ``ConvInteger`` (activations quantized to uint8
    at run time, no QLinearConv). ``weight_type`` ``"S8"`` (QInt8, the default) or ``"U8"``;
    with onnxruntime 1.32 both load and run on CPU. Returns ``(out_path, wall_seconds)``.
    """
    wt = {"S8": QuantType.QInt8, "U8": QuantType.QUInt8}[weight_type.upper()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pre = _pre_process(model_path, tmp)
        quantize_dynamic(pre, str(out_path), weight_type=wt)
    return str(out_path), time.perf_counter() - t0


def load_calibration(
    folder: PathLike, preprocess: object, n: int, exclude: set[str] | frozenset[str] = frozenset()
) -> np.ndarray:
    """``n`` evenly spread images ``[n, C, H, W]`` float32 from ``folder``, skipping files whose
    path relative to ``folder`` is in ``exclude`` (keeps calibration and evaluation disjoint
    when both come from the same folder)."""
    from onnxlw.evaluation.preprocess import decode, list_images, spread_indices, transform

    files, _ = list_images(folder)
    rest = [f for f in files if str(f.relative_to(folder)) not in exclude]
    return np.stack([transform(decode(rest[i]), preprocess) for i in spread_indices(len(rest), n)])


# ---------------------------------------------------------------------------------------------
# script: measure the baselines on one model


def _logits(path: str, x: np.ndarray, simulated: bool) -> np.ndarray:
    """Logits; ``simulated`` runs without graph optimization (float QDQ simulation, no
    integer kernels)."""
    import onnxruntime as ort

    lv = ort.GraphOptimizationLevel
    sess = ortutil.session(path, level=lv.ORT_DISABLE_ALL if simulated else lv.ORT_ENABLE_ALL)
    return ortutil.run(sess, {sess.get_inputs()[0].name: x}, batch=32)[0]


def _measure(
    name: str, path: str, secs: float, x: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray
) -> dict[str, object]:
    from onnxlw.evaluation import metrics

    counts = ortutil.optimized_op_counts(path)
    q, fp = ortutil.fused_conv_counts(path)
    m = metrics(ref_logits, _logits(path, x, False), labels)
    sim = metrics(ref_logits, _logits(path, x, True), labels)
    return {
        "baseline": name,
        "seconds": round(secs, 2),
        "QLinearConv": q,
        "Conv": fp,
        "ConvInteger": counts.get("ConvInteger", 0),
        "agreement": m["top1_agreement"],
        "agreement_simulated": sim["top1_agreement"],
        "top1": m["cand_top1"],
        "ref_top1": m["ref_top1"],
        "kl": round(m["kl_mean"], 5),
        "bytes": ortutil.file_size(path),
    }


def main(argv: list[str] | None = None) -> int:
    """Quantize one model with every baseline and print time, counts and agreement."""
    from onnxlw.evaluation import load_images, run_model, select_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="calibration image folder")
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--images", required=True, help="evaluation image folder")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--only", nargs="*", default=None, help=" ".join(JOBS))
    a = ap.parse_args(argv)
    pre = select_preset(a.model)
    x, labels, names = load_images(a.images, pre, a.limit)
    same = Path(a.calib).resolve() == Path(a.images).resolve()
    calib = load_calibration(a.calib, pre, a.calib_n, set(names) if same else set())
    ref_logits = run_model(a.model, x, 32)
    out_dir = Path(a.out_dir or tempfile.mkdtemp(prefix="ortbase-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(a.model).stem
    _, shape = input_info(a.model)
    jobs = {
        "static-s8": lambda p: ort_static(a.model, p, calib, "S8"),
        "static-u8": lambda p: ort_static(a.model, p, calib, "U8"),
        "static-u8-rr": lambda p: ort_static(a.model, p, calib, "U8", reduce_range=True),
        "gauss-s8": lambda p: ort_static(a.model, p, gaussian_calibration(shape, a.calib_n), "S8"),
        "dynamic": lambda p: ort_dynamic(a.model, p, "S8"),
        "dynamic-u8": lambda p: ort_dynamic(a.model, p, "U8"),
    }
    for key, job in jobs.items():
        if a.only and key not in a.only:
            continue
        path, secs = job(out_dir / f"{stem}.{key}.onnx")
        print(_measure(key, path, secs, x, ref_logits, labels), flush=True)
    return 0


JOBS = ("static-s8", "static-u8", "static-u8-rr", "gauss-s8", "dynamic", "dynamic-u8")

if __name__ == "__main__":
    raise SystemExit(main())
