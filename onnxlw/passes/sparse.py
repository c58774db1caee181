"""Densify sparse initializers: onnxlw's analyses and solvers read dense weight arrays.

The conversion (:func:`onnxlw.graph.sparse_to_dense`) is hand-written because onnx has no
public SparseTensorProto -> numpy function.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import rebuild, sparse_to_dense
from .base import Note, PassResult


def densify_sparse_initializers(model: onnx.ModelProto) -> PassResult:
    """Replace every ``graph.sparse_initializer`` by the equal dense initializer (same name)."""
    g = model.graph
    dense: list[onnx.TensorProto] = []
    notes: list[Note] = []
    for sp in g.sparse_initializer:
        v = sparse_to_dense(sp)
        dense.append(numpy_helper.from_array(np.ascontiguousarray(v), sp.values.name))
        nnz = int(np.prod(sp.values.dims, dtype=np.int64))
        notes.append(
            Note(
                "densify_sparse",
                "sparse_initializer",
                sp.values.name,
                True,
                f"{nnz} stored of {v.size} values: onnxlw analyses dense weights",
            )
        )
    if not notes:
        return PassResult(
            rebuild(model, g.node, g.initializer),
            [Note("densify_sparse", "sparse_initializer", "graph", False, "none present")],
        )
    return PassResult(rebuild(model, g.node, list(g.initializer) + dense, []), notes)
