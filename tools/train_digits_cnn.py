"""Train the small bundled digits CNN and export it to ONNX (tool, not runtime).

This script reproducibly builds the real trained test model that ships in
``models/``. It is a *tool*: it needs PyTorch and scikit-learn, which are never
runtime dependencies of onnxlw. Install them in a separate environment::

    python -m venv /work/venv-tools
    /work/venv-tools/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    /work/venv-tools/bin/python tools/train_digits_cnn.py

(``onnxruntime`` is used only for the export self-check; ``--skip-ort`` turns
that check off when it is not installed.)

What it does:

* loads scikit-learn's ``load_digits()`` (1797 8x8 grayscale images, 10 classes,
  shipped inside the scikit-learn package, no download), splits it 80/20 with
  ``train_test_split(test_size=0.2, stratify=y, random_state=0)``;
* preprocesses: ``x / 16`` -> bilinear upsample 8x8 -> 16x16
  (``align_corners=False``) -> ``(x - mean) / std`` with the scalar mean/std of
  the training split (after upsampling);
* trains a small CNN that keeps its BatchNormalization layers (conv stem,
  residual block, depthwise conv + ReLU6, stride-2 conv, 1x1 conv, global
  average pool, linear) deterministically on CPU;
* writes into ``models/`` (or ``--out-dir``):

  - ``digits_cnn.onnx``: BN kept (``TrainingMode.PRESERVE``, no constant
    folding), BatchNormalization nodes with ``training_mode=0``;
  - ``digits_cnn_bnfolded.onnx``: ``TrainingMode.EVAL`` with constant folding,
    which folds every BN into the preceding conv (0 BatchNormalization nodes);
  - ``digits_cnn.json``: sidecar with the preprocessing and accuracies;
  - ``digits_test.npz``: the held-out test split, already preprocessed
    (``x`` float32 [N,1,16,16], ``y`` int64 [N]).

Both ONNX files are checked with ``onnx.checker.check_model(full_check=True)``
and compared against the torch model under onnxruntime (max abs diff <= 1e-4,
identical top-1 on the test split).

The export uses the legacy TorchScript exporter (``dynamo=False``), which is
still present in torch 2.13 (it emits a DeprecationWarning, silenced here).

Determinism: with the same torch build and the same ``--threads`` (default 1)
every output file is byte-identical from run to run (the npz is written with
fixed zip timestamps). A different thread count changes the floating-point
reduction order, hence the trained weights and the files.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as nnf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "models"

SIZE = 16
NUM_CLASSES = 10
SPLIT_DESC = "sklearn train_test_split(test_size=0.2, stratify=y, random_state=0)"
PREPROCESS_NOTE = (
    "sklearn load_digits: x/16, bilinear upsample 8->16 (align_corners=False), (x-mean)/std"
)
ORT_ATOL = 1e-4


# --------------------------------------------------------------------------- data


def upsample(x8: np.ndarray) -> np.ndarray:
    """Scale raw digits rows ([N,64], 0..16) to [0,1], upsample to [N,1,16,16]."""
    t = torch.from_numpy((x8.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8))
    up = nnf.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return up.numpy().astype(np.float32)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Return (x_train, y_train, x_test, y_test, mean, std); x is [N,1,16,16]."""
    digits = load_digits()
    x_all = np.asarray(digits.data, dtype=np.float64)
    y_all = np.asarray(digits.target, dtype=np.int64)
    x_tr8, x_te8, y_tr, y_te = train_test_split(
        x_all, y_all, test_size=0.2, stratify=y_all, random_state=0
    )
    x_tr = upsample(x_tr8)
    x_te = upsample(x_te8)
    # Scalar stats of the training split, rounded to float32 so that the JSON value
    # reproduces the stored arrays exactly.
    mean = float(np.float32(x_tr.astype(np.float64).mean()))
    std = float(np.float32(x_tr.astype(np.float64).std()))
    x_tr = ((x_tr - np.float32(mean)) / np.float32(std)).astype(np.float32)
    x_te = ((x_te - np.float32(mean)) / np.float32(std)).astype(np.float32)
    return x_tr, np.asarray(y_tr), x_te, np.asarray(y_te), mean, std


def random_shift(
    x: torch.Tensor, fill: float, gen: torch.Generator, max_shift: int = 1
) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (background = ``fill``)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = nnf.pad(x, (p, p, p, p), value=fill)
    offs = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


# -------------------------------------------------------------------------- model


def conv_bn(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
) -> list[nn.Module]:
    """Conv2d ('same' padding for stride 1) followed by BatchNorm2d."""
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]


class ResidualBlock(nn.Module):
    """Conv+BN+ReLU, Conv+BN, Add(identity), ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c, c), nn.ReLU(), *conv_bn(c, c))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + x)


class DigitsCNN(nn.Module):
    """Small CNN for 16x16 digits that exercises the compression pipeline.

    stem:   Conv3x3(1->16) + BN + ReLU                         16x16
    res:    [Conv3x3(16->16)+BN+ReLU, Conv3x3(16->16)+BN] + x, ReLU
    dw:     depthwise Conv3x3(16, groups=16) + BN + ReLU6      16x16
    down:   Conv3x3(16->32, stride 2, with bias) + BN + ReLU   8x8
    pw:     Conv1x1(32->64) + BN + ReLU                        8x8
    head:   AdaptiveAvgPool2d(1) -> Flatten -> Linear(64->10)
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU())
        self.res = ResidualBlock(16)
        self.dw = nn.Sequential(*conv_bn(16, 16, groups=16), nn.ReLU6())
        self.down = nn.Sequential(*conv_bn(16, 32, stride=2, bias=True), nn.ReLU())
        self.pw = nn.Sequential(*conv_bn(32, 64, k=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.down(self.dw(self.res(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


# ----------------------------------------------------------------------- training


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` in eval mode on normalized inputs."""
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def train(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    fill: float,
    epochs: int,
    seed: int,
    augment: bool,
    log: bool = True,
) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    n = xt.shape[0]
    batch = 64
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            xb = xt[idx]
            if augment:
                xb = random_shift(xb, fill, gen)
            loss = nnf.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        sched.step()
        if log and (epoch % 10 == 9 or epoch == epochs - 1):
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / n:.4f}")
    return model.eval()


# ------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, path: Path, keep_bn: bool) -> None:
    """Export with the legacy TorchScript exporter; ``keep_bn`` keeps BN nodes."""
    dummy = torch.zeros(1, 1, SIZE, SIZE)
    training = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (dummy,),
            str(path),
            dynamo=False,
            training=training,
            do_constant_folding=not keep_bn,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def check_onnx(
    path: Path,
    expect_bn: int | None,
    ref_logits: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    skip_ort: bool,
) -> dict[str, Any]:
    """Validate one exported file; return a report (op counts, diff, accuracy)."""
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    counts = op_counts(m)
    bn_nodes = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    if expect_bn is None:
        if not bn_nodes:
            raise SystemExit(f"{path.name}: expected BatchNormalization nodes, found none")
        for n in bn_nodes:
            modes = [
                onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "training_mode"
            ]
            if modes and modes[0] != 0:
                raise SystemExit(f"{path.name}: {n.name} has training_mode={modes[0]}")
    elif len(bn_nodes) != expect_bn:
        raise SystemExit(
            f"{path.name}: expected {expect_bn} BatchNormalization nodes, found {len(bn_nodes)}"
        )
    report: dict[str, Any] = {"ops": counts, "bytes": path.stat().st_size}
    if skip_ort:
        return report
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x_te})[0]
    diff = float(np.abs(got - ref_logits).max())
    acc = accuracy(got, y_te)
    if diff > ORT_ATOL:
        raise SystemExit(f"{path.name}: onnxruntime vs torch max abs diff {diff:.3g} > {ORT_ATOL}")
    if not np.array_equal(got.argmax(axis=1), ref_logits.argmax(axis=1)):
        raise SystemExit(f"{path.name}: onnxruntime top-1 differs from torch")
    report.update({"ort_max_abs_diff": diff, "ort_test_accuracy": acc})
    return report


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="output folder (default: models/)",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="disable the +-1 pixel random shift")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (keep fixed for determinism)",
    )
    p.add_argument("--skip-ort", action="store_true", help="skip the onnxruntime comparison")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    x_tr, y_tr, x_te, y_te, mean, std = load_data()
    fill = (0.0 - mean) / std  # normalized value of a blank pixel
    print(f"train {x_tr.shape} test {x_te.shape}  mean {mean:.6f} std {std:.6f}")

    model = train(x_tr, y_tr, fill, args.epochs, args.seed, augment=not args.no_augment)
    tr_logits = predict(model, x_tr)
    te_logits = predict(model, x_te)
    train_acc = accuracy(tr_logits, y_tr)
    test_acc = accuracy(te_logits, y_te)
    print(f"torch train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    bn_path = out / "digits_cnn.onnx"
    folded_path = out / "digits_cnn_bnfolded.onnx"
    export_onnx(model, bn_path, keep_bn=True)
    export_onnx(model, folded_path, keep_bn=False)

    for path, expect_bn in ((bn_path, None), (folded_path, 0)):
        rep = check_onnx(path, expect_bn, te_logits, x_te, y_te, args.skip_ort)
        print(f"{path.name}: {json.dumps(rep)}")
        if "ort_test_accuracy" in rep and rep["ort_test_accuracy"] != test_acc:
            raise SystemExit(
                f"{path.name}: onnxruntime accuracy {rep['ort_test_accuracy']} != torch {test_acc}"
            )

    sidecar = {
        "file": bn_path.name,
        "preprocess": {
            "kind": "digits",
            "size": SIZE,
            "mean": mean,
            "std": std,
            "layout": "NCHW",
            "note": PREPROCESS_NOTE,
        },
        "num_classes": NUM_CLASSES,
        "input": [None, 1, SIZE, SIZE],
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "split": SPLIT_DESC,
        "source": "tools/train_digits_cnn.py",
    }
    (out / "digits_cnn.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    save_npz_deterministic(
        out / "digits_test.npz", x=x_te.astype(np.float32), y=y_te.astype(np.int64)
    )
    for name in (
        "digits_cnn.onnx",
        "digits_cnn_bnfolded.onnx",
        "digits_cnn.json",
        "digits_test.npz",
    ):
        print(f"wrote {out / name} ({(out / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
