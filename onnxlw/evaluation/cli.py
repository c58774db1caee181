"""The ``onnxlw eval REF.onnx CAND.onnx --images DIR`` subcommand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import OnnxlwError
from .evaluate import EvalResult, evaluate
from .preprocess import PRESETS, Preprocess, get_preset, select_preset, sidecar_path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``argparse`` subparsers object; dispatch via ``args.func``."""
    p = subparsers.add_parser(
        "eval",
        help="compare a compressed model with its FP32 reference on real images",
        description=(
            "Top-1/top-5 of both models (when the images are labelled), top-1 agreement, "
            "mean KL(ref || cand), batch-1 latency, integer/float conv counts after "
            "onnxruntime optimization, and file sizes."
        ),
    )
    p.add_argument("ref", metavar="REF.onnx", help="reference (FP32) model")
    p.add_argument("cand", metavar="CAND.onnx", help="candidate (compressed) model")
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR|NPZ",
        help="folder of ImageNet-style files or class folders, or an .npz with x [N,C,H,W], y",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS), help="named preprocessing")
    g.add_argument(
        "--preprocess",
        metavar="FILE",
        help='sidecar JSON (or its "preprocess" dict); default: REF\'s <model>.json',
    )
    p.add_argument("--limit", type=int, metavar="N", help="evaluate an evenly spread N images")
    p.add_argument(
        "--report", "--json", dest="json", metavar="OUT.json",
        help="also write the results as JSON (--json is the old spelling)",
    )
    p.add_argument(
        "--latency-runs", type=int, default=50, metavar="N", help="batch-1 runs (0: skip)"
    )
    p.add_argument("--batch", type=int, default=32, metavar="N", help="batch size for accuracy")
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="intra-op threads (0: ORT default)"
    )
    p.set_defaults(func=run)
    return p


def preprocess_from_args(args: argparse.Namespace) -> Preprocess | None:
    """``--preset``, else ``--preprocess``, else REF's sidecar; ``None`` only for an .npz."""
    if args.preset:
        return get_preset(args.preset)
    if args.preprocess:
        return Preprocess.from_file(args.preprocess)
    pre = select_preset(args.ref)
    if pre is None and Path(args.images).suffix.lower() != ".npz":
        raise OnnxlwError(
            f"no preprocessing for {args.ref} (no sidecar {sidecar_path(args.ref)})",
            f"pass --preset ({'|'.join(sorted(PRESETS))}) or --preprocess FILE",
        )
    return pre


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "ms":
        return f"{v:.3f}"
    if kind == "mib":
        return f"{v / 2**20:.2f}"
    return str(v)


def table(r: EvalResult) -> str:
    """Compact ``metric | ref | cand`` table of a result."""
    rows = [
        ("top-1", _fmt(r.ref_top1, "pct"), _fmt(r.cand_top1, "pct")),
        ("top-5", _fmt(r.ref_top5, "pct"), _fmt(r.cand_top5, "pct")),
        ("top-1 agreement", "", _fmt(r.top1_agreement, "pct")),
        ("mean KL(ref||cand)", "", f"{r.kl_mean:.4g}"),
        ("latency ms (batch 1)", _fmt(r.ref_latency_ms, "ms"), _fmt(r.cand_latency_ms, "ms")),
        ("QLinearConv", str(r.ref_qlinearconv), str(r.cand_qlinearconv)),
        ("float Conv", str(r.ref_conv), str(r.cand_conv)),
        ("size MiB", _fmt(r.ref_bytes, "mib"), _fmt(r.cand_bytes, "mib")),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(3, *(len(b) for _, b, _ in rows))
    w2 = max(4, *(len(c) for _, _, c in rows))
    lines = [
        (
            f"{r.n} images from {r.images} ({r.preprocess}); latency: median of "
            f"{r.latency_runs} runs, threads={r.threads or 'ORT default'}"
        ),
        f"{'metric':<{w0}} | {'ref':>{w1}} | {'cand':>{w2}}",
        f"{'-' * w0}-+-{'-' * w1}-+-{'-' * w2}",
    ]
    lines += [f"{a:<{w0}} | {b:>{w1}} | {c:>{w2}}" for a, b, c in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``onnxlw eval``; prints the table, writes ``--json``; returns 0."""
    for path, what in ((args.ref, "reference"), (args.cand, "candidate")):
        if not Path(path).is_file():
            raise OnnxlwError(f"{what} model {path} not found", "pass an existing .onnx file")
    if args.limit is not None and args.limit <= 0:
        raise OnnxlwError(f"--limit must be positive, got {args.limit}", "pass a positive N")
    if args.latency_runs < 0 or args.batch <= 0 or args.threads < 0:
        raise OnnxlwError(
            "--latency-runs/--threads must be >= 0 and --batch > 0", "fix the option values"
        )
    out = Path(args.json) if args.json else None
    if out is not None and not out.parent.is_dir():
        raise OnnxlwError(f"folder {out.parent} does not exist", "create it or fix --json")
    pre = preprocess_from_args(args)
    result = evaluate(
        args.ref,
        args.cand,
        args.images,
        pre,
        limit=args.limit,
        batch=args.batch,
        latency_runs=args.latency_runs,
        threads=args.threads,
    )
    print(table(result))
    if out is not None:
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0
