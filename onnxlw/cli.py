"""Thin command-line front end: parse options into a Config, call the pipeline, print."""


from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ._version import __version__
from .config import (
    ActRange,
    BiasCorrection,
    Config,
    InputDistribution,
    Synthesis,
    WeightScale,
    parse_input_range,
    parse_input_shape,
)
from .errors import InternalError, OnnxlwError

DESCRIPTION = (
    "Data-free compression of ONNX CNNs: quantizes a trained FP32 model to W8A8 QDQ that "
    "onnxruntime fuses into integer kernels, using only the BatchNorm statistics stored in "
    "the model (no calibration data)."
)


ENUM_OPTIONS = (
    (
        "--input-dist",
        InputDistribution,
        Config.input_distribution,
        "distribution of synthetic inputs (per channel zero mean, unit variance)",
    ),
    (
        "--synthesis",
        Synthesis,
        Config.synthesis,
        "matched: push synthetic inputs through the network and match every BN's moments; "
        "gaussian: independent N(beta, gamma^2) samples after every BN",
    ),
    (
        "--weight-scale",
        WeightScale,
        Config.weight_scale,
        "per-channel weight scale: minimize the layer's output error, or max|w|",
    ),
    (
        "--act-range",
        ActRange,
        Config.act_range,
        "per-tensor activation range: minimize quantization MSE, or min/max",
    ),
    (
        "--bias-correction",
        BiasCorrection,
        Config.bias_correction,
        "fold the expected output shift of quantization back into the bias",
    ),
)
"""The options that choose among a Config enum's values: (flag, enum, default, help)."""

STR_OPTIONS = (
    (
        "--prune-method",
        ["obs", "magnitude"],
        Config.prune_method,
        "obs: saliency masks from the synthesized input statistics and a least-squares "
        "refit; magnitude: keep the largest |w| (the baseline)",
    ),
    (
        "--prune-allocation",
        ["sensitivity", "uniform"],
        Config.prune_allocation,
        "how a global sparsity is spread over the layers",
    ),
    (
        "--sparse-format",
        ["compact", "dense"],
        Config.sparse_format,
        "compact: each pruned weight as the smallest of dense, a bitmask that onnxruntime "
        "expands at session start, or a sparse initializer; dense: plain zeros",
    ),
)
"""String-choice options: (flag, choices, default, help)."""


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="onnxlw", description=DESCRIPTION, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"onnxlw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compress",
        help="quantize a model to W8A8 QDQ with no data",
        description=DESCRIPTION,
        formatter_class=fmt,
    )
    c.add_argument("input", help="the FP32 model (.onnx)")
    c.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    c.add_argument(
        "--weight-bits",
        type=int,
        default=8,
        help="weight bits of every compressible layer, classifier included (2-8); below 8 the "
        "weights are stored packed and expanded to int8 at session start (still fused)",
    )
    c.add_argument(
        "--act-bits",
        type=int,
        default=None,
        help="activation bits (4-8; default 8); below 8 a uint8 Clip between Q and DQ keeps "
        "the integer kernels fused. With --additive, activations stay float unless given",
    )
    c.add_argument(
        "--input-bits",
        type=int,
        default=None,
        help="bits of the graph inputs' grid (4-8; default 8 whatever --act-bits: an input "
        "is data, such as 8-bit pixels, not an activation)",
    )
    c.add_argument(
        "--layer-bits",
        action="append",
        default=[],
        metavar="PATTERN=BITS",
        help="weight bits of the layers whose node name, weight name or op type matches the "
        "glob PATTERN (repeatable; the first match wins over --weight-bits)",
    )
    c.add_argument(
        "--size-budget",
        type=float,
        default=None,
        metavar="FRACTION",
        help="mixed precision: pick each layer's weight bits (2-8) so that the output file is "
        "at most FRACTION of the input file, with the least predicted output error",
    )
    c.add_argument(
        "--rounding",
        choices=["auto", "gptq", "nearest"],
        default="auto",
        help="weight rounding: gptq (Hessian-aware, on the synthesized input covariance), "
        "nearest, or auto (gptq below 8 bits)",
    )
    c.add_argument(
        "--network-aware",
        choices=["auto", "on", "off"],
        default="auto",
        help="solve each layer again on the input the compressed network produces (the "
        "layers before it already compressed), in topological order; auto: with unstructured "
        "or N:M pruning (measured to pay there, and worse for quantization alone)",
    )
    c.add_argument(
        "--no-pack",
        action="store_true",
        help="store weights below 8 bits as plain int8 (as large as 8-bit weights)",
    )
    c.add_argument(
        "--additive",
        type=float,
        default=None,
        metavar="BITS",
        help="additive quantization at about BITS code bits per weight (e.g. 2, 2.5, 3): each "
        "vector of weights is a sum of codewords from codebooks shared across layers, fitted "
        "to the layers' output on synthesized inputs; rebuilt at session start (float speed)",
    )
    c.add_argument("--additive-books", type=int, default=None,
                   help="codebooks per vector (default: BITS * dim / code bits)")
    c.add_argument("--additive-dim", type=int, default=None,
                   help="weights per vector (default 8, or 16 when 8 does not divide)")
    c.add_argument("--additive-code-bits", type=int, default=8,
                   help="bits per code, 2**bits codewords per codebook (default 8)")
    c.add_argument("--additive-scope", choices=("shared", "layer"), default="shared",
                   help="one codebook set for all layers, or one per layer (default shared)")
    c.add_argument("--additive-objective", choices=("auto", "output", "weight"), default="auto",
                   help="fit each layer's output error on synthesized inputs, or the plain "
                   "weight error (default auto: output with BN statistics, weight without)")
    c.add_argument("--additive-layout", choices=("kernel", "channels"), default="kernel",
                   help="conv vectors along the weight's own (c, kh, kw) order, or along "
                   "input channels at one kernel position (default kernel)")
    c.add_argument("--additive-spread", type=int, default=1,
                   help="book counts a layer may take beyond the two around the mean, chosen "
                   "by measured sensitivity (default 1: --additive 3 gives 2 to 4 books)")
    c.add_argument("--additive-damping", type=float, default=None,
                   help="load on diag(H) relative to its mean in the additive fit; large "
                   "values approach the plain weight error")
    c.add_argument("--additive-beam", type=int, default=4, help="code search beam (default 4)")
    c.add_argument("--additive-rounds", type=int, default=3,
                   help="codes/codebooks/scales alternations (default 3)")
    c.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    c.add_argument(
        "--samples",
        type=int,
        default=None,
        help="synthetic images per synthesis run (default: 16, or 32 with --prune)",
    )
    c.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2,...",
        help="pin dynamic input dims for synthesis (repeatable; -1 keeps the batch dim symbolic)",
    )
    c.add_argument(
        "--input-range",
        metavar="LO,HI",
        help="declared range of input values, e.g. --input-range=[-2.1,2.6] (default: from a "
        "sidecar <model>.json with 'preprocess' mean/std next to the model, if present)",
    )
    c.add_argument(
        "--no-sidecar",
        action="store_true",
        help="do not read the input range from the sidecar <model>.json",
    )
    for flag, enum_type, default, text in ENUM_OPTIONS:
        c.add_argument(
            flag, choices=[e.value for e in enum_type], default=default.value, help=text
        )
    c.add_argument(
        "--float-classifier",
        action="store_true",
        help="leave Gemm/MatMul layers that produce a graph output in float",
    )
    c.add_argument(
        "--quantize-heads",
        action="store_true",
        help="also quantize the outputs of head convs that reach a graph output through "
        "shape/sigmoid/softmax ops (off: detector logits survive real inputs)",
    )
    c.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep layers whose node name, weight name or op type matches this glob in float "
        "(repeatable)",
    )
    c.add_argument(
        "--saturation-guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep x86 u8s8 weight pairs within int16 (needed on x86 without VNNI; turn off "
        "for VNNI or ARM targets)",
    )
    c.add_argument(
        "--equalize",
        choices=["auto", "on", "off"],
        default=Config.equalize,
        help="cross-layer equalization before the solve, ReLU6 kept exactly (needs BN "
        "statistics); auto: on when weights go below 8 bits (default: %(default)s)",
    )
    c.add_argument(
        "--absorb-bias",
        action=argparse.BooleanOptionalAction,
        default=Config.absorb_bias,
        help="high-bias absorption before the solve (needs BN statistics; approximate: exact "
        "where a channel stays above mean - 3 std)",
    )
    c.add_argument(
        "--prune",
        metavar="SPARSITY|N:M",
        help="prune before quantizing: 0.5 zeroes 50 %% of all compressible weights (spread "
        "over the layers by sensitivity); 2:4 keeps 2 of every 4 inputs",
    )
    c.add_argument(
        "--no-quantize",
        action="store_true",
        help="with --prune: write the pruned FP32 model, not W8A8",
    )
    for flag, choices, default, text in STR_OPTIONS:
        c.add_argument(flag, choices=choices, default=default, help=text)
    c.add_argument(
        "--no-prune-refit",
        action="store_true",
        help="keep the surviving weights as they are (an ablation of the refit)",
    )
    c.add_argument("--workers", type=int, default=Config.workers, help="parallel layer solves")
    c.add_argument(
        "--executor",
        choices=["threads", "processes"],
        default=Config.executor,
        help="where layer solves run (the output does not depend on it)",
    )
    c.add_argument(
        "--memory-budget",
        type=int,
        default=Config.memory_budget_mb,
        metavar="MB",
        help="synthesized activations held at once; synthesis runs in segments beyond it",
    )
    c.add_argument(
        "--fail-under",
        type=float,
        metavar="DB",
        help="exit with an error (and write nothing) when the output's SQNR vs FP32 on "
        "synthetic inputs is below DB",
    )
    c.add_argument("--images", metavar="DIR", help="also report agreement on these real images "
                   "(preprocessing from the sidecar; needs Pillow)")
    c.add_argument("--save-plan", metavar="FILE.npz", help="save the solved plan")
    c.add_argument(
        "--load-plan",
        metavar="FILE.npz",
        help="re-emit a saved plan without synthesizing or solving (same bytes)",
    )
    c.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    c.add_argument("--force", action="store_true", help="allow -o to overwrite the input")
    c.add_argument("-v", "--verbose", action="store_true", help="tracebacks and details")
    c.set_defaults(func=_compress)

    i = sub.add_parser(
        "inspect",
        help="what compress would do: layers, BN statistics, reasons for skips",
        formatter_class=fmt,
    )
    i.add_argument("input", help="the model (.onnx)")
    i.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2,...",
        help="pin dynamic input dims (as for compress)",
    )
    i.add_argument("-v", "--verbose", action="store_true", help="tracebacks and details")
    i.set_defaults(func=_inspect)

    try:
        from .evaluation.cli import add_parser as add_eval
    except ImportError:  # pragma: no cover - evaluation ships with the package
        add_eval = None
    if add_eval is not None:
        add_eval(sub)
    return p


def _config(a: argparse.Namespace) -> Config:
    return Config(
        weight_bits=a.weight_bits,
        act_bits=8 if a.act_bits is None else a.act_bits,
        input_bits=a.input_bits,
        seed=a.seed,
        samples=a.samples,
        input_shapes=tuple(parse_input_shape(s) for s in a.input_shape),
        input_distribution=InputDistribution(a.input_dist),
        synthesis=Synthesis(a.synthesis),
        weight_scale=WeightScale(a.weight_scale),
        act_range=ActRange(a.act_range),
        bias_correction=BiasCorrection(a.bias_correction),
        quantize_classifier=not a.float_classifier,
        float_heads=not a.quantize_heads,
        input_range=parse_input_range(a.input_range) if a.input_range else None,
        sidecar=not a.no_sidecar,
        exclude=tuple(a.exclude),
        saturation_guard=a.saturation_guard,
        equalize=a.equalize,
        absorb_bias=a.absorb_bias,
        workers=a.workers,
        executor=a.executor,
        memory_budget_mb=a.memory_budget,
        prune=a.prune,
        quantize=not a.no_quantize and (a.additive is None or a.act_bits is not None),
        prune_method=a.prune_method,
        prune_allocation=a.prune_allocation,
        prune_refit=not a.no_prune_refit,
        sparse_format=a.sparse_format,
        fail_under_db=a.fail_under,
        layer_bits=tuple(parse_layer_bits(x) for x in a.layer_bits),
        size_budget=a.size_budget,
        rounding=a.rounding,
        pack_weights=not a.no_pack,
        network_aware=a.network_aware,
        additive=a.additive,
        additive_books=a.additive_books,
        additive_dim=a.additive_dim,
        additive_code_bits=a.additive_code_bits,
        additive_scope=a.additive_scope,
        additive_objective=a.additive_objective,
        additive_layout=a.additive_layout,
        additive_spread=a.additive_spread,
        additive_damping=a.additive_damping,
        additive_beam=a.additive_beam,
        additive_rounds=a.additive_rounds,
    )


def parse_layer_bits(text: str) -> tuple[str, int]:
    """``PATTERN=BITS`` -> (pattern, bits)."""
    pat, sep, bits = text.rpartition("=")
    if not sep or not pat or not bits.strip().isdigit():
        raise OnnxlwError(
            f"--layer-bits {text!r} is not PATTERN=BITS", "write e.g. --layer-bits 'conv1*=8'"
        )
    return pat, int(bits)


def _compress(a: argparse.Namespace) -> int:
    from .io import check_output_folder, save_atomic
    from .ortutil import file_size
    from .pipeline import compress

    src, dst = Path(a.input), Path(a.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve() and not a.force:
        raise OnnxlwError(f"-o {dst} is the input file", "write elsewhere, or pass --force")
    check_output_folder(dst)  # before the work, not only when saving
    if a.report:
        rfolder = Path(a.report).parent if str(Path(a.report).parent) else Path(".")
        if not rfolder.is_dir() or not os.access(rfolder, os.W_OK):
            raise OnnxlwError(
                f"report folder {rfolder} does not exist or is not writable",
                "pick a writable --report path",
            )
    config = _config(a)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    model, report = compress(src, config, plan=a.load_plan, progress=progress)
    spec = report.inputs
    if spec.get("declared_range") and str(spec.get("range_source", "")).startswith("sidecar"):
        lo, hi = spec["declared_range"]
        print(f"input range [{lo:.4g}, {hi:.4g}] declared by {spec['range_source']}",
              file=sys.stderr)
    save_atomic(model, dst, external_data=report.external_data)
    if a.save_plan:
        report.plan.save(a.save_plan)
    real = None
    if a.images:
        from .evaluation.evaluate import evaluate

        real = evaluate(src, dst, a.images, None, latency_runs=0)
    report.size_before = file_size(src)
    report.size_after = file_size(dst)
    report.wall_time = round(time.perf_counter() - t0, 3)
    if a.report:
        rp = Path(a.report)
        tmp = rp.with_name(f".{rp.name}.tmp")
        try:
            tmp.write_text(report.to_json() + "\n")
            os.replace(tmp, rp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OnnxlwError(
                f"could not write report {rp}: {e.strerror}", "pick a writable --report path"
            ) from None
    print(f"wrote {dst}")
    if a.verbose:
        print(report.layer_table())
    print(report.summary())
    if real is not None:
        print(
            f"real images      : top-1 agreement {100 * real.top1_agreement:.1f}% with FP32 on "
            f"{real.n} images of {a.images}"
        )
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect_model

    cfg = Config(input_shapes=tuple(parse_input_shape(s) for s in a.input_shape))
    print(inspect_model(a.input, cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onnxlw`` console script. Returns the exit code."""
    parser = _parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except (OnnxlwError, InternalError) as e:
        if getattr(a, "verbose", False):
            raise
        print(f"onnxlw: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # e.g. `onnxlw inspect m.onnx | head`
        return 0
    except KeyboardInterrupt:
        print("onnxlw: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line unless -v
        if getattr(a, "verbose", False):
            raise
        print(
            f"onnxlw: error: {InternalError(f'{type(e).__name__}: {e}').one_line()}",
            file=sys.stderr,
        )
        return InternalError.exit_code
