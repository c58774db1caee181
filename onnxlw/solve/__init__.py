"""Layer-wise solvers. numpy/scipy only: this package never imports onnx."""

from .problem import ActRange, LayerProblem, QuantSpec, WeightSolution
from .ranges import choose_range, fake_quant
from .weights import solve_weights

__all__ = [
    "ActRange",
    "LayerProblem",
    "QuantSpec",
    "WeightSolution",
    "choose_range",
    "fake_quant",
    "solve_weights",
]
