"""Layer-wise solvers. numpy only (scipy where numpy lacks it): this package never imports onnx."""

from .problem import (
    ActQuant,
    ActRange,
    CodebookRef,
    LayerProblem,
    LayerSolution,
    QuantEncoding,
    QuantSpec,
    SparseEncoding,
)
from .ranges import choose_range, fake_quant
from .weights import solve_weights

__all__ = [
    "ActQuant",
    "ActRange",
    "CodebookRef",
    "LayerProblem",
    "LayerSolution",
    "QuantEncoding",
    "QuantSpec",
    "SparseEncoding",
    "choose_range",
    "fake_quant",
    "solve_weights",
]
