"""Low-bit sweep on the shared models: accuracy, file size, fusion and latency per setting.

Usage::

    python tools/lowbit_sweep.py --out-md lowbit.md [--shared ../shared] [--models a,b]

Each row compresses one shared model with one set of options (in-process, seed 0), then
evaluates the output against its FP32 model with ``onnxlw eval``'s code on the model's
evaluation images (ImageNet sample images: all 1000; CIFAR-10: an even 2000). Latency is the
median of 30 batch-1 runs alternated with the FP32 model, one intra-op thread; "fused" counts
QLinearConv against all convs after onnxruntime's optimization. The stages of the method are
added one at a time on the in-run baseline, onnxlw's own round-to-nearest with min/max scales
and no bias correction: + output-MSE scales, + bias correction, + GPTQ rounding (the default),
and mixed precision under a size budget.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from onnxlw import Config, compress  # noqa: E402
from onnxlw.evaluation.evaluate import evaluate, measure_latency  # noqa: E402
from onnxlw.evaluation.preprocess import load_images, select_preset  # noqa: E402
from onnxlw.io import save_atomic  # noqa: E402
from onnxlw.ortutil import fused_conv_counts  # noqa: E402

RTN = {"weight_scale": "minmax", "bias_correction": "none", "rounding": "nearest"}
STAGES = {
    "RTN, min/max scale": RTN,
    "+ MSE scale": {**RTN, "weight_scale": "output-mse"},
    "+ bias correction": {"rounding": "nearest"},
    "+ GPTQ (default)": {},
}


def _rows(bits: list[tuple[str, dict]], stages: dict[str, dict]) -> list[tuple[str, str, dict]]:
    return [(b, s, {**kw, **skw}) for b, kw in bits for s, skw in stages.items()]


W4A8 = ("W4A8", {"weight_bits": 4})
W6A6 = ("W6A6", {"weight_bits": 6, "act_bits": 6})
W5A5 = ("W5A5", {"weight_bits": 5, "act_bits": 5})
W4A4 = ("W4A4", {"weight_bits": 4, "act_bits": 4})
W8A8 = ("W8A8", {})
SHORT = {"+ bias correction": {"rounding": "nearest"}, "+ GPTQ (default)": {}}
BUDGET = [("size 0.15", "mixed precision", {"size_budget": 0.15})]

SWEEP: dict[str, list[tuple[str, str, dict]]] = {
    "mobilenetv2": [
        ("W8A8", "default", {}),
        *_rows([W4A8], STAGES),
        *_rows([W6A6, W5A5, W4A4], SHORT),
        ("W6A8", "default", {"weight_bits": 6}),
        ("W8A6", "default", {"act_bits": 6}),
        *BUDGET,
    ],
    "efficientnet_lite0": [("W8A8", "default", {}), *_rows([W4A8], SHORT),
                           *_rows([W6A6], SHORT), *BUDGET],
    "resnet56_cifar10": [("W8A8", "default", {}), *_rows([W4A8], STAGES),
                         *_rows([W6A6, W4A4], SHORT), *BUDGET],
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
    a = ap.parse_args(argv)
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python tools/lowbit_sweep.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| model | bits | stage | agree % | Δtop-1 | mean w bits | file × | fused | latency × "
        "| compress s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    models = [m for m in a.models.split(",") if m in SWEEP]
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            src = a.shared / "models" / f"{model}.onnx"
            cifar = "cifar" in model
            imgs = a.shared / "data" / ("cifar10-test-jpg" if cifar else "imagenet-sample-images")
            limit = 2000 if cifar else None
            x1, _, _ = load_images(imgs, select_preset(src), 1)
            for bits, stage, kw in SWEEP[model]:
                t0 = time.perf_counter()
                m, rep = compress(src, Config(seed=0, **kw))
                secs = time.perf_counter() - t0
                out = Path(tmp) / f"{model}.onnx"
                save_atomic(m, out)
                e = evaluate(src, out, imgs, None, limit=limit, latency_runs=0)
                lat = measure_latency([src, out], x1[:1], runs=30, threads=1)
                done = [r for r in rep.layers if r.skipped is None]
                wbits = sum(r.params * r.stats.get("bits", 8) for r in done) / sum(
                    r.params for r in done)
                q, f = fused_conv_counts(out)
                lines.append(
                    f"| {model} | {bits} | {stage} | {100 * e.top1_agreement:.1f} "
                    f"| {100 * (e.cand_top1 - e.ref_top1):+.1f} | {wbits:.2f} "
                    f"| {os.path.getsize(out) / os.path.getsize(src):.3f} | {q}/{q + f} "
                    f"| {lat[1] / lat[0]:.2f} | {secs:.1f} |"
                )
                print(lines[-1], flush=True)
    a.out_md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
