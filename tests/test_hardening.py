"""Fixes from code review: no mutation on save, one-line errors for more bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlw import Config, OnnxlwError, compress
from onnxlw.cli import main
from onnxlw.io import save_atomic


def _conv_bn(c: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(c, np.float32), "s"),
        numpy_helper.from_array(np.zeros(c, np.float32), "b"),
        numpy_helper.from_array(np.zeros(c, np.float32), "m"),
        numpy_helper.from_array(np.full(c, 4.0, np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_save_with_external_data_leaves_the_model_intact(tmp_path: Path) -> None:
    q, _ = compress(_conv_bn(64), Config(samples=4))
    before = q.SerializeToString()
    save_atomic(q, tmp_path / "q.onnx", external_data=True)
    assert q.SerializeToString() == before
    assert (tmp_path / "q.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]


def test_modelproto_with_unloaded_external_data_is_refused(tmp_path: Path) -> None:
    m = _conv_bn(64)
    onnx.save(
        m,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        size_threshold=0,
        all_tensors_to_one_file=True,
        location="m.data",
    )
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(OnnxlwError, match="external data"):
        compress(lazy, Config(samples=4))


@pytest.mark.parametrize("text", ["-inf,inf", "1,1", "nan,2"])
def test_bad_input_range_is_a_one_line_error(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), str(src))
    rc = main(["compress", str(src), "-o", str(tmp_path / "q.onnx"), f"--input-range={text}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("onnxlw: error:") and "input range" in err[-1]
    assert not (tmp_path / "q.onnx").exists()


def test_malformed_sidecar_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), str(src))
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": {"mean": [0.5], "std": [0.0]}}))
    rc = main(["compress", str(src), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "sidecar" in err[-1] and "--input-range" in err[-1]


def test_sidecar_range_is_used_and_announced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), str(src))
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": {"mean": 0.5, "std": 0.25}}))
    rc = main(["compress", str(src), "-o", str(tmp_path / "q.onnx"), "--samples", "4"])
    assert rc == 0 and "declared by sidecar" in capsys.readouterr().err
    q = onnx.load(str(tmp_path / "q.onnx"))
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["onnxlw.options"])["input_range"] is None  # options as given
    assert meta["onnxlw.input_range"].startswith("[-2, 2] from sidecar")
    # The Python API reads the same sidecar and gives the same bytes.
    api, _ = compress(src, Config(samples=4))
    assert api.SerializeToString() == q.SerializeToString()


def test_external_data_escaping_from_a_subgraph_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tensor inside an If branch may not point outside the model's folder either."""
    m = _conv_bn()
    t = numpy_helper.from_array(np.ones(4, np.float32), "k")
    t.ClearField("float_data")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../outside.data")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["k_out"], value=t)],
        "then",
        [],
        [helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [4])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    m.graph.initializer.append(cond)
    m.graph.node.append(
        helper.make_node("If", ["cond"], ["k_if"], then_branch=branch, else_branch=branch)
    )
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    rc = main(["compress", str(src), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "outside the model's folder" in err[-1]
