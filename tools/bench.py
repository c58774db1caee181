"""Benchmark onnxlw against onnxruntime's own quantizers on the real models in ../shared.

One run, on the same images, compares every candidate with the FP32 model:

- ``onnxlw``: W8A8 with no data (default :class:`onnxlw.Config`, seed 0); with ``--ablations``
  also one row per entry of :data:`ABLATIONS` (each turns ONE option back to the simpler choice),
  on the models of ``--ablation-models`` only;
- ``ort-s8s8`` / ``ort-u8s8``: ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel
  MinMax) calibrated on 64 real images;
- ``ort-u8s8-gauss``: the same U8S8 static quantization calibrated on 64 N(0, 1) noise inputs
  (the naive data-free baseline);
- ``ort-dynamic``: ``quant_pre_process`` + ``quantize_dynamic`` (ConvInteger).

Reported per candidate: top-1 change in points against FP32, top-1 agreement with FP32, mean
KL(fp32 || cand), batch-1 latency ratio to FP32 (medians, models alternated in one process,
fixed thread count), size ratio, integer/float conv counts after ORT optimization, and the
tool's wall time, also as a ratio to ORT U8S8 static's wall time on the same model.

Images. Evaluation: ImageNet models on all 1000 ``imagenet-sample-images``, CIFAR models on the
first 1000 (spread over the classes) of ``cifar10-test-jpg``; ``--limit N`` overrides both.
Calibration (ORT only): CIFAR models on 64 images of ``cifar10-train-subset-jpg`` (disjoint);
ImageNet models on 64 ``imagenet-sample-images`` *not* in the evaluation set when at least 64
are spare (``--limit`` <= 936). With all 1000 evaluated there are no spare images: ORT is then
calibrated on 64 of the evaluation images and the table says ``calib ⊂ eval (favours ORT)``.
Image decoding is not part of any wall time.

Usage (run one heavy process at a time on shared machines)::

    python tools/bench.py --quick                      # resnet20_cifar10, 500 images, < 5 min
    python tools/bench.py --out-md BENCHMARKS.md --out-json bench.json --ablations
    python tools/bench.py --models mobilenetv2,resnet56_cifar10 --limit 200 --threads 1
    python tools/bench.py --shared /path/to/shared --workdir /tmp/bench-models

From Python (used by ``tests/test_bench_quick.py``)::

    results = run_quick()   # same dict as --out-json, for --quick
    results["models"]["resnet20_cifar10"]["candidates"]["onnxlw"]["top1_agreement"]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from onnxlw import (  # noqa: E402
    ActRange,
    BiasCorrection,
    Config,
    InputDistribution,
    Synthesis,
    WeightScale,
    __version__,
    ortutil,
)
from onnxlw.evaluation import (  # noqa: E402
    Preprocess,
    load_images,
    measure_latency,
    metrics,
    run_model,
    select_preset,
)
from onnxlw.evaluation.preprocess import list_images, sidecar_path, spread_indices  # noqa: E402


def _load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` by path (``tools`` is not a package)."""
    mod_name = f"_onnxlw_tools_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


ob = _load_tool("ort_baselines")

DEFAULT_SHARED = REPO.parent / "shared"
CALIB_N = 64
"""Calibration images (or noise inputs) for ORT static quantization."""
BASE_CONFIG: dict[str, Any] = {"seed": 0}
"""onnxlw's benchmarked configuration: the defaults, seed 0."""

ABLATIONS: dict[str, dict[str, Any]] = {
    # name -> Config overrides on top of BASE_CONFIG; each turns ONE option back to the
    # simpler choice. A new ablation is one line here.
    "synthesis=gaussian": {"synthesis": Synthesis.GAUSSIAN},  # 1-hop
    "input=gaussian": {"input_distribution": InputDistribution.GAUSSIAN},
    "weight_scale=minmax": {"weight_scale": WeightScale.MINMAX},
    "act_range=minmax": {"act_range": ActRange.MINMAX},
    "bias_correction=none": {"bias_correction": BiasCorrection.NONE},
    "saturation_guard=off": {"saturation_guard": False},
    "input_range=synthesized": {"sidecar": False},
}
DEFAULT_ABLATION_MODELS = ("mobilenetv2", "resnet20_cifar10")
QUICK: dict[str, Any] = {"models": ["resnet20_cifar10"], "limit": 500, "latency_runs": 20}


@dataclass(frozen=True)
class Dataset:
    """Where a model family's evaluation and calibration images live (relative to shared)."""

    eval_dir: str
    calib_dir: str
    default_limit: int | None  # None: all images


DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset("data/cifar10-test-jpg", "data/cifar10-train-subset-jpg", 1000),
    "imagenet1k": Dataset("data/imagenet-sample-images", "data/imagenet-sample-images", None),
}
_DATASET_BY_CLASSES = {10: "cifar10", 1000: "imagenet1k"}


@dataclass(frozen=True)
class Candidate:
    """One compressed variant of a model.

    ``kind`` is ``"onnxlw"`` (``overrides`` on top of :data:`BASE_CONFIG`), ``"ort-static"``
    (``act`` activation type, ``calib`` ``"real"`` or ``"gaussian"``) or ``"ort-dynamic"``.
    """

    name: str
    what: str
    kind: str
    overrides: dict[str, Any] = field(default_factory=dict)
    act: str = "U8"
    calib: str = "real"


ONNXLW = Candidate("onnxlw", "onnxlw W8A8, no data (default Config, seed 0)", "onnxlw")
ORT_U8S8 = "ort-u8s8"
"""The candidate whose wall time onnxlw's is compared with."""
ORT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "ort-s8s8",
        f"ORT quantize_static QDQ per-channel MinMax, S8S8 (ORT default), {CALIB_N} real images",
        "ort-static",
        act="S8",
    ),
    Candidate(
        ORT_U8S8,
        f"ORT quantize_static QDQ per-channel MinMax, U8S8, {CALIB_N} real images",
        "ort-static",
        act="U8",
    ),
    Candidate(
        "ort-u8s8-gauss",
        f"ORT quantize_static U8S8 on {CALIB_N} N(0,1) noise inputs (naive data-free)",
        "ort-static",
        act="U8",
        calib="gaussian",
    ),
    Candidate("ort-dynamic", "ORT quantize_dynamic, S8 weights (ConvInteger)", "ort-dynamic"),
)


def ablation_candidates() -> list[Candidate]:
    """One onnxlw candidate per :data:`ABLATIONS` entry."""
    return [
        Candidate(f"onnxlw[{k}]", f"onnxlw with {k} (one option reverted)", "onnxlw", overrides=v)
        for k, v in ABLATIONS.items()
    ]


@dataclass
class Options:
    """What to benchmark and how."""

    shared: Path = DEFAULT_SHARED
    models: list[str] | None = None  # None: every model in shared/models
    limit: int | None = None  # None: the dataset's default
    latency_runs: int = 50
    threads: int = 1
    ablations: bool = False
    ablation_models: tuple[str, ...] = DEFAULT_ABLATION_MODELS
    workdir: Path | None = None
    command: str = ""


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# models, images, calibration


def available_models(shared: Path) -> list[str]:
    """Stems of the ``.onnx`` files in ``shared/models``, sorted."""
    return sorted(p.stem for p in (shared / "models").glob("*.onnx"))


def dataset_of(model_path: Path) -> str:
    """The dataset key of a model: its sidecar's ``preprocess.dataset``, else by class count."""
    side = json.loads(sidecar_path(model_path).read_text())
    name = side.get("preprocess", {}).get("dataset") or _DATASET_BY_CLASSES.get(
        int(side.get("num_classes", 0))
    )
    if name not in DATASETS:
        raise ValueError(f"{model_path.name}: unknown dataset {name!r} (known: {list(DATASETS)})")
    return name


class ImageCache:
    """Preprocessed evaluation images, kept in memory for the most recent key only (the
    default model order puts models with the same preprocessing next to each other)."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: tuple[np.ndarray, np.ndarray | None, list[str]] | None = None

    def get(
        self, folder: Path, pre: Preprocess, limit: int | None
    ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        key = (str(folder), pre, limit)
        if key != self._key or self._value is None:
            self._value = None  # free the old set before loading the new one
            _say(f"loading images {folder.name} (limit {limit})")
            self._value = load_images(folder, pre, limit)
            self._key = key
        return self._value


def calibration(
    ds: Dataset, shared: Path, pre: Preprocess, x: np.ndarray, names: list[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """ORT's real calibration images ``[n, C, H, W]`` and a description of where they came
    from. Disjoint from the evaluation images when possible; otherwise (all ImageNet samples
    evaluated) :data:`CALIB_N` evenly spread evaluation images, flagged as overlapping."""
    calib_dir, eval_dir = shared / ds.calib_dir, shared / ds.eval_dir
    info: dict[str, Any] = {"source": ds.calib_dir}
    if calib_dir.resolve() != eval_dir.resolve():
        calib = ob.load_calibration(calib_dir, pre, CALIB_N)
        return calib, {**info, "n": len(calib), "overlap": 0, "note": "disjoint folder"}
    spare = len(list_images(calib_dir)[0]) - len(names)
    if spare >= CALIB_N:
        calib = ob.load_calibration(calib_dir, pre, CALIB_N, exclude=set(names))
        return calib, {**info, "n": len(calib), "overlap": 0, "note": "eval images excluded"}
    calib = np.ascontiguousarray(x[spread_indices(len(x), CALIB_N)])
    note = "calib ⊂ eval (favours ORT)"
    return calib, {**info, "n": len(calib), "overlap": len(calib), "note": note}


# ---------------------------------------------------------------------------------------------
# producing and measuring candidates


_CHILD = """
import json, sys
from onnxlw import Config, compress
from onnxlw.io import save_atomic
model, out, cfg, rep = sys.argv[1:5]
q, r = compress(model, Config.from_dict(json.loads(cfg)))
save_atomic(q, out)
d = r.to_dict()
# VmHWM: this process image's own peak RSS (ru_maxrss would carry the parent's over exec)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
d["peak_rss_kb"] = int(status[0])
open(rep, "w").write(json.dumps(d))
"""


def produce(
    c: Candidate, model: Path, out: Path, calib: np.ndarray, noise: np.ndarray
) -> tuple[float, dict[str, Any]]:
    """Write candidate ``c`` of ``model`` to ``out``; returns (wall seconds, extra facts)."""
    if c.kind == "onnxlw":
        # The API reads the declared input range from the sidecar next to the model (as the
        # CLI does). compress runs in a fresh child process so that its peak RSS is measured
        # alone (the child's VmHWM), not on top of this process's image cache.
        cfg = dataclasses.replace(Config(**BASE_CONFIG), **c.overrides)
        rep_path = out.with_suffix(".report.json")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(model), str(out), json.dumps(cfg.to_dict()),
             str(rep_path)],
            stderr=subprocess.PIPE,
        )
        _, status = os.waitpid(proc.pid, 0)
        secs = time.perf_counter() - t0
        err = proc.stderr.read().decode() if proc.stderr else ""
        if status != 0:
            raise RuntimeError(f"onnxlw failed: {err.strip().splitlines()[-1:]}")
        rep = json.loads(rep_path.read_text())
        extra: dict[str, Any] = {
            "config": cfg.to_dict(),
            "peak_rss_mb": round(rep["peak_rss_kb"] / 1024, 1),
            "report_wall_time": rep["wall_time"],
            "stages": rep["stages"],
            "fallback": rep["fallback"],
            "bn_found": rep["bn_found"],
            "warnings": rep["warnings"],
        }
        if rep.get("validation"):
            extra["validation_qlinear_conv"] = rep["validation"]["qlinear_conv"]
        return secs, extra
    if c.kind == "ort-static":
        data = noise if c.calib == "gaussian" else calib
        _, secs = ob.ort_static(model, out, data, c.act)
        return secs, {"activation_type": c.act, "calibration": c.calib}
    if c.kind == "ort-dynamic":
        _, secs = ob.ort_dynamic(model, out, "S8")
        return secs, {}
    raise ValueError(f"unknown candidate kind {c.kind!r}")


def _safe(cname: str) -> str:
    """A file-name-safe form of a candidate name."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "." for ch in cname).strip(".")


def _conv_counts(path: Path, dynamic: bool) -> dict[str, int]:
    q, fp = ortutil.fused_conv_counts(path)
    out = {"qlinearconv": q, "float_conv": fp}
    if dynamic:
        out["convinteger"] = ortutil.optimized_op_counts(path).get("ConvInteger", 0)
    return out


def bench_model(
    name: str, opts: Options, workdir: Path, cache: ImageCache, with_ablations: bool
) -> dict[str, Any]:
    """All candidates of one model; the JSON-ready result dict."""
    model = opts.shared / "models" / f"{name}.onnx"
    ds_name = dataset_of(model)
    ds = DATASETS[ds_name]
    pre = select_preset(model)
    if pre is None:
        raise ValueError(f"{model.name} has no sidecar preprocessing")
    limit = opts.limit if opts.limit is not None else ds.default_limit
    x, labels, names = cache.get(opts.shared / ds.eval_dir, pre, limit)
    total = len(list_images(opts.shared / ds.eval_dir)[0])
    calib, calib_info = calibration(ds, opts.shared, pre, x, names)
    _, in_shape = ob.input_info(model)
    noise = ob.gaussian_calibration(in_shape, CALIB_N, seed=0)
    _say(f"{name}: FP32 on {len(x)} images")
    ref_logits = run_model(model, x)
    ref = metrics(ref_logits, ref_logits, labels)

    cands = [ONNXLW, *(ablation_candidates() if with_ablations else []), *ORT_CANDIDATES]
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for c in cands:
        out = workdir / f"{name}.{_safe(c.name)}.onnx"
        _say(f"{name}: {c.name}")
        row: dict[str, Any] = {"what": c.what, "kind": c.kind}
        try:
            secs, extra = produce(c, model, out, calib, noise)
            m = metrics(ref_logits, run_model(out, x), labels)
            row.update(extra)
            row.update(
                wall_s=secs,
                top1=m["cand_top1"],
                delta_top1_pts=None if labels is None else 100 * (m["cand_top1"] - ref["ref_top1"]),
                top1_agreement=m["top1_agreement"],
                kl_mean=m["kl_mean"],
                bytes=ortutil.file_size(out),
                **_conv_counts(out, c.kind == "ort-dynamic"),
            )
            paths[c.name] = out
        except Exception as e:  # one broken candidate must not sink the whole run
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            _say(f"{name}: {c.name} FAILED: {row['error']}")
        rows[c.name] = row

    _say(f"{name}: latency ({opts.latency_runs} runs, {opts.threads} thread(s))")
    lat = measure_latency([model, *paths.values()], x[:1], opts.latency_runs, opts.threads)
    fp32_bytes = ortutil.file_size(model)
    u8_wall = rows.get(ORT_U8S8, {}).get("wall_s")
    for (cname, _), ms in zip(paths.items(), lat[1:], strict=True):
        r = rows[cname]
        r["latency_ms"] = ms
        r["latency_ratio"] = ms / lat[0]
        r["size_ratio"] = r["bytes"] / fp32_bytes
        r["wall_ratio_to_ort_u8s8"] = r["wall_s"] / u8_wall if u8_wall else None
    q, fp = ortutil.fused_conv_counts(model)
    return {
        "model": str(model),
        "dataset": ds_name,
        "eval": {"source": ds.eval_dir, "n": len(x), "of": total, "preprocess": pre.kind},
        "calibration": calib_info,
        "fp32": {
            "top1": ref["ref_top1"],
            "top5": ref["ref_top5"],
            "latency_ms": lat[0],
            "bytes": fp32_bytes,
            "qlinearconv": q,
            "float_conv": fp,
        },
        "latency": {"runs": opts.latency_runs, "threads": opts.threads, "batch": 1},
        "candidates": rows,
    }


# ---------------------------------------------------------------------------------------------
# machine facts and rendering


def _cpuinfo() -> dict[str, str]:
    """First value of each key of /proc/cpuinfo (empty when unavailable)."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip().lower(), value.strip())
    return out


def _int8_isa(flags: list[str]) -> str:
    """The int8-relevant x86 extensions. Without VNNI, ORT's u8s8 kernels use VPMADDUBSW,
    whose int16 pair sums can saturate."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    have = [f for f in wanted if f in flags]
    if not have:
        return "unknown"
    return " ".join(have) + ("" if any("vnni" in f for f in have) else " (no VNNI)")


def _git(*args: str) -> str:
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def environment(command: str) -> dict[str, Any]:
    """Date, machine, versions and command line of this run."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    cpu = _cpuinfo()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_int8_isa": _int8_isa(cpu.get("flags", "").split()),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "python": platform.python_version(),
        "onnxlw": __version__,
        "git": (head + ("+dirty" if dirty else "")) or None,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "command": command,
    }


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return _f(None if v is None else 100 * v, ".1f")


def _conv_cell(r: dict[str, Any]) -> str:
    if "convinteger" in r:
        return f"{r['convinteger']} CI/{r['float_conv']}"
    return f"{r['qlinearconv']}/{r['float_conv']}"


def render_model(name: str, res: dict[str, Any]) -> str:
    """The markdown section (notes + table) of one model."""
    fp, ev, cal = res["fp32"], res["eval"], res["calibration"]
    subset = "" if ev["n"] >= ev["of"] else f", an even spread over the {ev['of']} sorted by class"
    lines = [
        f"## {name}",
        "",
        f"FP32: top-1 {_pct(fp['top1'])} % on {ev['n']} images of "
        f"{Path(ev['source']).name}{subset}; batch-1 latency "
        f"{fp['latency_ms']:.2f} ms, {fp['bytes'] / 1e6:.2f} MB. "
        f"ORT calibration: {cal['n']} images of {Path(cal['source']).name}, {cal['note']}.",
        "",
        "| candidate | Δtop-1 (pts) | agree % | KL(fp32‖cand) | latency × | size × "
        "| QLinearConv/Conv | wall s | wall ÷ ORT-U8S8 | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 | {_pct(fp['top1'])} (top-1) | 100.0 | 0 | 1.00 "
        f"| 1.000 | {fp['qlinearconv']}/{fp['float_conv']} | — | — | — |",
    ]
    notes: list[str] = []
    for cname, r in res["candidates"].items():
        label = f"{cname} †" if r.get("calibration") == "real" and cal["overlap"] else cname
        if "error" in r:
            lines.append(f"| {label} | failed | | | | | | | | |")
            notes.append(f"{cname} failed: {r['error']}")
            continue
        lines.append(
            f"| {label} | {_f(r['delta_top1_pts'], '+.1f')} | {100 * r['top1_agreement']:.1f} "
            f"| {r['kl_mean']:.4f} | {_f(r.get('latency_ratio'), '.2f')} "
            f"| {_f(r.get('size_ratio'), '.3f')} | {_conv_cell(r)} | {r['wall_s']:.2f} "
            f"| {_f(r.get('wall_ratio_to_ort_u8s8'), '.2f')} | {_f(r.get('peak_rss_mb'), '.0f')} |"
        )
        if r.get("fallback"):
            notes.append(f"{cname}: no BatchNorm statistics found, fallback {r['fallback']}")
    if cal["overlap"]:
        notes.append(
            f"† calib ⊂ eval (favours ORT): ORT's {cal['n']} calibration images are among the "
            f"{ev['n']} evaluation images (no spare images in {Path(cal['source']).name})."
        )
    lw, u8 = res["candidates"].get("onnxlw", {}), res["candidates"].get(ORT_U8S8, {})
    if "wall_s" in lw and "wall_s" in u8:
        notes.append(
            f"onnxlw took {lw['wall_s']:.2f} s, ORT U8S8 static {u8['wall_s']:.2f} s "
            f"(ratio {lw['wall_s'] / u8['wall_s']:.2f})."
        )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report: header with machine and versions, legend, one table per model."""
    e = results["environment"]
    usable = f", {e['cores_usable']} usable" if e.get("cores_usable") else ""
    lat = next(iter(results["models"].values()), {}).get("latency", {})
    seen: dict[str, str] = {}
    for res in results["models"].values():
        for cname, r in res["candidates"].items():
            seen.setdefault(cname, r["what"])
    lines = [
        "# onnxlw vs onnxruntime quantization",
        "",
        f"- date: {e['date']}",
        f"- machine: {e['machine']}; CPU {e['cpu']} ({e['cpu_int8_isa']}); "
        f"{e['cores']} cores{usable}",
        f"- versions: onnxlw {e['onnxlw']} (git {e['git'] or '?'}), onnxruntime "
        f"{e['onnxruntime']}, onnx {e['onnx']}, numpy {e['numpy']}, Python {e['python']}",
        f"- command: `{e['command']}`",
        f"- latency: batch 1, median of {lat.get('runs', '?')} runs per model, "
        f"{lat.get('threads', '?')} intra-op thread(s), all models of a table alternated in "
        "one process; ratios are candidate ÷ FP32",
        "- Δtop-1 in points vs FP32 on the same images; agree % = top-1 agreement with FP32; "
        "KL in nats, mean over images; size × = file bytes ÷ FP32 bytes",
        "- QLinearConv/Conv: integer/float convs in the graph ORT runs (ORT_ENABLE_ALL); "
        "`CI` = ConvInteger (dynamic quantization)",
        "- wall s: the tool's own time (onnxlw: compress + save; ORT: quant_pre_process + "
        "calibration + quantize + save), image decoding excluded",
        "",
        "Candidates:",
        "",
        *(f"- `{k}`: {v}" for k, v in seen.items()),
    ]
    for name, res in results["models"].items():
        lines += ["", render_model(name, res)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# driver


def run(opts: Options, on_model: Callable[[str, dict[str, Any]], None] | None = None) -> dict:
    """Benchmark every selected model; the JSON-ready results dict."""
    if not (opts.shared / "models").is_dir():
        raise FileNotFoundError(f"{opts.shared}/models not found (pass --shared DIR)")
    have = available_models(opts.shared)
    models = opts.models or have
    missing = [m for m in models if m not in have]
    if missing:
        raise ValueError(f"unknown model(s) {missing}; available: {', '.join(have)}")
    results: dict[str, Any] = {"environment": environment(opts.command), "models": {}}
    cache = ImageCache()
    with tempfile.TemporaryDirectory(prefix="onnxlw-bench-") as tmp:
        workdir = opts.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in models:
            ablate = opts.ablations and name in opts.ablation_models
            t0 = time.perf_counter()
            res = bench_model(name, opts, workdir, cache, ablate)
            res["bench_seconds"] = time.perf_counter() - t0
            results["models"][name] = res
            if on_model is not None:
                on_model(name, res)
    return results


def quick_options(**kw: Any) -> Options:
    """The ``--quick`` options: resnet20_cifar10, 500 CIFAR images, 20 latency runs."""
    base: dict[str, Any] = {**QUICK, "models": list(QUICK["models"]), "ablations": False}
    base.update(kw)
    return Options(**base)


def run_quick(shared: Path = DEFAULT_SHARED, workdir: Path | None = None) -> dict[str, Any]:
    """The numbers of ``--quick`` (same dict as ``--out-json``)."""
    return run(quick_options(shared=shared, workdir=workdir, command="tools/bench.py run_quick()"))


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder")
    ap.add_argument("--models", type=_csv, default=None, help="comma-separated model stems")
    ap.add_argument("--limit", type=int, default=None, help="evaluation images per model")
    ap.add_argument("--quick", action="store_true", help="resnet20_cifar10, 500 images, 20 runs")
    ap.add_argument("--ablations", action="store_true", help="add onnxlw ablation rows")
    ap.add_argument(
        "--ablation-models",
        type=_csv,
        default=list(DEFAULT_ABLATION_MODELS),
        help=f"models that get ablation rows (default {','.join(DEFAULT_ABLATION_MODELS)})",
    )
    ap.add_argument("--latency-runs", type=int, default=None, help="default 50 (quick: 20)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for latency")
    ap.add_argument("--workdir", type=Path, default=None, help="keep quantized models here")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    a = ap.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["bench.py", *argv])
    kw: dict[str, Any] = {
        "shared": a.shared,
        "ablations": a.ablations,
        "ablation_models": tuple(a.ablation_models),
        "threads": a.threads,
        "workdir": a.workdir,
        "command": command,
    }
    for key in ("models", "limit", "latency_runs"):  # explicit flags win over --quick
        if getattr(a, key) is not None:
            kw[key] = getattr(a, key)
    opts = quick_options(**kw) if a.quick else Options(**kw)
    if opts.limit is not None and opts.limit <= 0:
        ap.error("--limit must be positive")
    if opts.latency_runs < 1:
        ap.error("--latency-runs must be at least 1")
    t0 = time.perf_counter()
    try:
        results = run(opts, on_model=lambda n, r: print(render_model(n, r) + "\n", flush=True))
    except (FileNotFoundError, ValueError) as e:  # bad --shared / --models / sidecar
        ap.error(str(e))
    results["wall_seconds"] = time.perf_counter() - t0
    md = render_markdown(results)
    if a.out_md:
        a.out_md.write_text(md)
    if a.out_json:
        a.out_json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    _say(f"done in {results['wall_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
