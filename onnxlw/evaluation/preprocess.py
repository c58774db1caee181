"""Image preprocessing described by a model's sidecar JSON, and loading of labelled image sets.

Every function returns float32 arrays in NCHW layout: ``x`` is ``[N, C, H, W]``.

Preprocessing kinds (the ``kind`` field of a sidecar's ``"preprocess"`` dict):

- ``resize_center_crop``: torchvision's eval transform. Resize the short side to ``resize``
  (PIL resize with the sidecar's interpolation, as torchvision does for PIL images), center-crop
  ``crop``, scale to [0, 1], normalize with ``mean255 / 255`` and ``std255 / 255``.
- ``tf_center_crop``: EfficientNet-Lite. Center crop of ``int(size / (size + crop_padding) *
  min(h, w))`` pixels at offset ``(h - c + 1) // 2`` (TF's integer arithmetic), resize to
  ``size`` with the sidecar's interpolation, then ``(x - mean255) / std255``.
- ``resize``: resize to ``size`` x ``size`` (a no-op for 32x32 CIFAR images), then normalize.
- ``identity`` / ``digits``: the source already holds preprocessed arrays (an ``.npz``).

Image sources accepted by :func:`load_images`:

- a folder of ImageNet-style files ``n01440764_tench.JPEG``: the label is the position of the
  ``n########`` prefix among the sorted distinct wnids of *all* files in the folder;
- a folder of class folders (CIFAR style): the label is the index of the folder name in the
  standard CIFAR-10 order when every folder is a CIFAR-10 class, else in sorted order;
- an ``.npz`` file with ``x`` ``[N, C, H, W]`` float32 (already preprocessed) and optional
  ``y`` ``[N]`` int labels.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OnnxlwError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".tif", ".tiff"}
)
KINDS = ("resize_center_crop", "tf_center_crop", "resize", "identity", "digits")
_IDENTITY_KINDS = ("identity", "digits")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_WNID = re.compile(r"^(n\d{8})")


@dataclass(frozen=True)
class Preprocess:
    """How to turn a decoded image into a model input.

    ``size`` is the output height and width; ``resize`` is the short-side length of the first
    resize (``resize_center_crop`` only); ``crop_padding`` is EfficientNet's crop padding
    (``tf_center_crop`` only). ``mean255`` / ``std255`` are per-channel in 0..255 units.
    """

    kind: str
    size: int | None = None
    resize: int | None = None
    crop_padding: int = 32
    interpolation: str = "bilinear"
    mean255: tuple[float, ...] = (0.0, 0.0, 0.0)
    std255: tuple[float, ...] = (255.0, 255.0, 255.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OnnxlwError(
                f"unknown preprocess kind {self.kind!r}",
                f'use one of {", ".join(KINDS)} in the sidecar\'s "preprocess" dict',
            )
        if self.kind not in _IDENTITY_KINDS and not self.size:
            raise OnnxlwError(
                f"preprocess kind {self.kind!r} needs an output size",
                'add "size" (or "crop" for resize_center_crop) to the "preprocess" dict',
            )
        if self.kind == "resize_center_crop" and not self.resize:
            raise OnnxlwError(
                "preprocess kind 'resize_center_crop' needs a short-side length",
                'add "resize" (e.g. 256) to the "preprocess" dict',
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise OnnxlwError(
                f"unknown interpolation {self.interpolation!r}",
                f"use one of {', '.join(_INTERPOLATIONS)}",
            )
        if self.channel_order not in ("RGB", "BGR"):
            raise OnnxlwError(f"unknown channel_order {self.channel_order!r}", "use RGB or BGR")
        if self.layout not in ("NCHW", "NHWC"):
            raise OnnxlwError(f"unknown layout {self.layout!r}", "use NCHW or NHWC")
        if len(self.mean255) != len(self.std255) or any(s == 0 for s in self.std255):
            raise OnnxlwError(
                "mean255/std255 must have equal lengths and non-zero std",
                'fix the "preprocess" dict',
            )

    @property
    def is_identity(self) -> bool:
        """True when the source must already hold preprocessed arrays."""
        return self.kind in _IDENTITY_KINDS

    @classmethod
    def from_sidecar(cls, d: dict[str, Any]) -> Preprocess:
        """Build from a sidecar dict: either the whole sidecar or its ``"preprocess"`` value.

        Unknown keys (``note``, ``dataset``, ...) are ignored.
        """
        if not isinstance(d, dict):
            raise OnnxlwError("preprocess description is not a JSON object", "fix the sidecar")
        if "preprocess" in d and isinstance(d["preprocess"], dict):
            d = d["preprocess"]
        if "kind" not in d:
            raise OnnxlwError(
                'preprocess dict has no "kind"',
                f'add "kind": one of {", ".join(KINDS)}',
            )
        kind = str(d["kind"])
        size = d.get("crop") if kind == "resize_center_crop" else d.get("size")
        if size is None and kind == "resize_center_crop":
            size = d.get("size")
        kw: dict[str, Any] = {"kind": kind, "size": None if size is None else int(size)}
        if d.get("resize") is not None:
            kw["resize"] = int(d["resize"])
        if d.get("crop_padding") is not None:
            kw["crop_padding"] = int(d["crop_padding"])
        for key in ("interpolation", "channel_order", "layout"):
            if d.get(key) is not None:
                kw[key] = str(d[key])
        if kind not in _IDENTITY_KINDS:  # identity: the arrays are already normalized
            for key in ("mean", "std"):  # 0..1 units, scalar or per channel
                if d.get(key) is not None and d.get(key + "255") is None:
                    kw[key + "255"] = tuple(255.0 * v for v in _floats(d[key]))
            for key in ("mean255", "std255"):
                if d.get(key) is not None:
                    kw[key] = _floats(d[key])
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> Preprocess:
        """Read a JSON file holding a whole sidecar or just its ``"preprocess"`` dict."""
        p = Path(path)
        if not p.is_file():
            raise OnnxlwError(f"preprocess file {p} not found", "pass an existing sidecar JSON")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OnnxlwError(f"{p} is not valid JSON ({e})", "fix or regenerate the file") from e
        return cls.from_sidecar(d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_sidecar`)."""
        d = dataclasses.asdict(self)
        d["mean255"] = list(self.mean255)
        d["std255"] = list(self.std255)
        if self.kind == "resize_center_crop":
            d["crop"] = d.pop("size")
        return d


# torchvision's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) times 255, bit-exact with the
# sidecars' mean255/std255
def _floats(v: Any) -> tuple[float, ...]:
    return tuple(float(a) for a in (v if isinstance(v, list | tuple) else [v]))


_IMAGENET_MEAN255 = tuple(v * 255 for v in (0.485, 0.456, 0.406))
_IMAGENET_STD255 = tuple(v * 255 for v in (0.229, 0.224, 0.225))

PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(
        kind="resize_center_crop",
        size=224,
        resize=256,
        interpolation="bilinear",
        mean255=_IMAGENET_MEAN255,
        std255=_IMAGENET_STD255,
    ),
    "efficientnet-lite": Preprocess(
        kind="tf_center_crop",
        size=224,
        crop_padding=32,
        interpolation="bicubic",
        mean255=(127.0, 127.0, 127.0),
        std255=(128.0, 128.0, 128.0),
    ),
    "cifar10": Preprocess(
        kind="resize",
        size=32,
        interpolation="bilinear",
        mean255=_IMAGENET_MEAN255,
        std255=_IMAGENET_STD255,
    ),
    "digits": Preprocess(kind="digits", size=16),
}


def get_preset(name: str) -> Preprocess:
    """The named preset, or an :class:`OnnxlwError` listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise OnnxlwError(
            f"unknown preset {name!r}", f"use one of {', '.join(sorted(PRESETS))}"
        ) from None


def sidecar_path(model_path: str | Path) -> Path:
    """``<model>.json`` next to ``<model>.onnx``."""
    return Path(model_path).with_suffix(".json")


def select_preset(model_path: str | Path) -> Preprocess | None:
    """The preprocessing of the sidecar ``<model>.json`` next to the model, else ``None``."""
    p = sidecar_path(model_path)
    return Preprocess.from_file(p) if p.is_file() else None


# ---------------------------------------------------------------------------------------------
# decoding and per-image transforms


def _pil() -> Any:
    """``PIL.Image``, imported lazily (Pillow is the optional ``eval`` extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise OnnxlwError("Pillow is not installed", "pip install 'onnxlw[eval]'") from None
    return Image


def _resample(name: str) -> Any:
    return getattr(_pil().Resampling, name.upper())


def decode(path: str | Path) -> Any:
    """Open an image file as an RGB ``PIL.Image``."""
    image = _pil()
    try:
        with image.open(path) as im:
            return im.convert("RGB")
    except (OSError, image.UnidentifiedImageError) as e:
        raise OnnxlwError(f"cannot decode image {path} ({e})", "remove or replace the file") from e


def torchvision_resize_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(new_w, new_h) of torchvision ``Resize(short)``: short side -> ``short``,
    long side -> ``int(short * long / short_side)``."""
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def center_crop_box(w: int, h: int, crop: int) -> tuple[int, int, int, int]:
    """PIL crop box of torchvision ``CenterCrop(crop)``: offsets ``round((dim - crop) / 2)``.

    Offsets may be negative when the image is smaller than the crop; PIL then pads with zeros,
    like torchvision.
    """
    top = round((h - crop) / 2.0)
    left = round((w - crop) / 2.0)
    return left, top, left + crop, top + crop


def tf_center_crop_box(w: int, h: int, size: int, padding: int) -> tuple[int, int, int, int]:
    """PIL crop box of the TF EfficientNet eval crop: side ``int(size/(size+padding)*min(h,w))``
    at offset ``((dim - side) + 1) // 2``."""
    side = int(size / (size + padding) * min(h, w))
    top = ((h - side) + 1) // 2
    left = ((w - side) + 1) // 2
    return left, top, left + side, top + side


def transform(img: Any, p: Preprocess) -> np.ndarray:
    """Apply ``p`` to one RGB ``PIL.Image``; returns float32 ``[C, H, W]`` (or ``[H, W, C]``
    when ``p.layout == "NHWC"``)."""
    if p.is_identity:
        raise OnnxlwError(
            f"preprocess kind {p.kind!r} expects already preprocessed arrays, not image files",
            "pass an .npz with x [N,C,H,W] (and y) as the images, or choose another preset",
        )
    assert p.size is not None
    w, h = img.size
    resample = _resample(p.interpolation)
    if p.kind == "resize_center_crop":
        assert p.resize is not None
        nw, nh = torchvision_resize_size(w, h, p.resize)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        img = img.crop(center_crop_box(nw, nh, p.size))
    elif p.kind == "tf_center_crop":
        img = img.crop(tf_center_crop_box(w, h, p.size, p.crop_padding))
        img = img.resize((p.size, p.size), resample)
    elif (w, h) != (p.size, p.size):  # "resize"
        img = img.resize((p.size, p.size), resample)
    return normalize(np.asarray(img, dtype=np.uint8), p)


def normalize(hwc: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB -> float32 normalized ``[C, H, W]`` (``[H, W, C]`` for NHWC).

    Computed like torchvision: ``(x / 255 - mean255 / 255) / (std255 / 255)`` in float32.
    """
    x = hwc.astype(np.float32) / np.float32(255.0)
    if p.channel_order == "BGR":
        x = x[..., ::-1]
    mean = (np.asarray(p.mean255, np.float64) / 255.0).astype(np.float32)
    std = (np.asarray(p.std255, np.float64) / 255.0).astype(np.float32)
    x = (x - mean) / std
    if p.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# sources


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def spread_indices(n: int, limit: int | None) -> np.ndarray:
    """Indices of an evenly spread deterministic subset of ``limit`` out of ``n`` sorted items:
    ``floor(i * n / limit)``. With files sorted by class this covers the classes evenly."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise OnnxlwError(f"--limit must be positive, got {limit}", "pass a positive count")
    return (np.arange(limit, dtype=np.int64) * n) // limit


def list_images(source: str | Path) -> tuple[list[Path], np.ndarray | None]:
    """Files of an image folder in deterministic order, with their labels (or ``None``).

    Returns ``(files, labels)``; ``labels`` is int64 ``[len(files)]``. Labels are derived from
    the *whole* folder, so a later subset keeps the same label indices.
    """
    root = Path(source)
    if not root.is_dir():
        raise OnnxlwError(f"image folder {root} not found", "pass an existing folder or .npz")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_dirs = [d for d in subdirs if any(_is_image(f) for f in d.iterdir())]
    if class_dirs:
        names = [d.name for d in class_dirs]
        if set(names) <= set(CIFAR10_CLASSES):
            index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
        else:
            index = {c: i for i, c in enumerate(sorted(names))}
        files: list[Path] = []
        labels: list[int] = []
        for d in sorted(class_dirs, key=lambda d: index[d.name]):
            fs = sorted(f for f in d.iterdir() if _is_image(f))
            files += fs
            labels += [index[d.name]] * len(fs)
        return files, np.asarray(labels, dtype=np.int64)
    files = sorted(f for f in root.iterdir() if _is_image(f))
    if not files:
        raise OnnxlwError(
            f"no images found in {root}",
            "pass a folder of image files (ImageNet-style names or class sub-folders) or an .npz",
        )
    wnids = [_WNID.match(f.name) for f in files]
    if not all(wnids):
        return files, None
    ids = [m.group(1) for m in wnids if m]
    order = sorted(set(ids))
    if len(order) != 1000 and len(order) > 1:
        warnings.warn(
            f"{root} holds {len(order)} distinct ImageNet wnids; labels are positions among "
            "these, which match ImageNet-1k class indices only when all 1000 are present",
            stacklevel=2,
        )
    index = {w: i for i, w in enumerate(order)}
    return files, np.asarray([index[w] for w in ids], dtype=np.int64)


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` float32 ``[N, C, H, W]`` and ``y`` int64 ``[N]`` (or ``None``) of an ``.npz``."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z:
                raise OnnxlwError(f"{p} has no array 'x'", "save the inputs as x=[N,C,H,W]")
            x = np.asarray(z["x"], dtype=np.float32)
            y = np.asarray(z["y"], dtype=np.int64).reshape(-1) if "y" in z else None
    except (OSError, ValueError) as e:
        raise OnnxlwError(f"cannot read {p} ({e})", "pass a valid .npz with x and y") from e
    if x.ndim != 4 or x.shape[0] == 0:
        raise OnnxlwError(f"{p}: x has shape {x.shape}", "x must be a non-empty [N,C,H,W] array")
    if y is not None and y.shape[0] != x.shape[0]:
        raise OnnxlwError(f"{p}: {x.shape[0]} inputs but {y.shape[0]} labels", "fix y")
    return x, y


def load_images(
    source: str | Path, preprocess: Preprocess | None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Load and preprocess an image source.

    Returns ``(x, labels, names)``: ``x`` float32 ``[N, C, H, W]``, ``labels`` int64 ``[N]`` or
    ``None``, ``names`` the file names (relative to the source) or ``"<npz>[i]"``. With
    ``limit``, an evenly spread deterministic subset (:func:`spread_indices`) of the sorted
    list. An ``.npz`` is already preprocessed and ``preprocess`` is ignored for it.
    """
    src = Path(source)
    if not src.exists():
        raise OnnxlwError(f"images {src} not found", "pass an existing folder or .npz file")
    if src.is_file():
        if src.suffix.lower() != ".npz":
            raise OnnxlwError(f"{src} is a file but not an .npz", "pass a folder or an .npz")
        x, y = read_npz(src)
        idx = spread_indices(x.shape[0], limit)
        names = [f"{src.name}[{i}]" for i in idx]
        return np.ascontiguousarray(x[idx]), None if y is None else y[idx], names
    if preprocess is None:
        raise OnnxlwError(
            f"no preprocessing given for image folder {src}",
            "pass --preset NAME or --preprocess FILE, or put a sidecar <model>.json by the model",
        )
    files, labels = list_images(src)
    idx = spread_indices(len(files), limit)
    chosen = [files[i] for i in idx]
    x = np.stack([transform(decode(f), preprocess) for f in chosen])
    names = [str(f.relative_to(src)) for f in chosen]
    return x, None if labels is None else labels[idx], names
