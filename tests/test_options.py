"""Every non-default option end to end through the CLI, and properties that must not depend on
how the run is scheduled (workers, executor, memory budget)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import models as M
import onnxlw
from onnxlw import Config
from onnxlw.cli import main
from onnxlw.ops import OPS, LayerRecord

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"

OPTIONS = {
    "synthesis-gaussian": (["--synthesis", "gaussian"], 6.0),  # 9.1 dB, 99.7 % on real digits
    "input-dist-gaussian": (["--input-dist", "gaussian"], 4.0),  # 5.4 dB, 100 % on real digits
    "weight-scale-minmax": (["--weight-scale", "minmax"], 15.0),
    "act-range-minmax": (["--act-range", "minmax"], 12.0),
    "bias-correction-none": (["--bias-correction", "none"], 15.0),
    "bias-correction-weights": (["--bias-correction", "weights"], 15.0),
    "float-classifier": (["--float-classifier"], 15.0),
    "no-saturation-guard": (["--no-saturation-guard"], 15.0),
    "quantize-heads": (["--quantize-heads"], 15.0),
    "no-sidecar": (["--no-sidecar"], 15.0),
    "input-range": (["--input-range=[-1,2.2]"], 15.0),
    "exclude": (["--exclude", "/stem/*"], 15.0),
    "processes": (["--executor", "processes", "--workers", "2"], 15.0),
    "seed-samples": (["--seed", "3", "--samples", "8"], 6.0),  # 8.5 dB, 99.7 % on real digits
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_end_to_end(name: str, tmp_path: Path) -> None:
    args, floor = OPTIONS[name]
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["compress", str(DIGITS), "-o", str(out), "--report", str(rep), *args]) == 0
    r = json.loads(rep.read_text())
    onnx.checker.check_model(str(out))
    assert r["validation"]["sqnr_db"] > floor, r["validation"]
    cfg = r["config"]
    if name == "float-classifier":
        assert any(lr["skipped"] and "classifier" in lr["skipped"] for lr in r["layers"])
    if name == "no-saturation-guard":
        assert cfg["saturation_guard"] is False and r["saturation_fixes"] == 0
    if name == "exclude":
        assert r["layers"][0]["skipped"] == "excluded by pattern '/stem/*'"
    if name == "no-sidecar":
        assert r["inputs"]["declared_range"] is None
    if name == "input-range":
        assert r["inputs"]["declared_range"] == [-1.0, 2.2]


def test_digits_real_agreement_with_images(tmp_path: Path, capsys) -> None:
    """--images prints agreement on real images (here the bundled digits test split)."""
    out = tmp_path / "q.onnx"
    npz = REPO / "models" / "digits_test.npz"
    assert main(["compress", str(DIGITS), "-o", str(out), "--images", str(npz)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("real images"))
    assert float(line.split("agreement ")[1].split("%")[0]) >= 99.7
    assert "top-1 agreement" not in text.replace(line, "")  # none on noise


@pytest.mark.parametrize("budget", [1, 4])
def test_memory_budget_changes_segments_not_bytes(budget: int) -> None:
    m = M.residual(batch="N")
    ref, rep0 = onnxlw.compress(m, Config(samples=8))
    got, rep = onnxlw.compress(m, Config(samples=8, memory_budget_mb=budget))
    assert rep.synthesis["segments"] >= rep0.synthesis["segments"]
    assert got.graph.SerializeToString() == ref.graph.SerializeToString()


def test_tiny_budget_runs_many_segments() -> None:
    m = M.conv_bn_relu(batch="N", hw=(64, 64))
    ref, rep0 = onnxlw.compress(m, Config(samples=8))
    got, rep = onnxlw.compress(m, Config(samples=8, memory_budget_mb=0))
    assert rep.synthesis["segments"] > rep0.synthesis["segments"] == 1
    assert got.graph.SerializeToString() == ref.graph.SerializeToString()


def test_per_image_fallback_is_quiet_and_labelled(tmp_path: Path, capsys) -> None:
    """A graph that hard-codes its batch where onnxlw cannot unpin it (Reshape with allowzero)
    runs one image at a time; onnxruntime's error log of the failed attempt stays silent."""
    b = M.Builder(21, 17, calibrate=False)
    y = b.conv_bn_relu("input", 3, 8)
    y = b.node("Reshape", [y, b.init("shape", np.array([1, 8, 256], np.int64))], allowzero=1)
    y = b.node("Reshape", [y, b.init("shape2", np.array([1, 8, 16, 16], np.int64))])
    y = b.conv_bn_relu(y, 8, 8)
    m = b.model([("input", [1, 3, 16, 16])], [("out", y, [1, 8, 16, 16])])
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    assert main(["compress", str(src), "-o", str(tmp_path / "q.onnx"),
                 "--report", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "onnxruntime" not in err and "[E:" not in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fallback"] == "per-image-batches"
    assert any("one image at a time" in w for w in r["warnings"])


def test_sessions_of_huge_models_go_by_path(monkeypatch) -> None:
    """Protos beyond protobuf's 2 GB limit reach onnxruntime by path (external data)."""
    from onnxlw import ortutil

    m = M.residual(batch="N")
    ref, _ = onnxlw.compress(m, Config(samples=8))
    monkeypatch.setattr(ortutil, "LARGE_PROTO", 1000)
    got, _ = onnxlw.compress(m, Config(samples=8))
    assert got.graph.SerializeToString() == ref.graph.SerializeToString()


def _rec(op: str, shape: tuple[int, ...], group: int = 1) -> LayerRecord:
    from onnxlw.ops import ConvGeom

    geom = ConvGeom(group, shape[2:], (1, 1), (0, 0, 0, 0), (1, 1)) if op == "Conv" else None
    return LayerRecord(0, "n", op, "x", "y", "w", None, shape, geom, (), OPS[op].out_axis)


@pytest.mark.parametrize(
    ("op", "shape", "group"),
    [("Conv", (6, 4, 3, 3), 1), ("Conv", (6, 2, 3, 3), 3), ("Gemm", (6, 4), 1),
     ("MatMul", (4, 6), 1)],
)
def test_op_registry_round_trips_and_drops_channels(op, shape, group) -> None:
    rec = _rec(op, shape, group)
    ad = OPS[op]
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    m = ad.to_matrix(rec, w)
    assert m.shape[0] == group and m.shape[0] * m.shape[1] == 6
    np.testing.assert_array_equal(ad.from_matrix(rec, m), w)
    keep = np.array([0, 2, 5])
    out = ad.drop_outputs(rec, w, keep)
    assert out.shape[rec.out_axis] == 3
    np.testing.assert_array_equal(np.take(w, keep, axis=rec.out_axis), out)
    if group == 1:
        kin = np.array([1, 3])
        assert ad.drop_inputs(rec, w, kin).shape[1 - rec.out_axis] == 2


def test_huge_models_are_checked_by_path(monkeypatch, tmp_path: Path) -> None:
    """Beyond protobuf's 2 GB the loaded model is checked by its file (a ModelProto that big
    cannot be: the check is skipped and the report says so)."""
    from onnxlw import io

    monkeypatch.setattr(io, "LARGE_PROTO", 1000)
    m = M.residual(batch="N")
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    loaded = io.load(src, Config())
    assert not any("checker was skipped" in n for n in loaded.notes)
    loaded = io.load(m, Config())
    assert any("checker was skipped" in n for n in loaded.notes)
