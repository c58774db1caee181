"""Failure modes met on models exported by others, reproduced by tools/make_repros.py (pure
onnx, no torch): each compresses, or is refused with one short line naming the real reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

from onnxlw.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def repros(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("make_repros", REPO / "tools/make_repros.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("repro")
    assert mod.main(["--out", str(out)]) == 0
    return out


COMPRESS = [
    "concat_shape_dyn",
    "reshape_1m1c_static",
    "layernorm",
    "minus1_batch",
    "no_output_shape",
    "opset7_ir3",
    "auto_pad_same",
    "sigmoid_head",
    "out_dim_param",
]


@pytest.mark.parametrize("name", COMPRESS)
def test_compresses_with_io_kept(name: str, repros: Path, tmp_path: Path) -> None:
    src = repros / f"{name}.onnx"
    out = tmp_path / "q.onnx"
    assert main(["compress", str(src), "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["layers_quantized"] == len(rep["layers"]) > 0
    assert rep["validation"]["sqnr_db"] > 15, rep["validation"]
    a, b = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(b)
    inits = {t.name for t in a.graph.initializer}  # IR 3 lists them as inputs too
    assert [i.name for i in b.graph.input] == [i.name for i in a.graph.input if i.name not in inits]
    if name != "no_output_shape":  # repaired there, kept exactly elsewhere
        assert [o.SerializeToString() for o in b.graph.output] == [
            o.SerializeToString() for o in a.graph.output
        ]
    if name == "auto_pad_same":
        assert rep["validation"]["float_conv"] == 0


@pytest.mark.parametrize(
    ("name", "words"),
    [("fp16", ["float16", "float32"]), ("int8_qdq", ["already quantized", "FP32"])],
)
def test_refused_in_one_short_line(name: str, words: list[str], repros: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    rc = main(["compress", str(repros / f"{name}.onnx"), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "q.onnx").exists()
    assert len(err[-1]) < 200 and all(w in err[-1] for w in words), err[-1]
