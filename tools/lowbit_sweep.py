"""Low-bit sweep on the shared models: accuracy, file size, fusion and latency per setting.

Usage::

    python tools/lowbit_sweep.py --out-md lowbit.md [--shared ../shared] [--models a,b]

Each row compresses one shared model with one set of options (in-process, seed 0, or each
of ``--seeds``: then accuracy, KL and file size are the mean [lowest, highest] over the seeds
and the other columns the last seed's), then
evaluates the output against its FP32 model with ``onnxlw eval``'s code on the model's
evaluation images (ImageNet sample images: all 1000; CIFAR-10: an even 2000). Latency is the
median of 30 batch-1 runs alternated with the FP32 model, one intra-op thread; "fused" counts
QLinearConv against all convs after onnxruntime's optimization. The stages of the method are
added one at a time on the in-run baseline, onnxlw's own round-to-nearest with min/max scales
and no bias correction: + output-MSE scales, + bias correction, + cross-layer equalization,
+ GPTQ rounding (the default below 8 bits), + high-bias absorption (an option), and mixed
precision under a size budget. "+ GPTQ, no equalization" is the default without equalization;
at W8A8 "+ equalization" turns on what is off there by default; below 8-bit activations,
"input at A bits" puts the graph input on the activations' grid too (by default it keeps 8
bits). A row listed twice runs once. "KL" is the mean KL(FP32 || compressed) of the softmax
outputs over the images, a steadier figure than the agreement for close rows.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

from sweeplib import REPO, Bench

from onnxlw import Config
from onnxlw.ortutil import fused_conv_counts

RTN = {"weight_scale": "minmax", "bias_correction": "none", "rounding": "nearest",
       "equalize": "off"}
BC = {"rounding": "nearest", "equalize": "off"}
STAGES = {
    "RTN, min/max scale": RTN,
    "+ MSE scale": {**RTN, "weight_scale": "output-mse"},
    "+ bias correction": BC,
    "+ equalization": {"rounding": "nearest"},
    "+ GPTQ (default)": {},
    "+ bias absorption": {"absorb_bias": True},
}


def _rows(bits: list[tuple[str, dict]], stages: dict[str, dict]) -> list[tuple[str, str, dict]]:
    return [(b, s, {**kw, **skw}) for b, kw in bits for s, skw in stages.items()]


W4A8 = ("W4A8", {"weight_bits": 4})
W6A6 = ("W6A6", {"weight_bits": 6, "act_bits": 6})
W5A5 = ("W5A5", {"weight_bits": 5, "act_bits": 5})
W4A4 = ("W4A4", {"weight_bits": 4, "act_bits": 4})
W8A8 = ("W8A8", {})
SHORT = {
    "+ bias correction": BC,
    "+ GPTQ, no equalization": {"equalize": "off"},
    "+ GPTQ (default)": {},
}


def input_too(bits: list[tuple[str, dict]]) -> list[tuple[str, str, dict]]:
    """The default with the graph input on the activations' grid as well."""
    return [(b, f"default, input at {kw['act_bits']} bits", {**kw, "input_bits": kw["act_bits"]})
            for b, kw in bits]


PRECOND8 = {"default": {}, "+ equalization": {"equalize": "on"}}
BUDGET = [("size 0.15", "mixed precision", {"size_budget": 0.15})]

SWEEP: dict[str, list[tuple[str, str, dict]]] = {
    "mobilenetv2": [
        *_rows([W8A8], PRECOND8),
        *_rows([W4A8], STAGES),
        *_rows([W6A6, W5A5, W4A4], SHORT),
        *input_too([W6A6, W5A5, W4A4]),
        ("W6A8", "default", {"weight_bits": 6}),
        ("W8A6", "default", {"act_bits": 6}),
        *BUDGET,
    ],
    "efficientnet_lite0": [*_rows([W8A8], PRECOND8), *_rows([W4A8], SHORT),
                           *_rows([W6A6], SHORT), *input_too([W6A6]), *BUDGET],
    "resnet56_cifar10": [("W8A8", "default", {}), *_rows([W4A8], STAGES),
                         *_rows([W6A6, W4A4], SHORT), *input_too([W6A6]), *BUDGET],
    "resnet20_cifar10": [*_rows([W4A8], SHORT), ("W3A8", "default", {"weight_bits": 3}),
                         *BUDGET],
    "mobilenetv2_bnfolded": [*_rows([W4A8], SHORT), *BUDGET],
    "resnet20_cifar10_bnfolded": [*_rows([W4A8], SHORT)],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="shared folder")
    ap.add_argument("--out-md", type=Path, required=True, help="write the Markdown table here")
    ap.add_argument("--models", default=",".join(SWEEP), help="comma-separated model stems")
    ap.add_argument("--stages", default="", help="comma-separated substrings: only the rows "
                    "whose stage contains one (default: every row)")
    ap.add_argument("--bits", default="", help="comma-separated bit labels (W4A8, size 0.15, "
                    "...): only those rows (default: every row)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; with several, each "
                    "row shows the mean and, in brackets, the lowest and highest")
    a = ap.parse_args(argv)
    seeds = [int(x) for x in a.seeds.split(",")]
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python tools/lowbit_sweep.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| model | bits | stage | agree % | Δtop-1 | KL | mean w bits | file × | fused "
        "| latency × | compress s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    models = [m for m in a.models.split(",") if m in SWEEP]
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            bench = Bench(a.shared, model)
            rows = dict.fromkeys((b, s_, tuple(sorted(kw.items()))) for b, s_, kw in SWEEP[model])
            for bits, stage, kw_items in rows:
                kw = dict(kw_items)
                if a.stages and not any(x in stage for x in a.stages.split(",")):
                    continue
                if a.bits and bits not in a.bits.split(","):
                    continue
                runs, files = [], []
                for s in seeds:  # the output file is overwritten by the next seed's
                    runs.append(bench.run(Config.from_dict({**kw, "seed": s}), Path(tmp)))
                    files.append(os.path.getsize(runs[-1].out) / os.path.getsize(bench.src))
                row = runs[-1]
                done = [r for r in row.report.layers if r.skipped is None]
                wbits = sum(r.params * r.stats.get("bits", 8) for r in done) / sum(
                    r.params for r in done)
                q, f = fused_conv_counts(row.out)
                lines.append(
                    f"| {model} | {bits} | {stage} | {_spread([r.agree for r in runs], '.1f')} "
                    f"| {_spread([r.dtop1 for r in runs], '+.1f')} "
                    f"| {_spread([r.kl for r in runs], '.4f')} | {wbits:.2f} "
                    f"| {_spread(files, '.3f')} | {q}/{q + f} | {row.latency:.2f} "
                    f"| {row.secs:.1f} |"
                )
                print(lines[-1], flush=True)
    a.out_md.write_text("\n".join(lines) + "\n")
    return 0


def _spread(v: list[float], fmt: str) -> str:
    """One value, or the mean with [lowest, highest] of several seeds."""
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(sum(v) / len(v), fmt)} [{format(min(v), fmt)}, {format(max(v), fmt)}]"


if __name__ == "__main__":
    raise SystemExit(main())
