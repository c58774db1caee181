"""A third-party model corpus for onnxlw, met the way a new user meets models.

Four subcommands, each a separate step (run them one at a time on a shared machine)::

    # 1. torchvision CNNs, random seeded weights with realistic BN running stats, exported as a
    #    user would (BN kept and BN folded, opsets 7..21, static/dynamic batch, post-processed
    #    variants: -1 dims, output without shape, IR 3). Needs torch + torchvision + onnx.
    /work/corpus/venv-torch/bin/python tools/corpus.py export --out /work/corpus/models

    # 2. ONNX CNNs shipped inside pip wheels (OCR det/cls/rec, a YOLOv8 detector, ...).
    python tools/corpus.py pip --out /work/corpus/models --venv-dir /work/corpus/pipdl

    # 3. onnxlw compress on every model (sequential; timeout, wall time, peak RSS, report).
    /work/corpus/venv-lw/bin/python tools/corpus.py run --models /work/corpus/models \
        --out /work/corpus/results --onnxlw /work/corpus/venv-lw/bin/onnxlw

    # 4. Markdown table + counts per outcome category.
    python tools/corpus.py summary /work/corpus/results/results.json > summary.md

Everything large stays outside the repository. ``export`` writes ``manifest.json`` in the
models folder (one entry per file: name, file, source, arch, opset, ir_version, bn
kept/folded with the BatchNormalization count actually found, batch style, post-processing,
size); ``pip`` appends its entries to the same manifest. ``run`` reads the manifest (or globs
``*.onnx``) and writes ``results.json`` plus one output model and report per model.

Outcome categories in ``summary``: ``compressed`` (exit 0, validation SQNR >= 10 dB),
``low-sqnr`` (exit 0, SQNR < 10 dB on synthetic inputs and not flagged: with random weights
this is a hint, not a verdict), ``flagged-broken`` (exit 0, and onnxlw itself said the output
LOOKS BROKEN), ``refused`` (exit 2: a one-line reason), ``crash`` (any other exit code, a
traceback, or exit 3 InternalError), ``timeout``.

torchvision from PyPI is built against the CUDA torch; with the CPU torch wheel its C
extension does not load and ``import torchvision`` fails in ``torch.library.register_fake``.
No model used here needs the C ops, so the import is done with that registration disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

SEED = 0
SQNR_COLLAPSE_DB = 10.0

# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

# (arch, resolution). Classifiers have adaptive pooling, so 128 px saves time; resnet18 and
# mobilenet_v2 keep the canonical 224.
CLASSIFIERS: list[tuple[str, int]] = [
    ("resnet18", 224),
    ("resnet50", 128),
    ("mobilenet_v2", 224),
    ("mobilenet_v3_small", 128),
    ("efficientnet_b0", 128),
    ("shufflenet_v2_x1_0", 128),
    ("squeezenet1_1", 128),
    ("densenet121", 128),
    ("regnet_x_400mf", 128),
    ("mnasnet0_5", 128),
    ("googlenet", 128),
    ("convnext_tiny", 128),
]
SEGMENTERS: list[tuple[str, int]] = [
    ("deeplabv3_mobilenet_v3_large", 128),
    ("lraspp_mobilenet_v3_large", 128),
]


def _spec(arch: str, res: int, opset: int, bn: str, batch: str, **kw: Any) -> dict[str, Any]:
    d = {"arch": arch, "res": res, "opset": opset, "bn": bn, "batch": batch,
         "exporter": "classic", "post": None}
    d.update(kw)
    tag = {"dynamic": "dyn", "static": "b1", "dynamic_hw": "dynhw"}[batch]
    suffix = f"_{d['post']}" if d["post"] else ""
    ex = "" if d["exporter"] == "classic" else f"_{d['exporter']}"
    d["name"] = f"{arch}_op{opset}_{'bn' if bn == 'kept' else 'fold'}_{tag}{ex}{suffix}"
    return d


def corpus_specs() -> list[dict[str, Any]]:
    """The export plan: every file the ``export`` subcommand writes, in order."""
    specs: list[dict[str, Any]] = []
    for arch, res in CLASSIFIERS + SEGMENTERS:
        specs.append(_spec(arch, res, 13, "kept", "dynamic"))
        specs.append(_spec(arch, res, 17, "folded", "static"))
    specs += [
        _spec("vgg11_bn", 224, 13, "kept", "static"),
        _spec("mobilenet_v3_large", 128, 13, "kept", "dynamic"),
        _spec("resnet18", 224, 11, "kept", "static"),
        _spec("resnet18", 224, 20, "kept", "dynamic"),
        _spec("resnet18", 224, 17, "kept", "dynamic_hw"),
        _spec("efficientnet_b0", 128, 11, "kept", "static"),
        # old opsets; opset 7 is IR 3 (initializers listed as graph inputs, as old zoos did)
        _spec("mobilenet_v2", 224, 7, "kept", "dynamic", post="ir3"),
        _spec("resnet18", 224, 8, "kept", "static", post="ir3"),
        _spec("mobilenet_v2", 224, 9, "kept", "dynamic"),
        # the default torch>=2.9 exporter (dynamo): what a new user gets without options
        _spec("resnet18", 224, 20, "folded", "dynamic", exporter="dynamo"),
        _spec("mobilenet_v2", 224, 21, "folded", "static", exporter="dynamo"),
        _spec("efficientnet_b0", 128, 18, "kept", "dynamic", exporter="dynamo_noopt"),
        # Paddle-style post-processing
        _spec("mobilenet_v3_small", 128, 13, "kept", "dynamic", post="minus1"),
        _spec("resnet18", 224, 13, "kept", "dynamic", post="nooutshape"),
        _spec("mobilenet_v3_large", 128, 11, "kept", "dynamic", post="paddle"),
        # small custom heads seen in detectors / attention blocks
        _spec("reshape_bchw", 128, 13, "kept", "dynamic"),
        _spec("reshape_bchw", 128, 13, "kept", "static"),
        _spec("yolo_head", 160, 13, "kept", "static"),
        _spec("yolo_head", 160, 13, "kept", "dynamic"),
    ]
    return specs


def _import_torchvision() -> Any:
    import torch
    import torch.library

    orig = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda f: f)  # type: ignore[assignment]
    try:
        import torchvision
    finally:
        torch.library.register_fake = orig
    return torchvision


def _custom_model(arch: str) -> Any:
    import torch
    from torch import nn

    def cbr(i: int, o: int, s: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class ReshapeBCHW(nn.Module):
        """Global pooling written as reshape(b, c, h*w).mean(-1), as many user models do."""

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 64, 2))
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            b, c, h, w = y.shape
            return self.fc(y.reshape(b, c, h * w).mean(-1))

    class YoloHead(nn.Module):
        """Tiny YOLO-style detector: 3 scales, permute + reshape(b, -1, 5 + classes), concat."""

        def __init__(self, nc: int = 80) -> None:
            super().__init__()
            self.no = 5 + nc
            self.s1 = nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 32, 2))
            self.s2 = cbr(32, 64, 2)
            self.s3 = cbr(64, 128, 2)
            self.heads = nn.ModuleList(nn.Conv2d(c, self.no, 1) for c in (32, 64, 128))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.s1(x)
            b = self.s2(a)
            c = self.s3(b)
            outs = []
            for f, h in zip((a, b, c), self.heads, strict=True):
                y = h(f).permute(0, 2, 3, 1)
                outs.append(y.reshape(y.shape[0], -1, self.no))
            out = torch.cat(outs, 1)
            return torch.cat([out[..., :4], out[..., 4:].sigmoid()], -1)

    return {"reshape_bchw": ReshapeBCHW, "yolo_head": YoloHead}[arch]()


def build_model(arch: str) -> Any:
    """A torchvision (or small custom) model with random weights, segmentation wrapped."""
    import torch
    from torch import nn

    if arch in ("reshape_bchw", "yolo_head"):
        return _custom_model(arch)
    tv = _import_torchvision()
    if arch in dict(SEGMENTERS) or arch.startswith(("deeplab", "lraspp", "fcn")):
        seg = getattr(tv.models.segmentation, arch)(weights=None, weights_backbone=None)

        class OutOnly(nn.Module):
            def __init__(self, m: nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.m(x)["out"]

        return OutOnly(seg)
    kw: dict[str, Any] = {"weights": None}
    if arch == "googlenet":
        kw.update(aux_logits=False, init_weights=True)
    return getattr(tv.models, arch)(**kw)


def pink_noise(shape: tuple[int, ...], seed: int) -> Any:
    """N(0, 1)-marginal images with a 1/f amplitude spectrum (natural images are close to
    1/f); white noise would give BN statistics no trained network has."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    spec = np.fft.rfftn(x, axes=(2, 3))
    fy, fx = np.fft.fftfreq(shape[2]), np.fft.rfftfreq(shape[3])
    f = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    f[0, 0] = f.flat[1]
    x = np.fft.irfftn(spec / f, s=shape[2:], axes=(2, 3))
    x = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    return torch.from_numpy(x.astype(np.float32))


def calibrate_bn(model: Any, res: int, seed: int, passes: int = 3, batch: int = 4,
                 calib_input: str = "pink") -> int:
    """Give every BN non-trivial running stats: random affine, then train-mode passes on
    seeded pink-noise (or white ``gaussian``) images."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)  # U(0.5, 1.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)  # N(0, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
        model.train()
        for i in range(passes):
            if calib_input == "pink":
                model(pink_noise((batch, 3, res, res), seed * 1000 + i))
            else:
                model(torch.randn(batch, 3, res, res, generator=g))
    model.eval()
    return len(bns)


def _post_process(path: Path, post: str | None) -> None:
    """Edit the exported file to look like other exporters' output."""
    import onnx

    if not post:
        return
    m = onnx.load(str(path))
    if post == "ir3":
        m.ir_version = 3
    if post in ("minus1", "paddle"):
        for vi in list(m.graph.input) + list(m.graph.output):
            init = {t.name for t in m.graph.initializer}
            if vi.name in init:
                continue
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = -1
    if post in ("nooutshape", "paddle"):
        for vi in m.graph.output:
            vi.type.tensor_type.ClearField("shape")
    onnx.save(m, str(path))


def export_one(spec: dict[str, Any], out: Path, seed: int, calib_input: str = "pink"
               ) -> dict[str, Any]:
    """Export one spec to ``out/<name>.onnx``; returns its manifest entry."""
    import onnx
    import torch

    torch.manual_seed(seed)
    model = build_model(spec["arch"])
    nbn = calibrate_bn(model, min(spec["res"], 128), seed, calib_input=calib_input)
    res = spec["res"]
    x = torch.randn(1, 3, res, res)
    path = out / f"{spec['name']}.onnx"
    names = {"input_names": ["input"], "output_names": ["output"]}
    dyn: dict[str, dict[int, str]] | None = None
    if spec["batch"] == "dynamic":
        dyn = {"input": {0: "batch"}, "output": {0: "batch"}}
    elif spec["batch"] == "dynamic_hw":
        dyn = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}
    with torch.no_grad():
        if spec["exporter"] == "classic":
            kw: dict[str, Any] = {}
            if spec["bn"] == "kept":
                kw = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
            if spec["post"] == "ir3":
                kw["keep_initializers_as_inputs"] = True
            torch.onnx.export(model, (x,), str(path), opset_version=spec["opset"], dynamo=False,
                              dynamic_axes=dyn, **names, **kw)
        else:
            shapes = None
            if dyn:
                shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
            torch.onnx.export(model, (x,), str(path), opset_version=spec["opset"], dynamo=True,
                              dynamic_shapes=shapes, optimize=spec["exporter"] == "dynamo",
                              external_data=False, verbose=False, **names)
    _post_process(path, spec["post"])
    m = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    bn_nodes = ops.count("BatchNormalization")
    return {
        "name": spec["name"], "file": path.name, "source": f"torchvision:{spec['arch']}",
        "arch": spec["arch"], "opset": max(o.version for o in m.opset_import if o.domain in ("",
                                           "ai.onnx")), "ir_version": m.ir_version,
        "bn": "kept" if bn_nodes else "folded", "bn_requested": spec["bn"],
        "bn_nodes": bn_nodes, "bn_modules": nbn, "batch": spec["batch"],
        "exporter": spec["exporter"], "post": spec["post"], "res": res,
        "size": path.stat().st_size, "seed": seed, "bn_calib_input": calib_input,
    }


def _load_manifest(out: Path) -> list[dict[str, Any]]:
    p = out / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else []


def _save_manifest(out: Path, entries: list[dict[str, Any]]) -> None:
    (out / "manifest.json").write_text(json.dumps(entries, indent=1) + "\n")


def _merge(entries: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in entries if e["name"] != new["name"]] + [new]


def cmd_export(a: argparse.Namespace) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = corpus_specs()
    if a.only:
        pat = re.compile(a.only)
        specs = [s for s in specs if pat.search(s["name"])]
    entries = _load_manifest(out)
    done = {e["name"] for e in entries}
    for s in specs:
        if s["name"] in done and (out / f"{s['name']}.onnx").exists() and not a.force:
            print(f"skip   {s['name']} (exists)")
            continue
        t = time.time()
        try:
            e = export_one(s, out, a.seed, a.calib_input)
        except Exception as ex:  # noqa: BLE001 - record and go on
            print(f"FAILED {s['name']}: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}")
            continue
        entries = _merge(entries, e)
        _save_manifest(out, entries)
        print(f"ok     {s['name']}: opset {e['opset']} IR {e['ir_version']} BN nodes "
              f"{e['bn_nodes']} {e['size'] / 1e6:.1f} MB {time.time() - t:.1f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# pip
# --------------------------------------------------------------------------------------------

# Found by grepping the package lists (/work/.library/env/packages/pypi.tsv), not the registry.
PIP_PACKAGES: list[tuple[str, str]] = [
    ("rapidocr-onnxruntime", "PP-OCRv4 det/cls/rec (Paddle exports)"),
    ("nudenet", "YOLOv8n detector 320x320"),
    ("ddddocr", "captcha OCR recognizer + YOLOX-style detector"),
]


# The --input-shape a user of each shipped model would pass (from the package's own
# preprocessing: PP-OCR det 640 side, rec 48 x 320, cls 48 x 192; nudenet 320; ddddocr 64 high).
PIP_PINS: dict[str, list[str]] = {
    "PP-OCRv4_det": ["x:1,3,640,640"],
    "PP-OCRv4_rec": ["x:1,3,48,320"],
    "_cls_infer": ["x:1,3,48,192"],
    "nudenet_320n": ["images:1,3,320,320"],
    "ddddocr_common": ["input1:1,1,64,256"],
}


def cmd_pip(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.venv_dir)
    work.mkdir(parents=True, exist_ok=True)
    entries = _load_manifest(out)
    for pkg, what in PIP_PACKAGES if not a.packages else [(p, "") for p in a.packages]:
        dl = work / pkg
        dl.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), pkg]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dl.glob("*.whl"))
        if r.returncode or not wheels:
            print(f"FAILED {pkg}: {r.stderr.strip().splitlines()[-1:]}")
            continue
        whl = wheels[-1]
        version = whl.name.split("-")[1]
        with zipfile.ZipFile(whl) as z:
            members = [n for n in z.namelist() if n.endswith(".onnx")]
            for n in members:
                stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(n).stem)
                name = f"pip_{pkg.replace('-', '_')}_{stem}"
                dst = out / f"{name}.onnx"
                with z.open(n) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f)
                e = {"name": name, "file": dst.name, "source": f"pip:{pkg}=={version}:{n}",
                     "arch": what, "size": dst.stat().st_size, "bn": "?", "opset": None}
                e.update(_inspect(dst))
                pins = [v for k, v in PIP_PINS.items() if k in name]
                if pins and e.get("dynamic_hw"):
                    e["pins"] = pins[0]
                entries = _merge(entries, e)
                print(f"ok     {name}: {n} opset {e['opset']} BN {e['bn_nodes']} "
                      f"{e['size'] / 1e6:.1f} MB")
        _save_manifest(out, entries)
    return 0


def _inspect(path: Path) -> dict[str, Any]:
    try:
        import onnx
    except ImportError:
        return {}
    m = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    nbn = ops.count("BatchNormalization")
    dyn = False
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dyn |= any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:])
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
                default=None)
    return {"dynamic_hw": dyn, "opset": opset, "ir_version": m.ir_version, "bn_nodes": nbn,
            "bn": "kept" if nbn else "folded"}


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def input_pins(path: Path, default_hw: int) -> list[str]:
    """``--input-shape`` values a user would pass: only for symbolic non-batch dims."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in m.graph.initializer}
    pins = []
    for vi in m.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        rest = dims[1:]
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in rest):
            shape = [1] + [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                           else (3 if i == 0 else default_hw) for i, d in enumerate(rest)]
            pins.append(f"{vi.name}:{','.join(map(str, shape))}")
    return pins


def _peak_rss_from_time(text: str) -> int | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return int(m.group(1)) * 1024 if m else None


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _lines(text: str) -> list[str]:
    """onnxlw's own lines: no progress ticks, no /usr/bin/time block, no ANSI codes."""
    text = ANSI.sub("", text.split("\tCommand being timed")[0])
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not re.match(r"^\[\s*[\d.]+s\]", ln)
            and not ln.startswith("Command exited with non-zero status")]


def _last_line(text: str) -> str:
    lines = _lines(text)
    return lines[-1] if lines else ""


def _first_error(text: str) -> str:
    for s in _lines(text):
        if re.match(r"^(onnxlw: )?(internal )?error", s, re.I) or re.match(
                r"^\w*(Error|Exception):", s):
            return s
    return ""


def _dims(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = []
    for vi in m.graph.output:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            out.append(f"{vi.name}:<no shape>")
            continue
        ds = [d.dim_param if d.HasField("dim_param") else
              (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
        out.append(f"{vi.name}:[{','.join(ds)}]")
    return out


def parse_run(res: dict[str, Any], src: Path, dst: Path, rep: Path, so: str, se: str
              ) -> dict[str, Any]:
    """Fill the measured fields of one result from its stdout/stderr and report JSON."""
    res.update({
        "peak_rss": _peak_rss_from_time(se),
        "last_line": _last_line(se) or _last_line(so),
        "error": _first_error(se) or _first_error(so),
        "traceback": "Traceback (most recent call last)" in se,
        "stdout_warnings": [ln for ln in _lines(so) if re.match(r"^warning", ln, re.I)],
        "ort_errors": len(re.findall(r"\[E:onnxruntime", se)),
        "size_before": src.stat().st_size,
        "size_after": dst.stat().st_size if dst.exists() else None,
    })
    if dst.exists():
        before, after = _dims(src), _dims(dst)
        res["output_dims"] = before
        res["output_dims_after"] = after if after != before else None
    if rep.exists():
        d = json.loads(rep.read_text())
        v = d.get("validation") or {}
        res.update({
            "layers_quantized": d.get("layers_quantized"), "layers_total": len(d["layers"]),
            "qlinear_conv": v.get("qlinear_conv"), "float_conv": v.get("float_conv"),
            "sqnr_db": v.get("sqnr_db"), "top1_agreement": v.get("top1_agreement"),
            "looks_broken": v.get("looks_broken"),
            "warnings": d.get("warnings"), "fallback": d.get("fallback"),
            "unsupported_ops": d.get("unsupported_ops"), "bn_found": d.get("bn_found"),
            "skipped": sorted({str(x["skipped"]) for x in d["layers"] if x.get("skipped")}),
        })
    res["category"] = categorize(res)
    return res


def run_one(entry: dict[str, Any], models: Path, out: Path, onnxlw: list[str],
            timeout: float, extra: list[str] | None = None) -> dict[str, Any]:
    src = models / entry["file"]
    name = entry["name"]
    dst = out / f"{name}.{'w8a8' if not extra else 'out'}.onnx"
    rep = out / f"{name}.report.json"
    for p in (dst, rep):
        p.unlink(missing_ok=True)
    pins = entry.get("pins") or input_pins(src, int(entry.get("res") or 224))
    cmd = [*onnxlw, "compress", str(src), "-o", str(dst), "--report", str(rep), *(extra or [])]
    for p in pins:
        cmd += ["--input-shape", p]
    full = ["nice", "-n", "10", "/usr/bin/time", "-v", *cmd]
    t = time.time()
    try:
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        rc, so, se = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as ex:
        rc, so, se = None, ex.stdout or "", ex.stderr or ""
        so = so.decode() if isinstance(so, bytes) else so
        se = se.decode() if isinstance(se, bytes) else se
    wall = time.time() - t
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{so}\n--- stderr\n{se}")
    res: dict[str, Any] = {
        "name": name, "file": entry["file"], "source": entry.get("source"),
        "opset": entry.get("opset"), "bn": entry.get("bn"), "bn_nodes": entry.get("bn_nodes"),
        "input_shape_pins": pins, "command": " ".join(cmd), "exit_code": rc,
        "wall_s": round(wall, 2),
    }
    return parse_run(res, src, dst, rep, so, se)


def categorize(r: dict[str, Any]) -> str:
    rc = r["exit_code"]
    if rc is None:
        return "timeout"
    if rc == 0:
        s = r.get("sqnr_db")
        if r.get("looks_broken"):
            return "flagged-broken"
        if isinstance(s, (int, float)) and s < SQNR_COLLAPSE_DB:
            return "low-sqnr"
        return "compressed"
    if rc == 2 and not r.get("traceback"):
        return "refused"
    return "crash"


def _from_log(entry: dict[str, Any], log: str) -> tuple[dict[str, Any], str, str]:
    """Rebuild a result row's run facts (command, exit code, wall time) from its saved log."""
    cmd = log.splitlines()[0].removeprefix("$ ")
    so = log.split("--- stdout\n", 1)[1].split("\n--- stderr\n", 1)[0]
    se = log.split("\n--- stderr\n", 1)[1]
    rc: int | None = 0
    if m := re.search(r"Command exited with non-zero status (\d+)", se):
        rc = int(m.group(1))
    elif m := re.search(r"Command terminated by signal (\d+)", se):
        rc = 128 + int(m.group(1))
    elif "Command being timed" not in se:
        rc = None  # killed by the timeout before /usr/bin/time reported
    wall = 0.0
    if m := re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", se):
        for part in m.group(1).split(":"):
            wall = wall * 60 + float(part)
    pins = re.findall(r"--input-shape (\S+)", cmd)
    row = {"name": entry["name"], "file": entry["file"], "source": entry.get("source"),
           "opset": entry.get("opset"), "bn": entry.get("bn"), "bn_nodes": entry.get("bn_nodes"),
           "input_shape_pins": pins, "command": cmd, "exit_code": rc, "wall_s": round(wall, 2)}
    return row, so, se


def cmd_recheck(a: argparse.Namespace) -> int:
    """Rebuild results.json from the saved logs and reports of every model (no onnxlw run)."""
    models, out = Path(a.models), Path(a.out)
    entries = _load_manifest(models)
    listed = {e["file"] for e in entries}
    entries += [{"name": p.stem, "file": p.name, "source": "file", **_inspect(p)}
                for p in sorted(models.glob("*.onnx")) if p.name not in listed]
    results = []
    for e in entries:
        logp = out / f"{e['name']}.log"
        if not logp.exists() or not (models / e["file"]).exists():
            continue
        row, so, se = _from_log(e, logp.read_text())
        m = re.search(r" -o (\S+)", row["command"])  # the file that run wrote
        dst = Path(m.group(1)) if m else out / f"{e['name']}.w8a8.onnx"
        results.append(parse_run(row, models / e["file"], dst,
                                 out / f"{e['name']}.report.json", so, se))
    rpath = out / "results.json"
    rpath.write_text(json.dumps(results, indent=1) + "\n")
    print(f"rebuilt {len(results)} results from the logs in {out} into {rpath}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    import shlex

    models, out = Path(a.models), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = _load_manifest(models)
    listed = {e["file"] for e in entries}
    for p in sorted(models.glob("*.onnx")):
        if p.name not in listed:
            entries.append({"name": p.stem, "file": p.name, "source": "file", **_inspect(p)})
    if a.only:
        pat = re.compile(a.only)
        entries = [e for e in entries if pat.search(e["name"])]
    entries = [e for e in entries if (models / e["file"]).exists()]
    rpath = out / "results.json"
    results = json.loads(rpath.read_text()) if rpath.exists() else []  # other rows are kept
    done = {r["name"] for r in results} if a.resume else set()
    onnxlw = shlex.split(a.onnxlw)
    for i, e in enumerate(entries):
        if e["name"] in done:
            continue
        r = run_one(e, models, out, onnxlw, a.timeout, shlex.split(a.args))
        results = [x for x in results if x["name"] != r["name"]] + [r]
        rpath.write_text(json.dumps(results, indent=1) + "\n")
        rss = f"{r['peak_rss'] / 2**20:.0f} MB" if r["peak_rss"] else "?"
        print(f"[{i + 1}/{len(entries)}] {r['name']}: {r['category']} rc={r['exit_code']} "
              f"{r['wall_s']:.1f} s {rss} | {r['last_line'][:150]}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def _cell(s: Any, n: int = 0) -> str:
    s = "" if s is None else str(s)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s[:n] + "…" if n and len(s) > n else s


def summary_markdown(results: list[dict[str, Any]], width: int = 240) -> str:
    cols = ["model", "source", "opset", "BN", "exit", "outcome", "time s", "peak RSS MB",
            "layers q/total", "QLinearConv", "SQNR dB", "error (first line) / notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lq, lt = r.get("layers_quantized"), r.get("layers_total")
        sq = r.get("sqnr_db")
        err = r.get("error") or ("" if r["exit_code"] == 0 else r.get("last_line"))
        notes = []
        if r["exit_code"] == 0:
            notes += [w for w in r.get("stdout_warnings") or [] if "BatchNormalization" not in w]
            if r.get("fallback"):
                notes.append(f"fallback {r['fallback']}")
            if r.get("skipped"):
                notes.append("skipped: " + "; ".join(r["skipped"]))
        if r.get("output_dims_after"):
            notes.append(f"output dims {r['output_dims']} -> {r['output_dims_after']}")
        if r.get("ort_errors"):
            notes.append(f"{r['ort_errors']} onnxruntime [E] log line(s) on stderr")
        err = " / ".join([x for x in [err, *notes] if x])
        src = r.get("source") or ""
        src = src.split(":")[0] + ":" + src.split(":")[1] if src.count(":") >= 1 else src
        pins = f" (pin {' '.join(r['input_shape_pins'])})" if r.get("input_shape_pins") else ""
        lines.append("| " + " | ".join([
            _cell(r["name"]) + pins, _cell(src), _cell(r.get("opset")),
            _cell(r.get("bn")), _cell(r["exit_code"]), r["category"], f"{r['wall_s']:.1f}",
            f"{r['peak_rss'] / 2**20:.0f}" if r.get("peak_rss") else "",
            f"{lq}/{lt}" if lq is not None else "", _cell(r.get("qlinear_conv")),
            f"{sq:.1f}" if isinstance(sq, (int, float)) else _cell(sq),
            _cell(err, width)]) + " |")
    counts: dict[str, int] = {}
    for r in results:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    lines += ["", "| outcome | models |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    lines.append(f"| total | {len(results)} |")
    return "\n".join(lines) + "\n"


def cmd_summary(a: argparse.Namespace) -> int:
    results = json.loads(Path(a.results).read_text())
    sys.stdout.write(summary_markdown(results, a.width))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="export torchvision models (needs torch + torchvision)")
    e.add_argument("--out", required=True, help="folder for the .onnx files and manifest.json")
    e.add_argument("--seed", type=int, default=SEED, help="seed for weights, BN stats, inputs")
    e.add_argument("--only", help="regex: export only the spec names matching it")
    e.add_argument("--force", action="store_true", help="re-export files that already exist")
    e.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    e.add_argument("--calib-input", choices=["pink", "gaussian"], default="pink",
                   help="images whose train-mode passes set the BN running stats")
    e.add_argument("--list", action="store_true", help="print the spec names and exit")
    q = sub.add_parser("pip", help="copy the .onnx files shipped in pip wheels")
    q.add_argument("--out", required=True, help="models folder (manifest.json is appended)")
    q.add_argument("--venv-dir", required=True,
                   help="throwaway folder for the downloaded wheels (outside the repository)")
    q.add_argument("--packages", nargs="*", help="package names instead of the built-in list")
    r = sub.add_parser("run", help="onnxlw compress every model, sequentially")
    r.add_argument("--models", required=True, help="folder with .onnx files (+ manifest.json)")
    r.add_argument("--out", required=True, help="folder for outputs, logs and results.json")
    r.add_argument("--onnxlw", default="onnxlw", help="the onnxlw command (split like a shell)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    r.add_argument("--args", default="", help="more compress options, e.g. '--weight-bits 4' "
                   "(the output is then <name>.out.onnx)")
    r.add_argument("--only", help="regex: run only the model names matching it")
    r.add_argument("--resume", action="store_true",
                   help="skip models that already have a row in results.json")
    k = sub.add_parser("recheck", help="rebuild results.json from the saved logs/reports")
    k.add_argument("--models", required=True, help="the models folder given to `run`")
    k.add_argument("--out", required=True, help="the output folder given to `run`")
    s = sub.add_parser("summary", help="Markdown table of a results.json")
    s.add_argument("results", help="results.json written by `run`")
    s.add_argument("--width", type=int, default=240, help="max characters of the error cell")
    a = p.parse_args(argv)
    if a.cmd == "export" and a.list:
        for sp in corpus_specs():
            print(sp["name"])
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return {"export": cmd_export, "pip": cmd_pip, "run": cmd_run, "summary": cmd_summary,
            "recheck": cmd_recheck}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
