"""onnxlw: data-free compression of ONNX CNNs from their BatchNorm statistics."""

from ._version import __version__
from .config import ActRange, BiasCorrection, Config, InputDistribution, Synthesis, WeightScale
from .errors import OnnxlwError
from .pipeline import compress
from .report import Report

__all__ = [
    "ActRange",
    "BiasCorrection",
    "Config",
    "InputDistribution",
    "OnnxlwError",
    "Report",
    "Synthesis",
    "WeightScale",
    "__version__",
    "compress",
]
