"""Tests of onnxlw.evaluation: preprocessing, label derivation, metrics, the eval subcommand."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from onnxlw.errors import OnnxlwError
from onnxlw.evaluation import PRESETS, Preprocess, evaluate, load_images, metrics, select_preset
from onnxlw.evaluation import cli as eval_cli
from onnxlw.evaluation.preprocess import (
    center_crop_box,
    list_images,
    spread_indices,
    tf_center_crop_box,
    torchvision_resize_size,
)

Image = pytest.importorskip("PIL.Image")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)


def _solid(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Preprocess construction


def test_from_sidecar_accepts_whole_sidecar_or_preprocess_dict(tmp_path: Path) -> None:
    pre = {
        "kind": "resize_center_crop",
        "resize": 256,
        "crop": 224,
        "interpolation": "bilinear",
        "mean255": [123.675, 116.28, 103.53],
        "std255": [58.395, 57.120000000000005, 57.375],
        "note": "ignored",
    }
    a = Preprocess.from_sidecar(pre)
    b = Preprocess.from_sidecar({"file": "m.onnx", "preprocess": pre})
    assert a == b == PRESETS["imagenet"]
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": pre}))
    (tmp_path / "p.json").write_text(json.dumps(pre))
    assert Preprocess.from_file(tmp_path / "m.json") == a
    assert Preprocess.from_file(tmp_path / "p.json") == a
    assert Preprocess.from_sidecar(a.to_dict()) == a
    c = Preprocess.from_sidecar({"kind": "resize", "size": 8, "mean": 0.5, "std": [0.25]})
    assert c.mean255 == (127.5,) and c.std255 == (63.75,)
    assert select_preset(tmp_path / "m.onnx") == a
    assert select_preset(tmp_path / "other.onnx") is None


def test_bad_preprocess_raises_onnxlw_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxlwError):
        Preprocess.from_sidecar({"kind": "warp"})
    with pytest.raises(OnnxlwError):
        Preprocess.from_sidecar({"kind": "resize"})  # no size
    with pytest.raises(OnnxlwError):
        Preprocess.from_file(tmp_path / "missing.json")


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"{SHARED}/models not present")
def test_presets_match_shared_sidecars() -> None:
    models = SHARED / "models"
    assert select_preset(models / "mobilenetv2.onnx") == PRESETS["imagenet"]
    assert select_preset(models / "efficientnet_lite0.onnx") == PRESETS["efficientnet-lite"]
    assert select_preset(models / "resnet20_cifar10.onnx") == PRESETS["cifar10"]


def test_bundled_digits_npz() -> None:
    models = Path(__file__).resolve().parents[1] / "models"
    if not (models / "digits_cnn.json").is_file() or not (models / "digits_test.npz").is_file():
        pytest.skip(f"bundled digits model/data not in {models}")
    pre = select_preset(models / "digits_cnn.onnx")
    assert pre == PRESETS["digits"] and pre.is_identity
    x, y, _ = load_images(models / "digits_test.npz", pre, limit=20)
    assert x.shape == (20, 1, 16, 16) and y is not None and y.shape == (20,)


# ---------------------------------------------------------------------------------------------
# geometry and values


def test_torchvision_geometry() -> None:
    assert torchvision_resize_size(500, 375, 256) == (341, 256)
    assert torchvision_resize_size(375, 500, 256) == (256, 341)
    # torchvision: round((341 - 224) / 2) = round(58.5) = 58 (banker's rounding)
    assert center_crop_box(341, 256, 224) == (58, 16, 282, 240)
    # TF: side int(224/256*375) = 328, offsets (dim - side + 1) // 2
    assert tf_center_crop_box(500, 375, 224, 32) == (86, 24, 414, 352)


def test_resize_kind_values_by_hand(tmp_path: Path) -> None:
    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    _png(tmp_path / "img" / "n00000001_a.png", rgb)
    p = Preprocess(kind="resize", size=4, mean255=(10.0, 20.0, 30.0), std255=(2.0, 4.0, 8.0))
    x, labels, names = load_images(tmp_path / "img", p)
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32
    mean = np.array([10.0, 20.0, 30.0]) / 255
    std = np.array([2.0, 4.0, 8.0]) / 255
    want = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(x[0], want, rtol=1e-5, atol=1e-4)
    assert names == ["n00000001_a.png"] and labels is not None and labels.tolist() == [0]


def test_center_crop_takes_the_middle(tmp_path: Path) -> None:
    # 6x8 (h x w) image; the short side equals ``resize`` so only the crop acts
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[1:5, 2:6] = 200  # the centered 4x4 block
    _png(tmp_path / "c" / "a.png", rgb)
    p = Preprocess(kind="resize_center_crop", size=4, resize=6)
    x, labels, _ = load_images(tmp_path / "c", p)
    assert labels is None  # no wnid prefix: unlabeled
    assert x.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(x[0], 200 / 255, rtol=1e-6)  # a shifted crop would see zeros


def test_imagenet_and_efficientnet_output_shapes(tmp_path: Path) -> None:
    _png(tmp_path / "i" / "n01440764_x.JPEG", _solid(300, 400, 127))
    for name in ("imagenet", "efficientnet-lite"):
        x, _, _ = load_images(tmp_path / "i", PRESETS[name])
        assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    x, _, _ = load_images(tmp_path / "i", PRESETS["efficientnet-lite"])
    np.testing.assert_allclose(x, 0.0, atol=1e-6)  # (127 - 127) / 128


# ---------------------------------------------------------------------------------------------
# labels and subsets


def test_imagenet_labels_use_all_wnids_even_with_limit(tmp_path: Path) -> None:
    wnids = ["n03000000", "n01000000", "n02000000", "n04000000"]
    for i, w in enumerate(wnids):
        _png(tmp_path / "f" / f"{w}_c{i}.JPEG", _solid(8, 8, 10 * i))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not all 1000 wnids present"
        files, labels = list_images(tmp_path / "f")
        assert [f.name[:9] for f in files] == sorted(wnids)
        assert labels is not None and labels.tolist() == [0, 1, 2, 3]
        _, y, names = load_images(tmp_path / "f", PRESETS["cifar10"], limit=2)
    assert y is not None and y.tolist() == [0, 2]  # labels from the whole folder
    assert names == ["n01000000_c1.JPEG", "n03000000_c0.JPEG"]


def test_cifar_folder_labels_follow_standard_order(tmp_path: Path) -> None:
    for cls in ("truck", "airplane", "cat"):
        for j in range(2):
            _png(tmp_path / "c" / cls / f"{j:04d}.png", _solid(32, 32, j))
    x, y, names = load_images(tmp_path / "c", PRESETS["cifar10"])
    assert x.shape == (6, 3, 32, 32)
    assert y is not None and y.tolist() == [0, 0, 3, 3, 9, 9]
    assert names[0] == "airplane/0000.png"
    # non-CIFAR folder names: sorted order
    for cls in ("zebra", "ant"):
        _png(tmp_path / "o" / cls / "a.png", _solid(32, 32, 0))
    _, y2, _ = load_images(tmp_path / "o", PRESETS["cifar10"])
    assert y2 is not None and y2.tolist() == [0, 1]


def test_limit_spreads_over_classes() -> None:
    idx = spread_indices(1000, 10)
    assert idx.tolist() == list(range(0, 1000, 100))
    assert spread_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    assert spread_indices(5, 50).tolist() == [0, 1, 2, 3, 4]


def test_npz_source_is_used_as_is(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((10, 1, 16, 16)).astype(np.float32)
    ys = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=xs, y=ys)
    x, y, names = load_images(tmp_path / "d.npz", PRESETS["digits"], limit=5)
    np.testing.assert_array_equal(x, xs[::2])
    assert y is not None and y.tolist() == ys[::2].tolist() and names[1] == "d.npz[2]"


def test_missing_or_empty_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(OnnxlwError, match="not found"):
        load_images(tmp_path / "nope", PRESETS["cifar10"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxlwError, match="no images"):
        load_images(tmp_path / "empty", PRESETS["cifar10"])
    _png(tmp_path / "one" / "a.png", _solid(4, 4, 0))
    with pytest.raises(OnnxlwError, match="npz"):
        load_images(tmp_path / "one", PRESETS["digits"])


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_identical_and_permuted_logits() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((64, 10)).astype(np.float32) * 3
    labels = logits.argmax(axis=1)
    m = metrics(logits, logits.copy(), labels)
    assert m["top1_agreement"] == 1.0 and m["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["ref_top1"] == m["cand_top1"] == 1.0
    perm = logits[:, rng.permutation(10)]
    m2 = metrics(logits, perm, labels)
    assert m2["top1_agreement"] < 1.0 and m2["kl_mean"] > 0.0
    assert m2["cand_top5"] >= m2["cand_top1"]
    assert metrics(logits, perm, None)["ref_top1"] is None


def test_kl_is_stable_for_huge_logits() -> None:
    a = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    b = np.array([[999.0, 0.0, -1000.0]], np.float32)
    m = metrics(a, b, None)
    assert np.isfinite(m["kl_mean"]) and m["kl_mean"] >= 0.0


# ---------------------------------------------------------------------------------------------
# on the real shared data


@pytest.mark.skipif(
    not (SHARED / "models" / "resnet20_cifar10.onnx").is_file()
    or not (SHARED / "data" / "cifar10-test-jpg").is_dir(),
    reason=f"shared models/data not found at {SHARED}",
)
def test_resnet20_against_itself_on_shared_cifar(tmp_path: Path) -> None:
    model = SHARED / "models" / "resnet20_cifar10.onnx"
    images = SHARED / "data" / "cifar10-test-jpg"
    r = evaluate(model, model, images, None, limit=64, latency_runs=3)
    assert r.n == 64 and r.top1_agreement == 1.0
    assert r.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert r.ref_top1 == r.cand_top1 and r.ref_top1 is not None and r.ref_top1 > 0.5
    assert r.ref_conv == 19 and r.cand_qlinearconv == 0
    assert r.ref_latency_ms is not None and r.ref_latency_ms > 0

    ap = argparse.ArgumentParser()
    eval_cli.add_parser(ap.add_subparsers())
    out = tmp_path / "r.json"
    argv = ["eval", str(model), str(model), "--images", str(images), "--limit", "16"]
    args = ap.parse_args([*argv, "--latency-runs", "0", "--json", str(out)])
    assert args.func(args) == 0
    d = json.loads(out.read_text())
    assert d["n"] == 16 and d["top1_agreement"] == 1.0 and d["ref_latency_ms"] is None
