"""Thin command-line front end: parse options into a Config, call the pipeline, print."""

from __future__ import annotations

import argparse
import json
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
    range_from_preprocess,
)
from .errors import OnnxlwError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxlw", description=__doc__)
    p.add_argument("--version", action="version", version=f"onnxlw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="quantize a model to W8A8 QDQ with no data")
    c.add_argument("input", help="model.onnx")
    c.add_argument("-o", "--output", required=True, help="where to write the QDQ model")
    c.add_argument("--weight-bits", type=int, default=8)
    c.add_argument("--act-bits", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--samples",
        type=int,
        default=Config.samples,
        help="synthetic images per synthesis run (default %(default)s)",
    )
    c.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2,...",
        help="pin dynamic input dims for synthesis (repeatable)",
    )
    c.add_argument(
        "--input-dist",
        choices=[e.value for e in InputDistribution],
        default=Config.input_distribution.value,
    )
    c.add_argument(
        "--input-range",
        metavar="LO,HI",
        help="declared range of input values (default: from a sidecar <model>.json with "
        "'preprocess' mean/std next to the model, if present)",
    )
    c.add_argument(
        "--synthesis", choices=[e.value for e in Synthesis], default=Config.synthesis.value
    )
    c.add_argument(
        "--weight-scale", choices=[e.value for e in WeightScale], default=Config.weight_scale.value
    )
    c.add_argument(
        "--act-range", choices=[e.value for e in ActRange], default=Config.act_range.value
    )
    c.add_argument(
        "--bias-correction",
        choices=[e.value for e in BiasCorrection],
        default=Config.bias_correction.value,
    )
    c.add_argument(
        "--float-classifier",
        action="store_true",
        help="leave Gemm/MatMul layers that produce a graph output in float",
    )
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--force", action="store_true", help="allow -o to overwrite the input")
    c.add_argument("-v", "--verbose", action="store_true", help="tracebacks and details")
    c.set_defaults(func=_compress)

    i = sub.add_parser("inspect", help="list layers, BN statistics and unsupported ops")
    i.add_argument("input")
    i.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...")
    i.add_argument("-v", "--verbose", action="store_true")
    i.set_defaults(func=_inspect)

    try:
        from .evaluation.cli import add_parser as add_eval
    except ImportError:  # pragma: no cover - evaluation ships with the package
        add_eval = None
    if add_eval is not None:
        add_eval(sub)
    return p


def _input_range(a: argparse.Namespace) -> tuple[tuple[float, float] | None, str]:
    """The declared input range and where it came from."""
    if a.input_range:
        return parse_input_range(a.input_range), "--input-range"
    side = Path(a.input).with_suffix(".json")
    if side.is_file():
        try:
            pre = json.loads(side.read_text()).get("preprocess", {})
        except (OSError, ValueError, AttributeError):
            return None, ""
        r = range_from_preprocess(pre) if isinstance(pre, dict) else None
        if r is not None:
            return r, f"sidecar {side}"
    return None, ""


def _config(a: argparse.Namespace, input_range: tuple[float, float] | None = None) -> Config:
    return Config(
        weight_bits=a.weight_bits,
        act_bits=a.act_bits,
        seed=a.seed,
        samples=a.samples,
        input_shapes=tuple(parse_input_shape(s) for s in a.input_shape),
        input_distribution=InputDistribution(a.input_dist),
        synthesis=Synthesis(a.synthesis),
        weight_scale=WeightScale(a.weight_scale),
        act_range=ActRange(a.act_range),
        bias_correction=BiasCorrection(a.bias_correction),
        quantize_classifier=not a.float_classifier,
        input_range=input_range,
    )


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
    declared, rng_src = _input_range(a)
    config = _config(a, declared)
    t0 = time.perf_counter()
    if rng_src:
        lo, hi = config.input_range or (0.0, 0.0)
        print(f"input range [{lo:.4g}, {hi:.4g}] declared by {rng_src}", file=sys.stderr)

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    model, report = compress(src, config, progress=progress)
    save_atomic(model, dst, external_data=report.external_data)
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
    print(report.summary())
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
    except OnnxlwError as e:
        if getattr(a, "verbose", False):
            raise
        print(f"onnxlw: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxlw: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line unless -v
        if getattr(a, "verbose", False):
            raise
        print(
            f"onnxlw: internal error: {type(e).__name__}: {e}; rerun with -v and report it",
            file=sys.stderr,
        )
        return 1
