"""The graph inputs as onnxlw sees them, computed once by ``load``.

An :class:`InputSpec` holds every input's name, dtype and declared dims, the shape synthesis
and validation draw at, the model's static batch (if it hard-codes one), and the declared
value range with where it came from (``Config.input_range``, or the preprocessing sidecar
``<model>.json`` next to a model file). Every later stage reads inputs from here only, so the
CLI and the Python API see the same inputs for the same model and options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from .config import Config, range_from_preprocess
from .errors import OnnxlwError


@dataclass(frozen=True)
class GraphInput:
    """One graph input. ``dims``: as declared (int, or str for a symbolic/unknown dim);
    ``shape``: the concrete shape synthesis uses, with batch 1 in dim 0."""

    name: str
    elem_type: int
    dims: tuple[int | str, ...]
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        """True for float32 inputs (the only ones synthesis can draw)."""
        return self.elem_type == onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class InputSpec:
    """Everything later stages need to know about the graph inputs."""

    inputs: tuple[GraphInput, ...]
    static_batch: int | None
    declared_range: tuple[float, float] | None
    range_source: str
    """``"config"``, ``"sidecar <path>"`` or ``""`` (no declared range)."""

    @property
    def names(self) -> list[str]:
        """Input names in graph order."""
        return [i.name for i in self.inputs]

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Concrete shapes with dim 0 set to ``batch``."""
        return {i.name: (batch,) + i.shape[1:] for i in self.inputs}

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {
            "inputs": [
                {"name": i.name, "elem_type": i.elem_type, "dims": list(i.dims)}
                for i in self.inputs
            ],
            "static_batch": self.static_batch,
            "declared_range": list(self.declared_range) if self.declared_range else None,
            "range_source": self.range_source,
        }


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
    """A declared dim: a positive int, or a string for symbolic, unknown, -1 or 0."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    if d.HasField("dim_value"):
        return str(d.dim_value)  # -1 / 0 (Paddle style): treated as symbolic
    return d.dim_param or "?"


def input_spec(model: onnx.ModelProto, config: Config, source: Path | None) -> InputSpec:
    """Build the spec; raises OnnxlwError for inputs synthesis cannot draw."""
    inits = {t.name for t in model.graph.initializer}
    pins = config.input_shape_map()
    vis = [vi for vi in model.graph.input if vi.name not in inits]
    names = [vi.name for vi in vis]
    for name in pins:
        if name not in names:
            raise OnnxlwError(
                f"--input-shape names {name!r}, which is not a graph input",
                f"use one of: {', '.join(names)}",
            )
    out: list[GraphInput] = []
    batches: set[int | None] = set()
    for vi in vis:
        tt = vi.type.tensor_type
        dims = tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else None
        pin = pins.get(vi.name)
        if dims is None and pin is None:
            raise OnnxlwError(
                f"input {vi.name!r} has no shape",
                f"pass --input-shape {vi.name}:1,3,224,224 (your model's shape)",
            )
        if dims is not None and len(dims) < 1:
            raise OnnxlwError(
                f"input {vi.name!r} is a scalar; synthesis needs a batch dim",
                "export the model with a batched tensor input",
            )
        if pin is not None:
            if dims is not None and (
                len(pin) != len(dims)
                or any(
                    isinstance(d, int) and p > 0 and d != p
                    for d, p in zip(dims, pin, strict=True)
                )
            ):
                raise OnnxlwError(
                    f"--input-shape {vi.name}:{','.join(map(str, pin))} does not match the "
                    f"model's input shape {_dims_text(dims)}",
                    "pin only the dynamic dims and keep the static ones",
                )
            if any(p <= 0 for p in pin[1:]):
                raise OnnxlwError(
                    f"--input-shape {vi.name}:{','.join(map(str, pin))} leaves a non-batch dim "
                    "unpinned",
                    "give every dim after the batch a positive size",
                )
            dims = dims or tuple(str(p) for p in pin)
            shape = (1,) + tuple(int(p) for p in pin[1:])
        else:
            assert dims is not None
            sym = [k for k, d in enumerate(dims) if k > 0 and not isinstance(d, int)]
            if sym:
                raise OnnxlwError(
                    f"input {vi.name!r} has symbolic dims {_dims_text(dims)} beyond the batch dim",
                    f"pass --input-shape {vi.name}:1,"
                    + ",".join(str(d) if isinstance(d, int) else "N" for d in dims[1:])
                    + " with N replaced by the size to synthesize at",
                )
            shape = (1,) + tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
        batches.add(dims[0] if isinstance(dims[0], int) else None)
        out.append(GraphInput(vi.name, tt.elem_type, dims, shape))
    bad = [i for i in out if not i.is_float]
    if bad:
        i = bad[0]
        kind = onnx.TensorProto.DataType.Name(i.elem_type).lower()
        if i.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            raise OnnxlwError(
                f"the model is {kind} (input {i.name!r}); onnxlw compresses float32 models",
                "convert the model to float32 first (or export it in float32)",
            )
        raise OnnxlwError(
            f"input {i.name!r} is {kind}; onnxlw synthesizes float32 inputs only",
            "export the model with float32 image inputs (cast inside the model if needed)",
        )
    static = next(iter(batches)) if len(batches) == 1 else None
    declared, src = _declared_range(config, source)
    return InputSpec(tuple(out), static, declared, src)


def _declared_range(
    config: Config, source: Path | None
) -> tuple[tuple[float, float] | None, str]:
    if config.input_range is not None:
        return config.input_range, "config"
    if not config.sidecar or source is None:
        return None, ""
    side = source.with_suffix(".json")
    if not side.is_file():
        return None, ""
    try:
        pre = json.loads(side.read_text()).get("preprocess", {})
    except (OSError, ValueError, AttributeError):
        return None, ""
    r = range_from_preprocess(pre) if isinstance(pre, dict) else None
    return (r, f"sidecar {side.name}") if r is not None else (None, "")


def _dims_text(dims: tuple[int | str, ...]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"
