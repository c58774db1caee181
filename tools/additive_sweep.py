"""Additive-quantization sweep on the shared models: accuracy, file size, latency, session
start and compress time per setting, against onnxlw's own int4 weights in the same run.

Usage::

    python tools/additive_sweep.py --out-md additive.md [--shared ../shared] [--models a,b]

Each row compresses one shared model with one set of options (in-process, seed 0), then
evaluates the output against its FP32 model with ``onnxlw eval``'s code on the model's
evaluation images (ImageNet sample images: all 1000; CIFAR-10: an even 2000). Latency is the
median of 30 batch-1 runs alternated with the FP32 model, one intra-op thread; session start
is the median of 3 session creations (ORT_ENABLE_ALL: the codebook subgraph is folded then).
"bits" is the mean stored bits per compressible weight (codes with padding and row scales;
8 for layers kept in int8; the int4 rows' widths).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sweeplib import REPO, Bench

from onnxlw import Config
from onnxlw.ortutil import fused_conv_counts, session

FLOAT = {"quantize": False}
INT4 = [
    ("int4 RTN + BC, A8", {"weight_bits": 4, "rounding": "nearest"}),
    ("int4 GPTQ + BC, A8 (W4A8 default)", {"weight_bits": 4}),
]


def additive(bits: float, ablations: bool = False, qdq: bool = False) -> list[tuple[str, dict]]:
    """Rows at ``bits``: shared books with the default objective (the output error with BN
    statistics, the weight error without); with ``ablations`` the plain
    weight objective and per-layer books (16 codewords of dim 4: about the shared file's
    size; 256 codewords of dim 8: the same codes, each layer's books stored); with ``qdq``
    the W8A8 form."""
    rows = [(f"additive {bits:g}, shared, default objective", {"additive": bits, **FLOAT})]
    if ablations:
        rows += [
            (f"additive {bits:g}, shared, weight error",
             {"additive": bits, "additive_objective": "weight", **FLOAT}),
            (f"additive {bits:g}, per-layer books of 16 (≈ equal size)",
             {"additive": bits, "additive_scope": "layer", "additive_code_bits": 4,
              "additive_dim": 4, **FLOAT}),
            (f"additive {bits:g}, per-layer books of 256",
             {"additive": bits, "additive_scope": "layer", **FLOAT}),
        ]
    if qdq:
        rows.append((f"additive {bits:g}, A8 (QDQ)", {"additive": bits}))
    return rows


SWEEP: dict[str, list[tuple[str, dict]]] = {
    "resnet56_cifar10": [*INT4, *additive(2, True, True), *additive(2.2), *additive(3)],
    "mobilenetv2": [*INT4, *additive(3, True), *additive(4, qdq=True)],
    "efficientnet_lite0": [*INT4, *additive(3), *additive(4)],
    "resnet20_cifar10": [*INT4, *additive(2), *additive(3)],
    "mobilenetv2_bnfolded": [INT4[1], *additive(4)],
    "resnet20_cifar10_bnfolded": [INT4[1], *additive(3)],
}


def start_ms(path: Path) -> float:
    """Median session creation time (ms) of 3."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        session(str(path), threads=1, quiet=True)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="shared folder")
    ap.add_argument("--out-md", type=Path, required=True, help="write the Markdown table here")
    ap.add_argument("--models", default=",".join(SWEEP), help="comma-separated model stems")
    ap.add_argument("--rows", default="", help="only rows whose label contains this")
    a = ap.parse_args(argv)
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python tools/additive_sweep.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| model | setting | agree % | Δtop-1 | bits | file × | fused | latency × "
        "| session start ms (FP32) | compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    models = [m for m in a.models.split(",") if m in SWEEP]
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            bench = Bench(a.shared, model)
            ref_start = start_ms(bench.src)
            for label, kw in SWEEP[model]:
                if a.rows not in label:
                    continue
                row = bench.run(Config.from_dict({"seed": 0, **kw}), Path(tmp))
                done = [r for r in row.report.layers if r.skipped is None]
                bits = sum(r.params * r.stats.get("bits_per_weight", r.stats.get("bits", 8))
                           for r in done) / sum(r.params for r in done)
                q, f = fused_conv_counts(row.out)
                lines.append(
                    f"| {model} | {label} | {row.agree:.1f} | {row.dtop1:+.1f} | {bits:.2f} "
                    f"| {os.path.getsize(row.out) / os.path.getsize(bench.src):.3f} "
                    f"| {q}/{q + f} | {row.latency:.2f} | {start_ms(row.out):.0f} "
                    f"({ref_start:.0f}) | {row.secs:.1f} |"
                )
                print(lines[-1], flush=True)
    a.out_md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
