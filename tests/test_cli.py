"""The command line: bad input gives exit code 2 and one clear line, never a traceback, and
never touches the input or leaves files behind; good input writes the model and the report."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import models as M
from onnxlw.cli import main
from onnxlw.ortutil import fused_conv_counts

PROGRESS = re.compile(r"^\[\s*\d+\.\d+s\] .+\.\.\.$")
FAST = ["--samples", "8"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def save_external(model: onnx.ModelProto, path: Path, location: str = "w.data") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)  # onnx.save rewrites the proto it is given
    onnx.save(
        m,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def error_line(err: str) -> str:
    """The single error line; every other stderr line must be a progress line."""
    lines = err.splitlines()
    errors = [x for x in lines if x.startswith("onnxlw: error:")]
    assert len(errors) == 1, err
    others = [x for x in lines if x not in errors]
    assert all(PROGRESS.match(x) for x in others), err
    assert "Traceback" not in err
    return errors[0]


def refused(
    capsys: pytest.CaptureFixture,
    args: list[str],
    *,
    watch: list[Path],
    out_dir: Path,
    must: list[str],
) -> str:
    """Run the CLI expecting exit 2; check the message and that nothing changed on disk."""
    hashes = {p: sha(p) for p in watch if p.is_file()}
    before = listing(out_dir)
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    line = error_line(err)
    problem, sep, fix = line.removeprefix("onnxlw: error: ").partition("; ")
    assert sep and problem and fix, f"no 'problem; fix' in {line!r}"
    for word in must:
        assert word in line, f"{word!r} not in {line!r}"
    assert {p: sha(p) for p in watch if p.is_file()} == hashes
    assert listing(out_dir) == before, "output or temporary files left behind"
    assert "wrote" not in out
    return line


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    return src, out


@pytest.fixture
def good(dirs: tuple[Path, Path]) -> Path:
    return save(M.conv_bn_relu(batch="N"), dirs[0] / "m.onnx")


# ------------------------------------------------------------------------------ bad input


def test_missing_file(capsys, dirs) -> None:
    src, out = dirs
    refused(
        capsys,
        ["compress", str(src / "nope.onnx"), "-o", str(out / "q.onnx")],
        watch=[],
        out_dir=out,
        must=["nope.onnx", "no such file"],
    )


def test_not_an_onnx_file(capsys, dirs) -> None:
    src, out = dirs
    p = src / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 20)
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p],
        out_dir=out,
        must=["notes.onnx", "not a valid ONNX"],
    )


def test_truncated_file(capsys, dirs, good) -> None:
    src, out = dirs
    data = good.read_bytes()
    p = src / "half.onnx"
    p.write_bytes(data[: len(data) // 2])
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p],
        out_dir=out,
        must=["half.onnx", "truncated"],
    )


def test_no_compressible_layer(capsys, dirs) -> None:
    src, out = dirs
    p = save(M.relu_only(batch="N"), src / "relu.onnx")
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p],
        out_dir=out,
        must=["no compressible layer", "Conv"],
    )


def test_symbolic_hw_needs_input_shape(capsys, dirs) -> None:
    src, out = dirs
    p = save(M.conv_bn_relu(batch="N", hw=("H", "W")), src / "dyn.onnx")
    line = refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx"), *FAST],
        watch=[p],
        out_dir=out,
        must=["--input-shape", "input"],
    )
    assert "[N,3,H,W]" in line
    rc = main(
        ["compress", str(p), "-o", str(out / "q.onnx"), *FAST, "--input-shape", "input:1,3,16,16"]
    )
    assert rc == 0
    assert listing(out) == ["q.onnx"]
    q = onnx.load(str(out / "q.onnx"))
    dims = [d.dim_param or d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert fused_conv_counts(q) == (2, 0)


def test_symbolic_batch_needs_no_hint(capsys, dirs, good) -> None:
    _, out = dirs
    assert main(["compress", str(good), "-o", str(out / "q.onnx"), *FAST]) == 0
    o, err = capsys.readouterr()
    assert f"wrote {out / 'q.onnx'}" in o and "2 QLinearConv, 0 float Conv" in o
    assert "error" not in err and all(PROGRESS.match(x) for x in err.splitlines())


def test_bad_input_shape_option(capsys, dirs, good) -> None:
    _, out = dirs
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "q.onnx"), "--input-shape", "input:1,3,x"],
        watch=[good],
        out_dir=out,
        must=["--input-shape", "NAME:D1,D2"],
    )
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "q.onnx"), "--input-shape", "image:1,3,16,16"],
        watch=[good],
        out_dir=out,
        must=["'image'", "input"],
    )


def test_output_equal_to_input_needs_force(capsys, dirs, good) -> None:
    src, _ = dirs
    refused(
        capsys,
        ["compress", str(good), "-o", str(good)],
        watch=[good],
        out_dir=src,
        must=["is the input file", "--force"],
    )
    assert main(["compress", str(good), "-o", str(good), "--force", *FAST]) == 0
    assert listing(src) == ["m.onnx"]  # replaced in place, no temporary left
    q = onnx.load(str(good))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert fused_conv_counts(q) == (2, 0)


def test_unwritable_output_folder(capsys, dirs, good, monkeypatch) -> None:
    """As root a 0o500 folder stays writable, so the permission check is simulated."""
    _, out = dirs
    real_access = os.access

    def access(path, mode, *a, **kw):  # noqa: ANN001, ANN202
        if Path(path).resolve() == out.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "q.onnx")],
        watch=[good],
        out_dir=out,
        must=["not writable", "-o"],
    )


def test_missing_output_folder(capsys, dirs, good) -> None:
    _, out = dirs
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "sub" / "q.onnx")],
        watch=[good],
        out_dir=out,
        must=["does not exist", "create it"],
    )


def test_external_data_file_missing(capsys, dirs) -> None:
    src, out = dirs
    p = save_external(M.conv_bn_relu(batch="N"), src / "m.onnx")
    (src / "w.data").unlink()
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p],
        out_dir=out,
        must=["external data", "w.data", "missing"],
    )


def test_external_data_outside_model_folder(capsys, dirs) -> None:
    src, out = dirs
    p = save_external(M.conv_bn_relu(batch="N"), src / "m.onnx")
    (src / "w.data").rename(src.parent / "w.data")  # onnx.save refuses '..': edit the proto
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../w.data"
    p.write_bytes(m.SerializeToString())
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p, src.parent / "w.data"],
        out_dir=out,
        must=["../w.data", "outside"],
    )


@pytest.mark.parametrize(
    ("prefix", "index", "value", "word"),
    [
        ("conv_w", (0, 0, 0, 0), float("nan"), "NaN"),
        ("bn_var", (3,), float("inf"), "Inf"),
        ("conv_b", (1,), float("-inf"), "Inf"),
    ],
)
def test_non_finite_weight(capsys, dirs, prefix, index, value, word) -> None:
    src, out = dirs
    m, tensor = M.set_weight(M.conv_bn_relu(batch="N"), prefix, index, value)
    p = save(m, src / "bad.onnx")
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p],
        out_dir=out,
        must=[f"'{tensor}'", word],
    )


def test_non_finite_weight_in_external_data(capsys, dirs) -> None:
    src, out = dirs
    m, tensor = M.set_weight(M.conv_bn_relu(batch="N"), "conv_w", (1, 1, 1, 1), float("nan"))
    p = save_external(m, src / "m.onnx")
    refused(
        capsys,
        ["compress", str(p), "-o", str(out / "q.onnx")],
        watch=[p, src / "w.data"],
        out_dir=out,
        must=[f"'{tensor}'", "NaN"],
    )


def test_bad_option_values(capsys, dirs, good) -> None:
    _, out = dirs
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "q.onnx"), "--samples", "1"],
        watch=[good],
        out_dir=out,
        must=["samples"],
    )
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "q.onnx"), "--weight-bits", "9"],
        watch=[good],
        out_dir=out,
        must=["weight_bits"],
    )


def test_bad_report_path_leaves_nothing(capsys, dirs, good) -> None:
    _, out = dirs
    refused(
        capsys,
        ["compress", str(good), "-o", str(out / "q.onnx"), "--report", str(out / "no" / "r.json")],
        watch=[good],
        out_dir=out,
        must=["report"],
    )


# ------------------------------------------------------------------------------ real process


def _python_m(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxlw", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_subprocess_exit_code_and_no_traceback(dirs) -> None:
    src, out = dirs
    p = src / "bad.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    digest = sha(p)
    r = _python_m("compress", str(p), "-o", str(out / "q.onnx"), cwd=src)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert error_line(r.stderr).startswith(f"onnxlw: error: {p}:")
    assert sha(p) == digest and listing(out) == []


def test_subprocess_version(tmp_path) -> None:
    import onnxlw

    r = _python_m("--version", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.strip() == f"onnxlw {onnxlw.__version__}"


# ------------------------------------------------------------------------------ inspect, report


def test_inspect_lists_layers_and_bn(capsys, dirs, good) -> None:
    digest = sha(good)
    assert main(["inspect", str(good)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "BN stats   : found, 2 BatchNormalization (2 foldable)" in out
    assert "layers     : 2 (2 compressible), 1368 params" in out
    layer_lines = [x for x in out.splitlines() if re.match(r"^\s+\[\s*\d+\] Conv ", x)]
    assert len(layer_lines) == 2
    assert "[8, 3, 3, 3]" in layer_lines[0] and "k3x3 s1 g1" in layer_lines[0]
    assert "[16, 8, 3, 3]" in layer_lines[1] and "<- bn:" in layer_lines[1]
    assert "unsupported: none" in out
    assert sha(good) == digest


def test_inspect_bn_folded_says_missing(capsys, dirs) -> None:
    p = save(M.bn_folded(batch="N"), dirs[0] / "folded.onnx")
    assert main(["inspect", str(p)]) == 0
    out, _ = capsys.readouterr()
    assert "BN stats   : MISSING" in out
    assert "TrainingMode.PRESERVE" in out
    assert "no BatchNormalization node" in out  # the rule that could not fire says why


def test_inspect_shows_unsupported_and_skip(capsys, dirs) -> None:
    p = save(M.unsupported_op(batch="N"), dirs[0] / "u.onnx")
    assert main(["inspect", str(p)]) == 0
    out, _ = capsys.readouterr()
    assert "unsupported: RandomNormalLike" in out
    assert "layers     : 2 (1 compressible)" in out
    assert "SKIP: its input passes through an op synthesis cannot run: RandomNormalLike" in out


def test_inspect_bad_file(capsys, dirs) -> None:
    src, _ = dirs
    refused(
        capsys, ["inspect", str(src / "none.onnx")], watch=[], out_dir=src, must=["no such file"]
    )


def test_report_json(capsys, dirs, good) -> None:
    _, out = dirs
    rp = out / "r.json"
    rc = main(["compress", str(good), "-o", str(out / "q.onnx"), "--report", str(rp), *FAST])
    assert rc == 0
    assert listing(out) == ["q.onnx", "r.json"]
    r = json.loads(rp.read_text())
    assert r["version"] and r["input_sha256"] == sha(good)
    assert r["bn_found"] is True and r["bn_count"] == 2
    assert r["config"]["samples"] == 8 and r["config"]["seed"] == 0
    assert [x["op_type"] for x in r["layers"]] == ["Conv", "Conv"]
    assert r["layers_quantized"] == 2
    assert all(x["skipped"] is None and x["sqnr_db"] > 30 for x in r["layers"])
    v = r["validation"]
    assert (
        v["qlinear_conv"] == 2
        and v["float_conv"] == 0
        and v["samples"] == r["config"]["validate_samples"] == 16
    )
    assert v["op_counts"]["QLinearConv"] == 2 and v["sqnr_db"] > 20
    assert set(r["stages"]) >= {
        "load",
        "canonicalize",
        "analyze",
        "synthesize",
        "solve",
        "emit",
        "validate",
    }
    assert set(r["stages"]) == {
        "load", "canonicalize", "precondition", "analyze", "synthesize", "solve", "emit",
        "validate",
    }
    assert sum(r["stages"].values()) <= r["wall_time"]
    assert r["size_before"] == good.stat().st_size
    assert r["size_after"] == (out / "q.onnx").stat().st_size
    assert any(n["pass_name"] == "fold_batchnorm" and n["fired"] for n in r["notes"])
    out_text, _ = capsys.readouterr()
    assert "layers quantized : 2/2" in out_text and "BN statistics    : found (2)" in out_text
