"""Loading models safely and writing them atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper, shape_inference, version_converter

from .config import Config
from .errors import OnnxlwError
from .graph import all_tensors
from .inputspec import InputSpec, input_spec

LARGE_PROTO = 1_800_000_000
"""Protos beyond this are checked by path (protobuf cannot serialize 2 GB in memory)."""
MIN_OPSET = 13
"""QDQ with per-channel axis needs opset 13; older models are converted up to it."""


@dataclass
class LoadedModel:
    """A checked, shape-inferred model and where it came from."""

    model: onnx.ModelProto
    source: str
    sha256: str
    opset: int
    external_data: bool
    inputs: InputSpec
    original_opset: int = 0
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    """The model file (None for a ModelProto), for sessions of models over 2 GB."""


def load(src: onnx.ModelProto | str | os.PathLike, config: Config) -> LoadedModel:
    """Read, check and shape-infer a model; pin dynamic input dims only for synthesis later.

    Raises OnnxlwError for any problem the user must fix. The input is never modified.
    """
    notes: list[str] = []
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        source = "<ModelProto>"
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model)):
            raise OnnxlwError(
                "the ModelProto references external data that is not loaded",
                "pass the model's file path instead, or load it with its external data",
            )
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        external = False
        path = None
    else:
        path = Path(src)
        source = str(path)
        model, digest, external = _read_file(path)
    _check_weights_finite(model)
    declared_outputs = [_copy(o) for o in model.graph.output]
    opset = original = default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:  # noqa: BLE001 - converter raises many types
            raise OnnxlwError(
                f"the model uses opset {opset} and could not be converted to {MIN_OPSET} ({e})",
                "re-export the model with opset 13 or newer",
            ) from None
        notes.append(f"converted opset {opset} -> {MIN_OPSET} (QDQ per-channel needs 13)")
        opset = MIN_OPSET
    min_ir = onnx.helper.find_min_ir_version_for(
        [o for o in model.opset_import if o.domain in ("", "ai.onnx")], ignore_unknown=True
    )
    if model.ir_version < min_ir:
        notes.append(f"raised IR version {model.ir_version} -> {min_ir} (opset {opset} needs it)")
        model.ir_version = min_ir
    model, repaired = _repair_outputs(model)
    if repaired:
        notes.append(
            "graph outputs without a type or shape were repaired by shape inference: "
            + ", ".join(repaired)
        )
    # Keep each output exactly as declared where the declaration is complete; take the
    # repaired (or version-converted) one where it was not.
    current = {o.name: o for o in model.graph.output}
    completed = [o.name for o in declared_outputs if not _complete(o) and o.name not in repaired]
    if completed:
        notes.append(
            "graph outputs without a type or shape were completed by the opset conversion: "
            + ", ".join(completed)
        )
    declared_outputs = [
        o if _complete(o) or o.name not in current else _copy(current[o.name])
        for o in declared_outputs
    ]
    try:
        if model.ByteSize() < LARGE_PROTO:
            onnx.checker.check_model(model)
        elif path is not None and not notes:  # unchanged file: onnx checks it by path
            onnx.checker.check_model(str(path))
        else:
            notes.append("the model is over 2 GB in memory: onnx.checker was skipped")
    except (onnx.checker.ValidationError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise OnnxlwError(f"the model fails onnx.checker: {first}", "fix or re-export it") from None
    model = _infer_shapes(model)
    # Shape inference may rewrite symbolic output dims into concrete ones: keep the outputs
    # exactly as declared.
    del model.graph.output[:]
    model.graph.output.extend(declared_outputs)
    spec = input_spec(model, config, path)
    return LoadedModel(model, source, digest, opset, external, spec, original, notes, path)


def _complete(vi: onnx.ValueInfoProto) -> bool:
    """True when a ValueInfo has a tensor type with an element type and a shape field."""
    return (
        vi.type.HasField("tensor_type")
        and vi.type.tensor_type.elem_type != 0
        and vi.type.tensor_type.HasField("shape")
    )


def _copy(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


def _repair_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fill in graph outputs whose ValueInfo lacks an element type or a shape field.

    onnxruntime runs such models but ``onnx.checker`` refuses them (Paddle exports do this).
    The type and shape come from shape inference; a dim it cannot infer stays unknown.
    """
    broken = [
        o.name
        for o in model.graph.output
        if not o.type.HasField("tensor_type")
        or o.type.tensor_type.elem_type == 0
        or not o.type.tensor_type.HasField("shape")
    ]
    if not broken:
        return model, []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for o in probe.graph.output:
        if o.name in broken:
            o.type.Clear()
    try:
        inferred = shape_inference.infer_shapes(probe, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort; the checker reports what stays broken
        return model, []
    found = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    repaired = []
    for o in model.graph.output:
        if o.name not in broken:
            continue
        vi = found.get(o.name)
        if vi is not None and vi.type.tensor_type.elem_type:
            o.type.CopyFrom(vi.type)
            if not o.type.tensor_type.HasField("shape"):
                o.type.tensor_type.shape.SetInParent()
            repaired.append(o.name)
    return model, repaired


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ONNX domain."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _read_file(path: Path) -> tuple[onnx.ModelProto, str, bool]:
    if not path.exists():
        raise OnnxlwError(f"{path}: no such file", "check the path")
    if not path.is_file():
        raise OnnxlwError(f"{path}: is not a file", "pass the path of an .onnx file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise OnnxlwError(
            f"{path}: not a valid ONNX file (truncated or another format)",
            "pass an uncorrupted .onnx model",
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise OnnxlwError(
            f"{path}: not a valid ONNX model (no graph)", "pass an uncorrupted .onnx model"
        )
    external = _check_external_data(model, path.parent)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model, digest, external


def _check_external_data(model: onnx.ModelProto, base: Path) -> bool:
    base = base.resolve()
    found = False
    for t in all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        loc = next((kv.value for kv in t.external_data if kv.key == "location"), "")
        target = (base / loc).resolve()
        if not loc or os.path.isabs(loc) or base not in target.parents:
            raise OnnxlwError(
                f"tensor {t.name!r}: external data location {loc!r} points outside the model's "
                "folder",
                "keep external data files next to the model (relative location)",
            )
        if not target.is_file():
            raise OnnxlwError(
                f"tensor {t.name!r}: external data file {loc!r} is missing",
                f"put {loc} next to the model",
            )
    return found


def _check_weights_finite(model: onnx.ModelProto) -> None:
    for t in all_tensors(model):
        if t.data_type not in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.DOUBLE,
        ):
            continue
        a = numpy_helper.to_array(t)
        if a.size and not np.isfinite(a).all():
            bad = "NaN" if np.isnan(a).any() else "Inf"
            raise OnnxlwError(
                f"weight {t.name or '<constant>'!r} contains {bad}",
                "fix the trained weights before compressing",
            )


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is a best effort here
        return model


def check_output_folder(out: str | os.PathLike) -> Path:
    """The folder ``out`` will be written in; OnnxlwError unless it exists and is writable."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxlwError(f"output folder {folder} does not exist", "create it or pick another -o")
    if not os.access(folder, os.W_OK):
        raise OnnxlwError(f"output folder {folder} is not writable", "pick a writable -o path")
    return folder


def save_atomic(
    model: onnx.ModelProto, out: str | os.PathLike, *, external_data: bool = False
) -> None:
    """Write ``model`` to ``out`` via a temporary file in the same folder, then rename.

    With ``external_data`` the weights go to ``<out name>.data`` next to it, also renamed into
    place only after everything was written. Nothing partial is left behind on failure.
    """
    out = Path(out)
    folder = check_output_folder(out)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=folder))
    backup: Path | None = None
    data_dst = folder / (out.name + ".data")
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # save_model with external data rewrites the proto it gets
            onnx.save_model(
                copy,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_dst.name,
                size_threshold=1024,
            )
            if (tmpdir / data_dst.name).exists():
                if data_dst.exists():  # keep the previous data until the model is in place
                    backup = tmpdir / "previous.data"
                    os.replace(data_dst, backup)
                os.replace(tmpdir / data_dst.name, data_dst)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
        backup = None
    except OSError as e:
        if backup is not None:  # roll the previous output's data back
            os.replace(backup, data_dst)
        raise OnnxlwError(
            f"could not write {out}: {e.strerror}", "check space and permissions"
        ) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
