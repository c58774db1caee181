"""The one frozen, typed configuration shared by the CLI, the Python API and the report."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import OnnxlwError


class Synthesis(str, enum.Enum):
    """How layer inputs are synthesized from BatchNorm statistics.

    ``MATCHED``: draw the graph input from the declared distribution and push it through the
    whole FP32 network; at every (folded) BatchNorm output, re-standardize each channel over
    the synthetic batch to exactly N(B_c, scale_c^2) moments. Keeps cross-channel and spatial
    correlation produced by the layers in between.
    ``GAUSSIAN``: every BatchNorm output is replaced by fresh independent N(B_c, scale_c^2)
    samples (one hop): the layer sees only the ops between its nearest BNs and itself.
    """

    MATCHED = "matched"
    GAUSSIAN = "gaussian"


class InputDistribution(str, enum.Enum):
    """Declared distribution of the graph input (per channel zero mean, unit variance)."""

    PINK = "pink"  # 1/f spatial spectrum, like natural images
    GAUSSIAN = "gaussian"  # i.i.d. N(0, 1) per pixel


class WeightScale(str, enum.Enum):
    """How per-output-channel weight scales are chosen."""

    OUTPUT_MSE = "output-mse"  # minimize the layer's output error on synthesized inputs
    MINMAX = "minmax"  # max |w| / qmax


class ActRange(str, enum.Enum):
    """How per-tensor activation ranges are chosen."""

    MSE = "mse"  # minimize quantization MSE of the synthesized activations
    MINMAX = "minmax"  # min/max of the synthesized activations


class BiasCorrection(str, enum.Enum):
    """Which expected output shift is folded back into the bias."""

    NONE = "none"
    WEIGHTS = "weights"  # shift from weight quantization: (W_q - W) E[x]
    FULL = "full"  # shift from weight and input quantization: W E[x] - W_q E[Q(x)]


MIN_WEIGHT_BITS = 2
MIN_ACT_BITS = 4
REFERENCE_IMAGE_VALUES = 3 * 224 * 224
"""Input values per image that the default synthetic image counts are set for."""


@dataclass(frozen=True)
class Config:
    """Every option of a compression run. Immutable; recorded verbatim in the report."""

    weight_bits: int = 8
    act_bits: int = 8
    input_bits: int | None = None
    """Bits of the graph inputs' grid (the first layers' input). None: 8 whatever
    ``act_bits``: an input is data (8-bit pixels for an image), not an activation that a layer
    produced, and onnxruntime's kernels run uint8 either way. Measured (seed 0, agreement %):
    MobileNetV2 W6A6 83.6 with a 6-bit input, 84.6 with 8 (seed 1: 84.6, 85.3); W5A5 67.6,
    70.9; W8A6 83.3, 83.8; EfficientNet-Lite0 W6A6 94.9, 95.6."""
    seed: int = 0
    samples: int | None = None
    """Synthetic images drawn at the graph input (the synthesis batch). None: 16; 32 with
    ``prune`` (a layer's refit needs a better estimate of H than its scales do: MobileNetV2 at
    20 % sparsity measured −1.1 pt with 16 and −0.9 pt with 32); 64 below 8 bits (GPTQ's H:
    MobileNetV2 W4A8 measured −10.2 pt with 16, −8.9 with 64, −9.4 with 128); 64 with
    ``additive`` (ResNet-56 at 2 bits: −4.1 pt with 16, −3.3 with 64). Inputs larger than
    3x224x224 get fewer by default (:meth:`samples_for`)."""
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Pins for dynamic input dims, used for synthesis only: ((name, dims), ...)."""
    input_distribution: InputDistribution = InputDistribution.PINK
    input_range: tuple[float, float] | None = None
    """Declared range of every graph input value (e.g. from the preprocessing: pixel 0 and
    255 normalized). Used as the input's quantization range instead of a synthesized one."""
    synthesis: Synthesis = Synthesis.MATCHED
    weight_scale: WeightScale = WeightScale.OUTPUT_MSE
    act_range: ActRange = ActRange.MSE
    bias_correction: BiasCorrection = BiasCorrection.FULL
    quantize_classifier: bool = True
    """Quantize Gemm/MatMul layers whose output is a graph output."""
    float_heads: bool = True
    """Keep the outputs of head convs (those reaching a graph output through shape, Sigmoid or
    Softmax ops) in float: synthetic inputs do not produce the tails real inputs do there."""
    workers: int = 2
    """Threads for the independent layer solves (results do not depend on it)."""
    saturation_guard: bool = True
    """Keep weight pairs within int16 for x86 u8s8 kernels without VNNI (VPMADDUBSW)."""
    equalize: str = "auto"
    """Cross-layer equalization before the solve (needs BN statistics): rescale the channels
    between a conv and the one conv it feeds so that the per-tensor activation grid and the
    consumer's weight rows suit every channel; ReLU6 kept exactly (passes/equalize.py).
    ``on``, ``off``, or ``auto``: on when weights go below 8 bits (measured W4A8, seed 0:
    MobileNetV2 −8.9 -> −6.8 pt, EfficientNet-Lite0 84.8 -> 85.7 % agreement, ResNet-56 −1.0
    -> −0.6 pt), off at 8 bits (EfficientNet-Lite0 W8A8 99.0 -> 97.5 % agreement)."""
    absorb_bias: bool = False
    """High-bias absorption before the solve (needs BN statistics): move the part of a
    channel that is always on (mean - 3 std > 0) from a conv's bias into the next conv's."""
    validate_samples: int = 16
    """Synthetic inputs used to compare the output with the original in ``validate``."""
    max_positions: int = 4096
    """Input positions sampled per layer for the weight solve (columns of im2col)."""
    sidecar: bool = True
    """Without ``input_range``, read the declared range from the preprocessing sidecar
    ``<model>.json`` next to a model file (``preprocess`` mean/std of 0..255 pixels)."""
    exclude: tuple[str, ...] = ()
    """Glob patterns (fnmatch) on layer node names, weight names or op types: matching layers
    stay in float."""
    executor: str = "threads"
    """Where layer solves run: ``threads`` or ``processes`` (results do not depend on it)."""
    fail_under_db: float | None = None
    """Raise an error when the validation SQNR of the output is below this (dB)."""
    prune: str | None = None
    """Pruning target: ``"0.5"`` (that fraction of all compressible weights zero, spread over
    the layers by sensitivity), ``"2:4"`` (N:M along the input dimension), or None."""
    quantize: bool = True
    """Quantize to W8A8 (after pruning, if any). False with ``prune``: a pruned FP32 model."""
    prune_method: str = "obs"
    """``obs`` (saliency masks from the synthesized H, least-squares refit) or ``magnitude``."""
    prune_allocation: str = "sensitivity"
    """``sensitivity`` (each layer prunes until its marginal output error per removed weight
    reaches a common price) or ``uniform``."""
    prune_refit: bool = True
    """Refit the kept weights by least squares (with ``obs``)."""
    sparse_format: str = "compact"
    """How pruned weights are stored: ``compact`` (per tensor the smallest of dense, a bitmask
    expanded at session start, or a sparse initializer) or ``dense`` (plain zeros)."""
    memory_budget_mb: int = 64
    """Synthesized activations held at once (MB); synthesis runs in segments beyond it."""
    rounding: str = "auto"
    """Weight rounding for the chosen scales: ``gptq`` (Hessian-aware, on the synthesized
    input covariance), ``nearest``, or ``auto`` (gptq below 8 bits, nearest at 8)."""
    layer_bits: tuple[tuple[str, int], ...] = ()
    """Per-layer weight bits: ((glob pattern on node/weight name or op type, bits), ...); the
    first match wins over ``weight_bits``."""
    size_budget: float | None = None
    """Mixed precision: choose each layer's weight bits (2-8) so that the output file is at
    most this fraction of the input file, with the least predicted output error."""
    network_aware: str = "auto"
    """Solve each layer a second time, in topological order, on the input the compressed
    network produces (the layers before it already compressed), reproducing the original
    network's output: ``on``, ``off``, or ``auto`` (on with unstructured or N:M pruning,
    where it was measured to pay; off for quantization alone, where it was measured worse:
    the compressed network's errors on synthetic images do not match those on real ones)."""
    pack_weights: bool = True
    """Store weights below 8 bits packed (b bits each), expanded to int8 at session start."""
    additive: float | None = None
    """Additive quantization at about this many code bits per weight (books * code_bits /
    dim): each vector of ``additive_dim`` weights is the sum of one codeword from each of
    ``additive_books`` codebooks, fitted to the layers' output on synthesized inputs. With
    ``quantize`` the decoded weights are requantized to int8 for W8A8 QDQ output (the codes
    are what is stored); without it, activations stay float."""
    additive_books: int | None = None
    """Codebooks per vector, the same in every layer. None: ``additive * additive_dim /
    additive_code_bits``, rounded down or up per layer (by sensitivity) to meet the mean."""
    additive_dim: int | None = None
    """Weights per vector. None: 8."""
    additive_code_bits: int = 8
    """Bits per code (2**bits codewords per codebook); codes are stored one byte each."""
    additive_scope: str = "shared"
    """``shared``: one codebook set for every coded layer; ``layer``: each its own."""
    additive_objective: str = "auto"
    """``output``: each layer's output error on its synthesized inputs; ``weight``: the plain
    weight error; ``auto``: output with BN statistics, weight without (propagated noise is no
    model of the data: BN-folded MobileNetV2 at 4 bits measured −53.8 pt with output, −2.7
    with weight; BN-folded ResNet-20 at 3 bits −0.6 / −3.6)."""
    additive_layout: str = "kernel"
    """Where conv vectors are cut: ``kernel`` (the weight's own (c, kh, kw) order: a 3x3
    kernel and a bit) or ``channels`` (consecutive input channels at one kernel position).
    Measured on ResNet-56 (2000 CIFAR images, 64 synthetic): 2 bits −1.1 pt kernel, −3.3
    channels; 2.3 bits −0.7 / −1.6. Same for 1x1 convs and dense layers."""
    additive_spread: int = 1
    """Book counts a layer may take beyond the two around the mean (``additive`` 3 with
    spread 1: 2 to 4 books per layer, chosen by measured sensitivity). Measured at 64
    synthetic images: MobileNetV2 at 3 bits −16.4 pt with 0, −6.9 with 1; ResNet-56 at 2 bits
    (2 seeds) 92.5/92.2 % agreement with 0, 92.6/92.5 % with 1."""
    additive_damping: float | None = None
    """Load on diag(H) in the additive fit, relative to its mean: large values move the
    output objective toward the plain weight error. None: the solver's default (0.01 with BN
    statistics, 1.0 without)."""
    additive_beam: int = 4
    """Beam width of the code search."""
    additive_rounds: int = 3
    """Codes / codebooks / scales alternations."""
    additive_min_params: int = 1024
    """Layers with fewer weights, or fewer inputs per row than two vectors (depthwise convs),
    keep 8-bit integer weights: the codes would save little and cost accuracy."""

    def __post_init__(self) -> None:
        for what, b in [("weight_bits", self.weight_bits)] + [
            (f"layer_bits {pat!r}", b) for pat, b in self.layer_bits
        ]:
            if not MIN_WEIGHT_BITS <= b <= 8:
                raise OnnxlwError(
                    f"{what}={b} is out of range", f"use {MIN_WEIGHT_BITS} to 8 weight bits"
                )
        if not MIN_ACT_BITS <= self.act_bits <= 8:
            raise OnnxlwError(
                f"act_bits={self.act_bits} is out of range",
                f"use {MIN_ACT_BITS} to 8 activation bits",
            )
        if self.input_bits is not None and not MIN_ACT_BITS <= self.input_bits <= 8:
            raise OnnxlwError(
                f"input_bits={self.input_bits} is out of range",
                f"use {MIN_ACT_BITS} to 8 bits for the graph inputs",
            )
        if self.input_bits is not None and not self.quantize:
            raise OnnxlwError(
                "input_bits is set but activations are not quantized (--no-quantize, or "
                "--additive without --act-bits)",
                "drop --input-bits, or quantize the activations (--act-bits)",
            )
        if self.network_aware not in ("auto", "on", "off"):
            raise OnnxlwError(
                f"network_aware={self.network_aware!r} is unknown", "use 'auto', 'on' or 'off'"
            )
        if self.equalize not in ("auto", "on", "off"):
            raise OnnxlwError(
                f"equalize={self.equalize!r} is unknown", "use 'auto', 'on' or 'off'"
            )
        if self.rounding not in ("auto", "gptq", "nearest"):
            raise OnnxlwError(
                f"rounding={self.rounding!r} is unknown", "use 'auto', 'gptq' or 'nearest'"
            )
        if self.size_budget is not None:
            if not 0 < self.size_budget < 1:
                raise OnnxlwError(
                    f"size_budget={self.size_budget} is not a fraction of the input file",
                    "use a fraction between 0 and 1, e.g. --size-budget 0.15",
                )
            if not self.quantize:
                raise OnnxlwError(
                    "size_budget needs quantization", "drop --no-quantize or --size-budget"
                )
            if self.prune is not None:
                raise OnnxlwError(
                    "size_budget with prune is not supported yet (the bit allocation does not "
                    "account for pruned weights)",
                    "use --prune with --weight-bits, or --size-budget alone",
                )
        if self.samples is not None and self.samples < 2:
            raise OnnxlwError(f"samples={self.samples} is too small", "use 2 or more samples")
        if self.input_range is not None and not (
            math.isfinite(self.input_range[0])
            and math.isfinite(self.input_range[1])
            and self.input_range[0] < self.input_range[1]
        ):
            raise OnnxlwError(
                f"input range {self.input_range} is empty or not finite",
                "declare a range LO,HI with finite LO < HI (or fix the sidecar's mean/std)",
            )
        if self.seed < 0:
            raise OnnxlwError(f"seed={self.seed} is negative", "use a seed >= 0")
        if self.executor not in ("threads", "processes"):
            raise OnnxlwError(
                f"executor={self.executor!r} is unknown", "use 'threads' or 'processes'"
            )
        if self.prune is not None:
            parse_prune(self.prune)
        if self.additive is not None:
            self.additive_shape()  # raises on a shape that does not exist
            for name, on in (("prune", self.prune is not None),
                             ("size_budget", self.size_budget is not None),
                             ("weight_bits", self.weight_bits != 8 or bool(self.layer_bits))):
                if on:
                    raise OnnxlwError(
                        f"additive with {name} is not supported (the codes set the weights' "
                        "size)",
                        f"drop --additive or the {name.replace('_', '-')} option",
                    )
            for name, value, allowed in (
                ("additive_scope", self.additive_scope, ("shared", "layer")),
                ("additive_objective", self.additive_objective, ("auto", "output", "weight")),
                ("additive_layout", self.additive_layout, ("channels", "kernel")),
            ):
                if value not in allowed:
                    raise OnnxlwError(
                        f"{name}={value!r} is unknown", f"use one of {', '.join(allowed)}"
                    )
            if (self.additive_beam < 1 or self.additive_rounds < 1 or self.additive_spread < 0
                    or (self.additive_damping is not None and self.additive_damping < 0)):
                raise OnnxlwError("additive_beam, additive_rounds >= 1; additive_spread, "
                                  "additive_damping >= 0",
                                  "use e.g. --additive-beam 4")
        if not self.quantize and self.prune is None and self.additive is None:
            raise OnnxlwError(
                "quantize=False without prune leaves nothing to do",
                "pass a pruning target (--prune 0.5) or drop --no-quantize",
            )
        if self.prune_method not in ("obs", "magnitude"):
            raise OnnxlwError(
                f"prune_method={self.prune_method!r} is unknown", "use 'obs' or 'magnitude'"
            )
        if self.sparse_format not in ("compact", "dense"):
            raise OnnxlwError(
                f"sparse_format={self.sparse_format!r} is unknown", "use 'compact' or 'dense'"
            )
        if self.prune_allocation not in ("sensitivity", "uniform"):
            raise OnnxlwError(
                f"prune_allocation={self.prune_allocation!r} is unknown",
                "use 'sensitivity' or 'uniform'",
            )
        if self.workers < 1:
            raise OnnxlwError(f"workers={self.workers} is too small", "use 1 or more workers")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of the options (enums as their values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif f.name == "input_shapes":
                v = {name: list(dims) for name, dims in v}
            elif f.name in ("input_range", "exclude") and v is not None:
                v = list(v)
            elif f.name == "layer_bits":
                v = [[pat, b] for pat, b in v]
            out[f.name] = v
        return out

    @property
    def synth_samples(self) -> int:
        """The synthesis batch actually used (``samples`` resolved)."""
        if self.samples is not None:
            return self.samples
        if self.low_bits or self.additive is not None:
            return 64
        return 32 if self.prune is not None else 16

    def samples_for(self, image_values: int) -> int:
        """Synthetic images for graph inputs of ``image_values`` values per image (all inputs,
        batch dim excluded): ``synth_samples``, lowered when ``samples`` is not given and the
        input is larger than 3x224x224 so that images x values stays where it is at 224 (the
        synthesized activations, and memory, grow with both), never below 16 (the 8-bit
        default). Each layer samples at most ``max_positions`` columns, so a large image
        gives a layer as many columns as several small ones. Rounded down to a power of two.
        Measured: PP-OCRv4 det at
        640x640, W4: 3.6 GB peak RSS with 64 images (W8A8 with 16: 1.0 GB)."""
        n = self.synth_samples
        if self.samples is not None or image_values <= REFERENCE_IMAGE_VALUES:
            return n
        fewer = max(min(n, 16), int(n * REFERENCE_IMAGE_VALUES / image_values))
        # A power of two (as the defaults are) divides a model's hard-coded batch of 2, 4, 8.
        return max(min(n, 16), 1 << (fewer.bit_length() - 1))

    @property
    def input_act_bits(self) -> int:
        """Bits of the graph inputs' grid (``input_bits`` resolved)."""
        return 8 if self.input_bits is None else self.input_bits

    @property
    def low_bits(self) -> bool:
        """Whether any layer may get fewer than 8 bits (weights or activations)."""
        return (
            self.weight_bits < 8
            or self.act_bits < 8
            or (self.quantize and self.input_act_bits < 8)
            or any(b < 8 for _, b in self.layer_bits)
            or self.size_budget is not None
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The inverse of :meth:`to_dict`."""
        kw = dict(d)
        for f in dataclasses.fields(cls):
            if f.name not in kw:
                continue
            v = kw[f.name]
            if f.name == "input_shapes":
                kw[f.name] = tuple((k, tuple(x)) for k, x in v.items())
            elif f.name in ("input_range", "exclude") and v is not None:
                kw[f.name] = tuple(v)
            elif f.name == "layer_bits":
                kw[f.name] = tuple((str(pat), int(b)) for pat, b in v)
            elif isinstance(getattr(cls, f.name, None), enum.Enum):
                kw[f.name] = type(getattr(cls, f.name))(v)
        return cls(**kw)

    def bits_override(self, names: tuple[str, ...]) -> int | None:
        """The bits of the first ``layer_bits`` pattern matching any of ``names`` (node name,
        weight name, op type), or None."""
        for pat, b in self.layer_bits:
            if any(fnmatch.fnmatchcase(n, pat) for n in names):
                return b
        return None

    def bits_for(self, names: tuple[str, ...]) -> int:
        """Weight bits of a layer known by ``names``: its ``layer_bits`` override, else
        ``weight_bits``."""
        b = self.bits_override(names)
        return self.weight_bits if b is None else b

    @property
    def refines(self) -> bool:
        """Whether the network-aware second solve runs (``network_aware`` resolved)."""
        if self.network_aware != "auto":
            return self.network_aware == "on"
        return self.prune is not None and parse_prune(self.prune).kind != "channels"

    @property
    def equalizes(self) -> bool:
        """Whether cross-layer equalization runs (``equalize`` resolved): ``auto`` is on when
        the weights of some layer may go below 8 bits, with plain quantization (not with
        additive codes or pruning, where it was not measured)."""
        if self.equalize != "auto":
            return self.equalize == "on"
        weights_low = (
            self.weight_bits < 8
            or any(b < 8 for _, b in self.layer_bits)
            or self.size_budget is not None
        )
        return weights_low and self.additive is None and self.prune is None

    def uses_gptq(self, bits: int) -> bool:
        """Whether weights at ``bits`` are rounded by GPTQ under ``rounding``."""
        return self.rounding == "gptq" or (self.rounding == "auto" and bits < 8)

    def additive_shape(self) -> tuple[int, int, int]:
        """(most books per vector, dim, code_bits) of ``additive``, defaults resolved. When
        ``additive`` is not a whole number of books, layers get that many books rounded down
        or up (chosen by sensitivity) so that the mean is ``additive`` bits per weight."""
        bits = float(self.additive or 0)
        cb = self.additive_code_bits
        if not 1 <= cb <= 8:
            raise OnnxlwError(f"additive_code_bits={cb} is out of range", "use 1 to 8 bits")
        d = self.additive_dim or 8
        m = bits * d / cb
        if self.additive_books is not None:
            if abs(self.additive_books - m) > 1e-9 or d < 1:
                raise OnnxlwError(
                    f"--additive {bits:g} is not --additive-books {self.additive_books} x "
                    f"{cb} code bits / dim {d}",
                    "drop --additive-books (then layers mix book counts to meet the mean) or "
                    "make the numbers match",
                )
            return self.additive_books, d, cb
        if d < 2 or m < 1 - 1e-9 or m > 16:
            raise OnnxlwError(
                f"--additive {bits:g} bits per weight needs {m:g} codebooks per vector of "
                f"{d} (with {cb}-bit codes); 1 to 16 are possible",
                f"use --additive between {cb / d:g} and {16 * cb / d:g}",
            )
        return int(np.ceil(m - 1e-9)) + self.additive_spread, d, cb

    def input_shape_map(self) -> dict[str, tuple[int, ...]]:
        """The ``input_shapes`` pins as a dict."""
        return dict(self.input_shapes)


@dataclass(frozen=True)
class PruneTarget:
    """A parsed ``--prune`` value: ``unstructured`` with a sparsity, ``nm`` with N of M kept, or
    ``channels`` with the fraction of inner channels removed."""

    kind: str
    sparsity: float
    n: int = 0
    m: int = 0


def parse_prune(text: str) -> PruneTarget:
    """Parse ``0.5``, ``2:4`` or ``channels:0.3``."""
    t = text.strip()
    try:
        if t.startswith("channels:"):
            f = float(t.split(":", 1)[1])
            if not 0.0 < f < 1.0:
                raise ValueError
            return PruneTarget("channels", f)
        if ":" in t:
            n, m = (int(v) for v in t.split(":"))
            if not 0 < n < m <= 64:
                raise ValueError
            return PruneTarget("nm", 1.0 - n / m, n, m)
        s = float(t)
        if not 0.0 < s < 1.0:
            raise ValueError
        return PruneTarget("unstructured", s)
    except ValueError:
        raise OnnxlwError(
            f"--prune {t!r} is not a sparsity in (0, 1), an N:M pattern or channels:FRACTION",
            "write e.g. --prune 0.5, --prune 2:4 or --prune channels:0.3",
        ) from None


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name:1,3,224,224`` into ``("name", (1, 3, 224, 224))``."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < -1 for d in shape):
        raise OnnxlwError(
            f"--input-shape {text!r} is not of the form NAME:D1,D2,...",
            "write e.g. --input-shape input:1,3,224,224",
        )
    return name, shape


def parse_input_range(text: str) -> tuple[float, float]:
    """Parse ``LO,HI`` or ``[LO,HI]`` into floats."""
    try:
        lo, hi = (float(x) for x in text.strip().strip("[]").split(","))
    except ValueError:
        raise OnnxlwError(
            f"--input-range {text!r} is not of the form LO,HI",
            "write e.g. --input-range=-2.2,2.7 (use '=' when LO is negative)",
        ) from None
    return lo, hi


def range_from_preprocess(pre: dict) -> tuple[float, float] | None:
    """Input value range implied by a sidecar's ``preprocess`` (pixels 0..255 normalized).

    Knows ``mean255``/``std255`` (per channel, 0..255 units) and scalar or per-channel
    ``mean``/``std`` (0..1 units). Returns None when the keys are absent.
    """
    try:
        if "mean255" in pre and "std255" in pre:
            mean, std, top = (
                np.asarray(pre["mean255"], float),
                np.asarray(pre["std255"], float),
                255.0,
            )
        elif "mean" in pre and "std" in pre:
            mean, std, top = np.asarray(pre["mean"], float), np.asarray(pre["std"], float), 1.0
        else:
            return None
    except (TypeError, ValueError):
        mean, std, top = np.zeros(1), np.zeros(1), 1.0  # reported as malformed below
    if mean.shape != std.shape or not np.all(np.isfinite(mean)) or not np.all(std > 0):
        raise OnnxlwError(
            "the sidecar's preprocess mean/std are malformed (shapes differ or std <= 0)",
            "fix the sidecar JSON or pass --input-range LO,HI",
        )
    lo = float(np.min((0.0 - mean) / std))
    hi = float(np.max((top - mean) / std))
    return lo, hi
