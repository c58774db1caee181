"""End to end on real trained models: the bundled digits CNN, and ../shared's CIFAR ResNet-20.

The shared tests skip with a reason when ../shared is absent; in CI it is present and they run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxlw import Config, compress
from onnxlw.config import range_from_preprocess
from onnxlw.evaluation.evaluate import run_model
from onnxlw.io import save_atomic
from onnxlw.ortutil import fused_conv_counts

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = REPO / "models"


def _agreement(ref: Path, cand: Path, x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    r, q = run_model(ref, x), run_model(cand, x)
    return float(np.mean(r.argmax(1) == q.argmax(1))), r, q


@pytest.mark.parametrize("name", ["digits_cnn", "digits_cnn_bnfolded"])
def test_bundled_digits_model(name: str, tmp_path: Path) -> None:
    """The bundled real model: fully fused, and agrees with FP32 on its held-out test split."""
    data = np.load(MODELS / "digits_test.npz")
    x, y = data["x"], data["y"]
    model, report = compress(MODELS / f"{name}.onnx", Config(seed=0))
    out = tmp_path / "q.onnx"
    save_atomic(model, out)
    assert fused_conv_counts(out) == (6, 0)
    agree, r, q = _agreement(MODELS / f"{name}.onnx", out, x)
    print(
        f"{name}: agreement {agree:.4f}, top-1 fp32 {np.mean(r.argmax(1) == y):.4f} "
        f"int8 {np.mean(q.argmax(1) == y):.4f} on {len(y)} images"
    )
    assert agree >= 0.98
    assert np.mean(q.argmax(1) == y) >= np.mean(r.argmax(1) == y) - 0.02
    assert report.bn_found is (name == "digits_cnn")


needs_shared = pytest.mark.skipif(
    not (SHARED / "models" / "resnet20_cifar10.onnx").is_file()
    or not (SHARED / "data" / "cifar10-test-jpg").is_dir(),
    reason=f"{SHARED} (real models and CIFAR-10 images) is absent",
)


@pytest.fixture(scope="module")
def cifar_1000() -> tuple[np.ndarray, np.ndarray]:
    pytest.importorskip("PIL.Image", reason="Pillow decodes the CIFAR JPEGs")
    from onnxlw.evaluation.preprocess import load_images, select_preset

    pre = select_preset(SHARED / "models" / "resnet20_cifar10.onnx")
    x, y, _ = load_images(SHARED / "data" / "cifar10-test-jpg", pre, limit=1000)
    assert len(x) == 1000
    return x, y


@needs_shared
@pytest.mark.parametrize(
    ("name", "min_agree"),
    [("resnet20_cifar10", 0.97), ("resnet20_cifar10_bnfolded", 0.95)],
)
def test_resnet20_agreement_on_1000_cifar_images(
    name: str, min_agree: float, cifar_1000: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """W8A8 with no data keeps top-1 agreement with FP32 on 1000 real CIFAR-10 test images.

    The BN-folded twin has no BN statistics; its fallback gets a lower bar (measured ~97-98%).
    """
    import json

    src = SHARED / "models" / f"{name}.onnx"
    side = json.loads(src.with_suffix(".json").read_text())["preprocess"]
    model, report = compress(src, Config(seed=0, input_range=range_from_preprocess(side)))
    out = tmp_path / "q.onnx"
    save_atomic(model, out)
    x, y = cifar_1000
    agree, r, q = _agreement(src, out, x)
    top1_fp, top1_q = np.mean(r.argmax(1) == y), np.mean(q.argmax(1) == y)
    print(f"{name}: agreement {agree:.3f}, top-1 {top1_fp:.3f} -> {top1_q:.3f}")
    assert fused_conv_counts(out) == (19, 0)
    assert report.validation is not None and report.validation.qlinear_conv == 19
    assert agree >= min_agree
    assert top1_q >= top1_fp - 0.01
    assert report.bn_found is ("bnfolded" not in name)


@needs_shared
@pytest.mark.parametrize(
    ("prune", "quantize", "min_agree"),
    [("0.5", False, 0.885), ("0.5", True, 0.88), ("2:4", False, 0.79)],  # 0.905, 0.902, 0.817
)
def test_resnet20_pruned_agreement_on_1000_cifar_images(
    prune: str, quantize: bool, min_agree: float, cifar_1000, tmp_path: Path
) -> None:
    """Data-free pruning of a real model, checked on real images; the magnitude baseline is
    measured in the same test and must do worse."""
    src = SHARED / "models" / "resnet20_cifar10.onnx"
    x, y = cifar_1000
    agree = {}
    for method in ("obs", "magnitude"):
        cfg = Config(seed=0, prune=prune, quantize=quantize, prune_method=method,
                     network_aware="on" if method == "obs" else "off")
        model, report = compress(src, cfg)
        out = tmp_path / f"{method}.onnx"
        save_atomic(model, out)
        agree[method], _, _ = _agreement(src, out, x)
        done = [r for r in report.layers if r.skipped is None]
        zeros = sum(r.params * r.stats["sparsity"] for r in done) / sum(r.params for r in done)
        assert zeros == pytest.approx(0.5, abs=0.02)
        if quantize:
            assert fused_conv_counts(out) == (19, 0)
    print(f"resnet20 --prune {prune} quantize={quantize}: agreement {agree}")
    assert agree["obs"] >= min_agree
    assert agree["obs"] > agree["magnitude"] + 0.02


@needs_shared
def test_resnet20_w4a8_on_1000_cifar_images(cifar_1000, tmp_path: Path) -> None:
    """W4A8 of a real model: packed 4-bit weights (a file under 0.2x the FP32 file), every conv
    fused, and GPTQ rounding ahead of round-to-nearest measured in the same test (on 2000
    images: 94.3 % against 91.0 %)."""
    src = SHARED / "models" / "resnet20_cifar10.onnx"
    x, _ = cifar_1000
    agree = {}
    for rounding in ("gptq", "nearest"):
        model, report = compress(src, Config(seed=0, weight_bits=4, rounding=rounding))
        out = tmp_path / f"{rounding}.onnx"
        save_atomic(model, out)
        agree[rounding], _, _ = _agreement(src, out, x)
        assert fused_conv_counts(out) == (19, 0)
        assert out.stat().st_size < 0.2 * src.stat().st_size
        assert all(r.stats["bits"] == 4 for r in report.layers if r.skipped is None)
    print(f"resnet20 W4A8: agreement {agree}")
    assert agree["gptq"] >= 0.92
    assert agree["gptq"] > agree["nearest"] + 0.01


@needs_shared
def test_resnet20_additive_on_1000_cifar_images(cifar_1000, tmp_path: Path) -> None:
    """Additive codes with shared codebooks on a real model: 3 code bits per weight, a file
    under 0.15x the FP32 file, float speed (no QLinearConv: activations stay float), and the
    output-aware fit ahead of the plain weight-error fit measured in the same test."""
    src = SHARED / "models" / "resnet20_cifar10.onnx"
    x, _ = cifar_1000
    agree = {}
    for objective in ("output", "weight"):
        model, report = compress(src, Config(seed=0, additive=3, quantize=False,
                                             additive_objective=objective))
        out = tmp_path / f"{objective}.onnx"
        save_atomic(model, out)
        agree[objective], _, _ = _agreement(src, out, x)
        assert out.stat().st_size < 0.15 * src.stat().st_size
        assert report.codebook_storage["codebooks"] == 1
    print(f"resnet20 --additive 3: agreement {agree}")
    assert agree["output"] >= 0.92
    assert agree["output"] > agree["weight"] + 0.02
