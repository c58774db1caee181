"""Pruning sweep on the shared models: accuracy, sparsity, file size and latency per setting.

Usage::

    python tools/prune_sweep.py --out-md prune.md [--shared ../shared]

Each row compresses one shared model with one set of options (in-process, seed 0), then
evaluates the output against its FP32 model with ``onnxlw eval``'s code on the model's
evaluation images (ImageNet sample images: all 1000; CIFAR-10: an even 2000). Latency is the
median of 30 batch-1 runs alternated with the FP32 model, one intra-op thread. Rows are the
baseline (layer-uniform magnitude pruning, bias correction on), then each stage of the method
added: OBS masks without refit, + least-squares refit, + sensitivity allocation, + the
network-aware second solve (the default).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import zlib
from pathlib import Path

from sweeplib import REPO, Bench

from onnxlw import Config

OFF = {"network_aware": "off"}
BASE = {"magnitude uniform": {"prune_method": "magnitude", "prune_allocation": "uniform", **OFF},
        "OBS masks, no refit, uniform": {"prune_allocation": "uniform", "prune_refit": False,
                                         **OFF},
        "OBS + refit, uniform": {"prune_allocation": "uniform", **OFF},
        "OBS + refit + allocation": {**OFF},
        "+ network-aware (default)": {}}

SWEEP: dict[str, list[tuple[str, str, dict]]] = {
    "resnet56_cifar10": [
        *((f"{s}", name, kw) for s in ("0.3", "0.5") for name, kw in BASE.items()),
        ("0.6", "+ network-aware (default)", {}),
        ("0.6", "magnitude uniform", BASE["magnitude uniform"]),
        ("2:4", "magnitude", {"prune_method": "magnitude", **OFF}),
        ("2:4", "OBS + refit", OFF),
        ("2:4", "+ network-aware (default)", {}),
    ],
    "mobilenetv2": [
        *((f"{s}", name, kw) for s in ("0.1", "0.2") for name, kw in BASE.items()),
        ("0.3", "+ network-aware (default)", {}),
        ("2:4", "+ network-aware (default)", {}),
    ],
    "mobilenetv2_bnfolded": [
        ("0.2", "magnitude uniform", BASE["magnitude uniform"]),
        ("0.2", "OBS + refit + allocation", OFF),
        ("0.2", "+ network-aware (default)", {}),
    ],
    "resnet20_cifar10": [
        ("0.5", "magnitude uniform", BASE["magnitude uniform"]),
        ("0.5", "OBS + refit + allocation", OFF),
        ("0.5", "+ network-aware (default)", {}),
    ],
    "resnet20_cifar10_bnfolded": [
        ("0.5", "magnitude uniform", BASE["magnitude uniform"]),
        ("0.5", "OBS + refit + allocation", OFF),
        ("0.5", "+ network-aware (default)", {}),
    ],
}


CHANNEL_SWEEP: dict[str, list[tuple[str, str, dict]]] = {
    "resnet56_cifar10": [("channels:0.2", "channels", {}), ("channels:0.3", "channels", {}),
                         ("channels:0.5", "channels", {})],
    "mobilenetv2": [("channels:0.1", "channels", {}), ("channels:0.2", "channels", {})],
    "resnet20_cifar10": [("channels:0.3", "channels", {})],
}
"""Channel removal rows (``--channels``): latency is the column that matters there."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="shared folder")
    ap.add_argument("--out-md", type=Path, required=True, help="write the Markdown table here")
    ap.add_argument("--models", default=",".join(SWEEP), help="comma-separated model stems")
    ap.add_argument("--quantize", action="store_true", help="also W8A8 (default: FP32 output)")
    ap.add_argument("--channels", action="store_true", help="the channel-removal rows only")
    a = ap.parse_args(argv)
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python tools/prune_sweep.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| model | --prune | method | agree % | Δtop-1 | sparsity | file × | zipped × "
        "| latency × | compress s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sweep = CHANNEL_SWEEP if a.channels else SWEEP
    models = [m for m in a.models.split(",") if m in sweep]
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            bench = Bench(a.shared, model)
            ref_bytes = bench.src.read_bytes()
            for prune, name, kw in sweep[model]:
                row = bench.run(Config(seed=0, prune=prune, quantize=a.quantize, **kw), Path(tmp))
                done = [r for r in row.report.layers if r.skipped is None]
                zeros = sum(r.params * r.stats.get("sparsity", 0.0) for r in done)
                sparsity = zeros / sum(r.params for r in done)
                size = os.path.getsize(row.out) / len(ref_bytes)
                zipped = len(zlib.compress(row.out.read_bytes(), 6)) / len(
                    zlib.compress(ref_bytes, 6))
                lines.append(
                    f"| {model} | {prune} | {name} | {row.agree:.1f} | {row.dtop1:+.1f} "
                    f"| {sparsity:.3f} | {size:.3f} | {zipped:.3f} | {row.latency:.2f} "
                    f"| {row.secs:.1f} |"
                )
                print(lines[-1], flush=True)
    a.out_md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
