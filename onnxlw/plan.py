"""The Plan: every decision of a compression run, saveable and re-emittable without solving.

A plan holds one :class:`~onnxlw.solve.LayerSolution` per compressed layer (keyed by the
analysis index, with the layer's node name to check it against the model), the activation
encodings, shared codebooks and kept channels. ``save``/``load`` use one ``.npz`` file
(arrays, no pickle) with a JSON header, so ``--load-plan`` re-emits the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import OnnxlwError
from .solve.problem import (
    ActQuant,
    CodebookRef,
    LayerSolution,
    QuantEncoding,
    SparseEncoding,
)

FORMAT = "onnxlw-plan/1"


@dataclass
class Plan:
    """Layer solutions, activation encodings, codebooks and kept channels of one run."""

    layers: dict[int, LayerSolution] = field(default_factory=dict)
    layer_names: dict[int, str] = field(default_factory=dict)
    activations: dict[str, ActQuant] = field(default_factory=dict)
    codebooks: dict[str, np.ndarray] = field(default_factory=dict)
    kept_channels: dict[int, np.ndarray] = field(default_factory=dict)
    format: str = "qdq"
    meta: dict[str, Any] = field(default_factory=dict)
    """input_sha256, options: what the plan was solved for."""
    jobs: dict[int, tuple[Any, tuple]] = field(default_factory=dict, repr=False, compare=False)
    """How each layer was solved: (module-level job function, its arguments after the
    problem), so a later stage can solve the layer again on another problem. Not saved."""

    def min_weight_bits(self) -> int:
        """Fewest weight bits of any quantized layer (8 when none is quantized)."""
        bits = [s.encoding.bits for s in self.layers.values()
                if isinstance(s.encoding, QuantEncoding)]
        return min(bits, default=8)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to ``path`` (.npz), atomically."""
        arrays: dict[str, np.ndarray] = {}
        header: dict[str, Any] = {
            "format": FORMAT,
            "emit_format": self.format,
            "meta": self.meta,
            "activations": {k: asdict(v) for k, v in sorted(self.activations.items())},
            "layers": {},
            "codebooks": sorted(self.codebooks),
            "kept_channels": sorted(self.kept_channels),
        }
        for i, sol in sorted(self.layers.items()):
            arrays[f"l{i}.weight"] = sol.weight
            arrays[f"l{i}.bias"] = sol.bias
            enc: dict[str, Any] = {"kind": None}
            e = sol.encoding
            if isinstance(e, QuantEncoding):
                enc = {"kind": "quant", "bits": e.bits, "signed": e.signed}
                arrays[f"l{i}.q"], arrays[f"l{i}.scale"], arrays[f"l{i}.zp"] = (
                    e.q,
                    e.scale,
                    e.zero_point,
                )
            elif isinstance(e, SparseEncoding):
                enc = {"kind": "sparse", "pattern": e.pattern}
                arrays[f"l{i}.mask"] = e.mask
            elif isinstance(e, CodebookRef):
                enc = {"kind": "codebook", "book": e.book, "dim": e.dim, "layout": e.layout,
                       "weight_shape": list(e.weight_shape), "transposed": e.transposed,
                       "quant": e.quant is not None}
                arrays[f"l{i}.codes"], arrays[f"l{i}.cscale"] = e.codes, e.scale
                if e.quant is not None:
                    arrays[f"l{i}.q"], arrays[f"l{i}.scale"], arrays[f"l{i}.zp"] = (
                        e.quant.q, e.quant.scale, e.quant.zero_point)
            header["layers"][str(i)] = {
                "node": self.layer_names.get(i, ""),
                "encoding": enc,
                "stats": {k: float(v) for k, v in sol.stats.items()},
            }
        for name, book in self.codebooks.items():
            arrays[f"book.{name}"] = book
        for i, keep in self.kept_channels.items():
            arrays[f"keep.{i}"] = keep
        arrays["header"] = np.frombuffer(
            json.dumps(header, sort_keys=True).encode(), dtype=np.uint8
        )
        path = os.fspath(path)
        tmp = f"{path}.tmp.npz"
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise OnnxlwError(
                f"could not write plan {path}: {e.strerror}", "check the path"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`."""
        try:
            z = np.load(os.fspath(path), allow_pickle=False)
            header = json.loads(bytes(z["header"]).decode())
        except (OSError, ValueError, KeyError):
            raise OnnxlwError(
                f"{path}: not an onnxlw plan file", "pass a file written with --save-plan"
            ) from None
        if header.get("format") != FORMAT:
            raise OnnxlwError(
                f"{path}: plan format {header.get('format')!r} is not {FORMAT!r}",
                "re-solve with this onnxlw version and --save-plan",
            )
        plan = cls(format=header["emit_format"], meta=header["meta"])
        plan.activations = {k: ActQuant(**v) for k, v in header["activations"].items()}
        for key, info in header["layers"].items():
            i = int(key)
            enc_d = info["encoding"]
            enc: QuantEncoding | SparseEncoding | CodebookRef | None = None
            if enc_d["kind"] == "quant":
                enc = QuantEncoding(
                    z[f"l{i}.q"], z[f"l{i}.scale"], z[f"l{i}.zp"], enc_d["bits"], enc_d["signed"]
                )
            elif enc_d["kind"] == "sparse":
                enc = SparseEncoding(z[f"l{i}.mask"], enc_d["pattern"])
            elif enc_d["kind"] == "codebook":
                quant = (
                    QuantEncoding(z[f"l{i}.q"], z[f"l{i}.scale"], z[f"l{i}.zp"], 8, True)
                    if enc_d["quant"] else None
                )
                enc = CodebookRef(
                    z[f"l{i}.codes"], enc_d["book"], enc_d["dim"], z[f"l{i}.cscale"],
                    enc_d["layout"], tuple(enc_d["weight_shape"]), enc_d["transposed"], quant,
                )
            plan.layers[i] = LayerSolution(
                z[f"l{i}.weight"], z[f"l{i}.bias"], enc, dict(info["stats"])
            )
            plan.layer_names[i] = info["node"]
        plan.codebooks = {n: z[f"book.{n}"] for n in header["codebooks"]}
        plan.kept_channels = {int(i): z[f"keep.{i}"] for i in header["kept_channels"]}
        return plan

    def check_matches(self, layers: dict[int, str], input_sha256: str) -> None:
        """OnnxlwError unless the plan was solved for these layers (index -> node name)."""
        if self.meta.get("input_sha256") not in (None, input_sha256):
            raise OnnxlwError(
                "the plan was solved for another model (input SHA-256 differs)",
                "load the plan with the model it was saved for, or re-solve without --load-plan",
            )
        for i, name in self.layer_names.items():
            if layers.get(i) != name:
                raise OnnxlwError(
                    f"the plan's layer {i} ({name!r}) is not in this model",
                    "load the plan with the model and options it was saved for",
                )
