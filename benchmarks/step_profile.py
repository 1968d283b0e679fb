"""Where one adaptation step's time goes: onnxruntime's profiler on both engines, torch.profiler
on EcoTTA in PyTorch, side by side in one process (issue 16, item 1).

    python -m benchmarks.step_profile                       # WRN-16-2 (built-in) and WRN-40-2 (untrained)
    python -m benchmarks.step_profile --models wrn16_2 --steps 5 --no-settings

For each model: the training engine (onnxruntime-training's Module on the bundle's lean training
graph) and the portable engine (the bundle's portable step on a plain InferenceSession), loaded
through ``edgetta.engines.select_engine`` with ``SessionOptions.enable_profiling`` set on
edgetta's own session options (one intra-op thread). A few warm-up steps, then N profiled steps:
per-op-type totals (ms per step, share of the summed kernel time), named groups (frozen input
gradients, mask packing and unpacking, layout reorders, ...) and the top nodes. The same
frames go through EcoTTA in PyTorch (``benchmarks.methods.create("ecotta_torch", ...)``) under
torch.profiler (self CPU time per aten op). Step times without a profiler are medians of
separate unprofiled runs; the settings table repeats them with onnxruntime's memory arena or
weight prepacking switched on. The micro-benchmark times a frozen 3x3 stride-1 convolution's
input gradient as ``ConvTranspose(dY, W)`` and as ``Conv(dY, W')`` (W' flipped and
channel-swapped) on the model's own shapes, each alone in a session.

Writes benchmarks/results/step_profile.json and docs/step_time.md (generated from it). The
process pins glibc's mmap threshold after the PyTorch runs, as the Adapter does.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import RESULTS, ROOT, HelpFormatter, export_cached_bundle, positive_int, run_cli
from edgetta.system import pin_mmap_threshold, write_text_atomic

DOC = ROOT / "docs" / "step_time.md"
OUT = RESULTS / "step_profile.json"
MODELS = ("wrn16_2", "wrn40_2")
ENGINES = ("ort-training", "onnx")
TOP_NODES = 10
UNPINNED = "ort-training, glibc's mmap threshold not pinned, stepped in turn with PyTorch"

# groups of nodes, by the names the exporter gives them (export/lean.py, export/portable.py) and
# onnxruntime's layout pass; the first rule that matches wins
GROUPS: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("frozen conv input gradient (lean ConvTranspose / depthwise Conv)",
     lambda name, op: name.endswith("ConvGrad_0_lean")),
    ("ReLU mask unpacking (BitShift, Cast, Transpose, ...)", lambda name, op: ".unpacked" in name and not name.endswith("_lean")),
    ("ReLU mask application (Mul)", lambda name, op: name.endswith("_lean")),
    ("ReLU mask packing (Greater, Cast, MatMulInteger, ...)", lambda name, op: ".mask" in name or ".band" in name),
    ("NCHWc layout reorders", lambda name, op: op in ("ReorderInput", "ReorderOutput")),
    ("meta conv gradients (ConvGrad)", lambda name, op: op == "ConvGrad"),
    ("portable step's standard-op replacements (BatchNorm, its gradient, meta ConvGrad, update)",
     lambda name, op: name.startswith("portable/")),
    ("meta BatchNorm and its gradient (training engine)",
     lambda name, op: op in ("BatchNormInternal", "BatchNormalizationGrad")),
    ("frozen forward convolutions (NCHWc Conv)", lambda name, op: op == "Conv" and name.endswith("_nchwc")),
    ("other forward and backward nodes", lambda name, op: True),
)


def group_of(name: str, op: str) -> str:
    return next(g for g, rule in GROUPS if rule(name, op))


@dataclass(frozen=True)
class Share:
    """A total per step: ms, share of the summed kernel time, and nodes per step."""
    name: str
    ms_per_step: float
    share: float
    nodes: int


@dataclass(frozen=True)
class NodeTime:
    name: str
    op: str
    group: str
    ms_per_step: float
    share: float
    input_shapes: list[list[int]]


@dataclass(frozen=True)
class EngineProfile:
    """onnxruntime's profile of ``steps`` steps of one engine (warm-up steps excluded)."""
    engine: str
    steps: int
    profiled_step_ms: float        # median wall time of a profiled step
    run_ms: float                  # median of the profiler's model_run events
    kernel_ms_per_step: float      # all node kernel times of a step, summed
    ops: list[Share]
    groups: list[Share]
    portable_replacements: list[Share]  # the group of nodes named portable/*, by op type
    top_nodes: list[NodeTime]
    frozen_input_gradients: list[NodeTime]  # every node of that group
    unpack_shifts: list[NodeTime]  # the first BitShift of every mask unpacking


@dataclass(frozen=True)
class TorchProfile:
    """torch.profiler's self CPU time per op over ``steps`` steps of EcoTTA in PyTorch."""
    steps: int
    profiled_step_ms: float
    self_cpu_ms_per_step: float
    ops: list[Share]


@dataclass(frozen=True)
class MicroResult:
    """One frozen conv's input gradient, dY (batch, C_out, H, W) -> dX, alone in a session."""
    batch: int
    c_in: int
    c_out: int
    hw: list[int]
    nodes_in_graph: int           # how many frozen input gradients of the model have this shape
    step_ms: float                # what those nodes took in the profiled training-engine step
    prepacking: bool
    conv_transpose_ms: float
    conv_ms: float
    conv_over_conv_transpose: float
    max_abs_diff: float


@dataclass
class ModelReport:
    model: str
    bundle: str
    batch: int
    threads: int
    warmup: int
    steps: int
    step_ms: dict[str, float] = field(default_factory=dict)        # unprofiled medians, by runner
    step_ms_all: dict[str, list[float]] = field(default_factory=dict)
    settings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> setting -> ms
    profiles: dict[str, EngineProfile] = field(default_factory=dict)
    torch: TorchProfile | None = None
    micro: list[MicroResult] = field(default_factory=list)
    unpack: list[UnpackResult] = field(default_factory=list)
    load_avg: list[float] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _interleaved(steppers: dict[str, Callable[[], Any]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Wall ms of ``steps`` calls of each stepper, taken in turn (A, B, A, B, ...) after
    ``warmup`` calls each, so that a change in the machine's load falls on all of them alike."""
    for step in steppers.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            t = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def _timed_steps(step: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    return _interleaved({"": step}, warmup, steps)[""]


def _engine_options(threads: int, memory_arena: bool = False, prepacking: bool = False,
                    profile_prefix: str | None = None) -> Any:
    from edgetta.engines import session_options
    opts = session_options(memory_arena, prepacking, threads)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


SETTINGS = {"edgetta defaults (arena off, prepacking off)": {}, "memory arena on": {"memory_arena": True},
            "prepacking on": {"prepacking": True}}


def time_engines(bundle_dir: Path, x: np.ndarray, warmup: int, steps: int, threads: int,
                 settings: dict[str, dict[str, bool]]) -> dict[tuple[str, str], list[float]]:
    """Wall ms of unprofiled steps, (engine, setting) -> times, every engine under every setting
    loaded at once and stepped in turn."""
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    bundle = Bundle.open(bundle_dir)
    runners = {(engine, label): select_engine(engine, bundle, "cpu", opts=_engine_options(threads, **kw))
               for engine in ENGINES for label, kw in settings.items()}
    times = _interleaved({k: (lambda r=r: r.step(x)) for k, r in runners.items()}, warmup, steps)
    del runners
    gc.collect()
    return times


def profile_engine(bundle_dir: Path, engine: str, x: np.ndarray, warmup: int, steps: int,
                   threads: int) -> EngineProfile:
    """Profile ``steps`` steps of ``engine`` on the bundle after ``warmup`` steps. onnxruntime
    writes its profile when the session is destroyed, so the engine is dropped before reading."""
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    with tempfile.TemporaryDirectory(prefix="edgetta-profile-") as tmp:
        prefix = str(Path(tmp) / "step")
        runner = select_engine(engine, Bundle.open(bundle_dir), "cpu",
                               opts=_engine_options(threads, profile_prefix=prefix))
        times = _timed_steps(lambda: runner.step(x), warmup, steps)
        del runner
        gc.collect()
        files = sorted(Path(tmp).glob("step*.json"))
        if not files:
            raise RuntimeError(f"onnxruntime wrote no profile for engine {engine}")
        events = [e for f in files for e in json.loads(f.read_text())]
    return summarize(engine, events, warmup, steps, times)


def summarize(engine: str, events: list[dict[str, Any]], warmup: int, steps: int,
              step_ms: Sequence[float]) -> EngineProfile:
    """Per-op, per-group and per-node totals of the node kernel events that fall inside the
    last ``steps`` model runs (earlier runs are the warm-up)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) != warmup + steps:
        raise RuntimeError(f"{engine}: the profile holds {len(runs)} runs, expected {warmup + steps}")
    kept = runs[warmup:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in kept]
    per_node: dict[str, float] = defaultdict(float)
    meta: dict[str, tuple[str, list[list[int]]]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        name = e["name"][:-len("_kernel_time")]
        per_node[name] += e["dur"] / 1e3
        if name not in meta:
            shapes = [list(next(iter(s.values()))) for s in e["args"].get("input_type_shape", [])]
            meta[name] = (e["args"]["op_name"], shapes)
    total = sum(per_node.values()) / steps

    def table(key: Callable[[str], str | None]) -> list[Share]:
        ms: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        for name, t in per_node.items():
            k = key(name)
            if k is not None:
                ms[k] += t / steps
                count[k] += 1
        return sorted((Share(k, round(v, 3), round(v / total, 4), count[k]) for k, v in ms.items()),
                      key=lambda s: -s.ms_per_step)

    def row(n: str, t: float) -> NodeTime:
        return NodeTime(n, meta[n][0], group_of(n, meta[n][0]), round(t / steps, 3), round(t / steps / total, 4),
                        meta[n][1])

    ranked = sorted(per_node.items(), key=lambda kv: -kv[1])
    return EngineProfile(
        engine=engine, steps=steps, profiled_step_ms=round(_median(step_ms), 2),
        run_ms=round(_median([r["dur"] / 1e3 for r in kept]), 2), kernel_ms_per_step=round(total, 2),
        ops=table(lambda n: meta[n][0]),
        groups=table(lambda n: group_of(n, meta[n][0])),
        portable_replacements=table(lambda n: meta[n][0] if n.startswith("portable/") else None),
        top_nodes=[row(n, t) for n, t in ranked[:TOP_NODES]],
        frozen_input_gradients=[row(n, t) for n, t in ranked if n.endswith("ConvGrad_0_lean")],
        unpack_shifts=[row(n, t) for n, t in ranked if meta[n][0] == "BitShift" and n.endswith(".high_node")])


def profile_torch(ckpt: dict[str, Any], hyper: Any, frames: np.ndarray, warmup: int, steps: int,
                  threads: int, alongside: dict[str, Callable[[], Any]] | None = None
                  ) -> tuple[dict[str, list[float]], TorchProfile]:
    """Unprofiled step times of EcoTTA in PyTorch (and of ``alongside``, stepped in turn with it)
    and torch.profiler's self CPU time per op."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.methods import create
    from edgetta_export.train import to_tensor
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    norm = ckpt["normalization"]
    x = to_tensor(frames, norm["mean"], norm["std"])  # as benchmarks.run_method feeds it
    method = create("ecotta_torch", ckpt, hyper=hyper)
    plain = _interleaved({"ecotta_torch": lambda: method.step(x), **(alongside or {})}, warmup, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = _timed_steps(lambda: method.step(x), 0, steps)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in rows)
    ops = sorted((Share(k, round(ms, 3), round(ms / total, 4), n) for k, ms, n in rows if ms > 0),
                 key=lambda s: -s.ms_per_step)
    return plain, TorchProfile(steps, round(_median(profiled), 2), round(total, 2), ops)


def stride1_input_gradients(bundle_dir: Path, profile: EngineProfile) -> dict[tuple[int, int, int, int], list[str]]:
    """(C_in, C_out, H, W) of dY -> the profiled frozen input gradients that the lean training
    graph computes as an ungrouped 3x3 stride-1 ConvTranspose (shapes from the profile,
    attributes from the graph)."""
    import onnx

    from edgetta.bundle import Bundle
    from edgetta_export.lean import node_attrs
    b = Bundle.open(bundle_dir)
    graph = onnx.load(str(b.file(b.manifest.graphs.training.file))).graph
    attrs = {n.name: node_attrs(n) for n in graph.node if n.op_type == "ConvTranspose"}
    found: dict[tuple[int, int, int, int], list[str]] = defaultdict(list)
    for node in profile.frozen_input_gradients:
        a = attrs.get(node.name)
        if a is None or len(node.input_shapes) < 2:
            continue
        dy, w = node.input_shapes[:2]
        if w[2:] != [3, 3] or set(a.get("strides", [1, 1])) != {1} or a.get("group", 1) != 1:
            continue
        found[(w[1], w[0], dy[2], dy[3])].append(node.name)  # ConvTranspose's W is the forward conv's (C_out, C_in, k, k)
    return dict(found)


def _one_graph_session(nodes: list[Any], x: np.ndarray, elem_type: int, consts: dict[str, np.ndarray],
                       threads: int, prepacking: bool = False) -> Any:
    """A session with edgetta's options on a graph of ``nodes`` from input "x" to output "y"."""
    from onnx import helper, numpy_helper

    from edgetta.ort import onnxruntime
    graph = helper.make_graph(nodes, "micro", [helper.make_tensor_value_info("x", elem_type, list(x.shape))],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnxruntime().InferenceSession(model.SerializeToString(), _engine_options(threads, prepacking=prepacking),
                                          providers=["CPUExecutionProvider"])


def _race(sessions: dict[str, Any], x: np.ndarray, repeats: int) -> tuple[dict[str, float], float]:
    """Median ms per run of each session (run in turn), and the largest difference of their outputs."""
    outs = [s.run(None, {"x": x})[0] for s in sessions.values()]
    times = _interleaved({k: (lambda s=s: s.run(None, {"x": x})) for k, s in sessions.items()}, 1, repeats)
    diff = max(float(np.abs(o.astype(np.float64) - outs[0]).max()) for o in outs)
    return {k: _median(t) for k, t in times.items()}, diff


def conv_transpose_vs_conv(c_in: int, c_out: int, hw: tuple[int, int], batch: int, threads: int,
                           prepacking: bool, repeats: int, nodes: int = 1, step_ms: float = 0.0) -> MicroResult:
    """A frozen 3x3 stride-1 conv's input gradient two ways, each alone in a session with
    edgetta's settings: ConvTranspose(dY, W) and Conv(dY, W') with W' = W flipped in both
    spatial axes and its two channel axes swapped. Median ms of ``repeats`` runs each."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((batch, c_out, *hw)).astype(np.float32)
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    sessions = {op: _one_graph_session([helper.make_node(op, ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                                       dy, TensorProto.FLOAT, {"w": weight}, threads, prepacking)
                for op, weight in (("ConvTranspose", w), ("Conv", flipped))}
    ms, diff = _race(sessions, dy, repeats)
    return MicroResult(batch, c_in, c_out, list(hw), nodes, round(step_ms, 3), prepacking, round(ms["ConvTranspose"], 3),
                       round(ms["Conv"], 3), round(ms["Conv"] / ms["ConvTranspose"], 3), diff)


@dataclass(frozen=True)
class UnpackResult:
    """Unpacking one bit-packed ReLU mask (batch, bytes) to float 0/1 (batch, 8 * bytes)."""
    batch: int
    mask_bytes: int               # per sample
    masks_in_graph: int           # unpackings of this size in the profiled training-engine step
    bitshift_ms: float            # lean's chain: Reshape, BitShift left, BitShift right, Cast
    gather_ms: float              # one Gather from a 256 x 8 float table
    gather_over_bitshift: float
    max_abs_diff: float


def unpack_bitshift_vs_gather(batch: int, mask_bytes: int, threads: int, repeats: int, count: int = 1) -> UnpackResult:
    """The lean graph's unpacking of a packed mask (for masks taken in NCHW order) against a
    Gather of each byte's row of a constant 256 x 8 table of its bits, as 0.0/1.0 (after a Cast
    of the bytes to int32 indices)."""
    from onnx import TensorProto, helper
    bits = np.random.default_rng(0).integers(0, 256, (batch, mask_bytes), dtype=np.uint8)
    table = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.float32)
    chain = [helper.make_node("Reshape", ["x", "rows"], ["b"]),
             helper.make_node("BitShift", ["b", "left"], ["h"], direction="LEFT"),
             helper.make_node("BitShift", ["h", "right"], ["u"], direction="RIGHT"),
             helper.make_node("Cast", ["u"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["f", "flat"], ["y"])]
    lookup = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),  # Gather's indices are int32/int64
              helper.make_node("Gather", ["table", "i"], ["g"], axis=0), helper.make_node("Reshape", ["g", "flat"], ["y"])]
    flat = np.array([batch, -1], np.int64)
    sessions = {
        "bitshift": _one_graph_session(chain, bits, TensorProto.UINT8, {
            "rows": np.array([batch, -1, 1], np.int64), "left": (7 - np.arange(8)).reshape(1, 8).astype(np.uint8),
            "right": np.array(7, np.uint8), "flat": flat}, threads),
        "gather": _one_graph_session(lookup, bits, TensorProto.UINT8, {"table": table, "flat": flat}, threads)}
    ms, diff = _race(sessions, bits, repeats)
    return UnpackResult(batch, mask_bytes, count, round(ms["bitshift"], 3), round(ms["gather"], 3),
                        round(ms["gather"] / ms["bitshift"], 3), diff)


def unpack_sizes(profile: EngineProfile) -> dict[int, int]:
    """Bytes per sample of every packed mask the profiled step unpacked -> how many."""
    sizes: dict[int, int] = defaultdict(int)
    for node in profile.unpack_shifts:
        sizes[node.input_shapes[0][1]] += 1
    return dict(sizes)


def model_bundle(model: str) -> tuple[dict[str, Any], Path]:
    """The checkpoint and its cached bundle (with the portable step): the built-in checkpoint
    for wrn16_2, benchmarks.common's untrained recipe for any other zoo model."""
    from benchmarks.common import untrained_checkpoint
    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT
    ckpt = checkpoint.load(DEFAULT_CHECKPOINT)
    if ckpt["model"] != model:
        ckpt = untrained_checkpoint(model)
    return ckpt, export_cached_bundle(ckpt, f"step_profile_{model}", portable=True)


def frames_for(bundle_dir: Path, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 NHWC frames of the bundle's input size and their preprocessed NCHW tensor."""
    from edgetta.bundle import Bundle
    from edgetta.preprocess import preprocess
    b = Bundle.open(bundle_dir)
    h, w = b.input_size
    frames = np.random.default_rng(seed).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    return frames, preprocess(frames, b.manifest.input.as_dict())


def run(models: Sequence[str], batch: int, warmup: int, steps: int, threads: int, *, torch_on: bool = True,
        settings_on: bool = True, micro_on: bool = True, micro_repeats: int = 10,
        bundles: dict[str, tuple[dict[str, Any], Path]] | None = None) -> list[ModelReport]:
    """Every measurement for ``models``; ``bundles`` (model -> checkpoint, bundle) replaces the
    cached bundles (the tests' tiny one). PyTorch runs first, with glibc's default allocator
    settings; then the mmap threshold is pinned as the Adapter pins it, and onnxruntime runs."""
    from benchmarks.methods import EcoTTASettings
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    bundles = bundles or {m: model_bundle(m) for m in models}
    reports = {m: ModelReport(m, os.path.relpath(bundles[m][1], ROOT), batch, threads, warmup, steps)
               for m in models}
    inputs = {m: frames_for(bundles[m][1], batch) for m in models}
    if torch_on:
        for m in models:
            ckpt, bundle_dir = bundles[m]
            hyper = EcoTTASettings.from_manifest(json.loads((bundle_dir / "manifest.json").read_text()))
            # the training engine alongside, before the mmap threshold is pinned: a ratio to
            # PyTorch that the machine's load cannot skew
            runner = select_engine("ort-training", Bundle.open(bundle_dir), "cpu", opts=_engine_options(threads))
            x = inputs[m][1]
            plain, prof = profile_torch(ckpt, hyper, inputs[m][0], warmup, steps, threads,
                                        {UNPINNED: lambda: runner.step(x)})
            del runner
            for k, v in plain.items():
                reports[m].step_ms_all[k] = [round(t, 2) for t in v]
            reports[m].torch = prof
            reports[m].load_avg.append(round(os.getloadavg()[0], 2))
    pin_mmap_threshold()
    for m in models:
        r, bundle_dir, x = reports[m], bundles[m][1], inputs[m][1]
        default = next(iter(SETTINGS))
        times = time_engines(bundle_dir, x, warmup, steps, threads,
                             SETTINGS if settings_on else {default: SETTINGS[default]})
        r.load_avg.append(round(os.getloadavg()[0], 2))
        for engine in ENGINES:
            r.step_ms_all[engine] = [round(t, 2) for t in times[(engine, default)]]
            if settings_on:
                r.settings_ms[engine] = {label: round(_median(times[(engine, label)]), 2) for label in SETTINGS}
        for engine in ENGINES:
            r.profiles[engine] = profile_engine(bundle_dir, engine, x, warmup, steps, threads)
            r.load_avg.append(round(os.getloadavg()[0], 2))
        r.step_ms = {k: round(_median(v), 2) for k, v in r.step_ms_all.items()}
        if micro_on:
            profile = r.profiles["ort-training"]
            node_ms = {n.name: n.ms_per_step for n in profile.frozen_input_gradients}
            for (c_in, c_out, h, w), names in sorted(stride1_input_gradients(bundle_dir, profile).items()):
                for prepacking in (False, True):
                    r.micro.append(conv_transpose_vs_conv(c_in, c_out, (h, w), batch, threads, prepacking,
                                                          micro_repeats, len(names), sum(node_ms[n] for n in names)))
            for size, count in sorted(unpack_sizes(profile).items()):
                r.unpack.append(unpack_bitshift_vs_gather(batch, size, threads, micro_repeats, count))
            r.load_avg.append(round(os.getloadavg()[0], 2))
    return [reports[m] for m in models]


def to_json(reports: Sequence[ModelReport], command: str) -> dict[str, Any]:
    import onnxruntime
    versions = {"onnxruntime": onnxruntime.__version__}
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return {"command": command, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]},
            "versions": versions, "models": [asdict(r) for r in reports]}


# ---- docs/step_time.md, generated from the JSON ----------------------------------------------

def _share_rows(rows: list[dict[str, Any]], limit: int) -> list[str]:
    out = ["| | ms / step | share | nodes (calls) per step |", "|---|---|---|---|"]
    shown = rows[:limit]
    out += [f"| {r['name']} | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% | {r['nodes']} |" for r in shown]
    rest = rows[limit:]
    if rest:
        out.append(f"| (other {len(rest)}) | {sum(r['ms_per_step'] for r in rest):.1f} | "
                   f"{100 * sum(r['share'] for r in rest):.1f}% | {sum(r['nodes'] for r in rest)} |")
    return out


def _op_ms(profile: dict[str, Any], op: str) -> float:
    return next((r["ms_per_step"] for r in profile["ops"] if r["name"] == op), 0.0)


def _group(profile: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next((g for g in profile["groups"] if g["name"].startswith(prefix)),
                {"name": prefix, "ms_per_step": 0.0, "share": 0.0, "nodes": 0})


def _reading(m: dict[str, Any]) -> list[str]:
    """The short reading of one model's tables: every figure comes from the report."""
    tr, po = m["profiles"]["ort-training"], m["profiles"]["onnx"]
    ms = m["step_ms"]
    lines = []
    if "ecotta_torch" in ms:
        lines.append(f"- Step, unprofiled medians: stepped in turn with PyTorch (neither process-wide "
                     f"allocator setting changed), the training engine took {ms[UNPINNED]:.0f} ms and EcoTTA in "
                     f"PyTorch {ms['ecotta_torch']:.0f} ms: {ms[UNPINNED] / ms['ecotta_torch']:.2f}x PyTorch "
                     f"(issue 16 wants at most 1.0).")
    lines.append(f"- Stepped in turn, with the mmap threshold pinned as the Adapter pins it: training engine "
                 f"{ms['ort-training']:.0f} ms, portable {ms['onnx']:.0f} ms, "
                 f"{ms['onnx'] / ms['ort-training']:.2f}x the training engine (issue 16 wants at most 1.2).")
    for label, p in (("training engine", tr), ("portable engine", po)):
        top = ", ".join(f"{g['name'].split(' (')[0]} {100 * g['share']:.0f}%" for g in p["groups"][:4])
        lines.append(f"- Largest groups, {label}: {top}.")
    fig = _group(tr, "frozen conv input gradient")
    unpack, pack, apply = _group(tr, "ReLU mask unpacking"), _group(tr, "ReLU mask packing"), _group(tr, "ReLU mask application")
    reorder = _group(tr, "NCHWc layout reorders")
    mask_ms = unpack["ms_per_step"] + pack["ms_per_step"] + apply["ms_per_step"]
    mask_share = unpack["share"] + pack["share"] + apply["share"]
    lines.append(f"- Upper bounds of item 1's candidates on the training engine (the share a candidate's "
                 f"nodes take; removing them entirely saves at most that): frozen input gradients "
                 f"{fig['ms_per_step']:.0f} ms ({100 * fig['share']:.0f}%), the ReLU masks "
                 f"(packing {100 * pack['share']:.0f}%, unpacking {100 * unpack['share']:.0f}%, applying "
                 f"{100 * apply['share']:.0f}%: {mask_ms:.0f} ms, {100 * mask_share:.0f}% together), NCHWc layout "
                 f"reorders {reorder['ms_per_step']:.0f} ms ({100 * reorder['share']:.0f}%).")
    rep = _group(po, "portable step's")
    if rep["ms_per_step"]:
        conv = next((r for r in po["portable_replacements"] if r["name"] == "Conv"), None)
        extra = (f"; its Conv nodes (the meta convolutions' weight gradients as a Conv of transposed "
                 f"tensors) {conv['ms_per_step']:.0f} ms" if conv else "")
        lines.append(f"- The portable step's own replacement nodes take {rep['ms_per_step']:.0f} ms "
                     f"({100 * rep['share']:.0f}%) where the training engine runs onnxruntime-training's "
                     f"fused kernels (meta ConvGrad {_op_ms(tr, 'ConvGrad'):.0f} ms, BatchNorm and its gradient "
                     f"{_op_ms(tr, 'BatchNormInternal') + _op_ms(tr, 'BatchNormalizationGrad'):.0f} ms){extra}.")
    settings = m.get("settings_ms") or {}
    for engine, label in (("ort-training", "training"), ("onnx", "portable")):
        s = settings.get(engine)
        if s:
            base = s["edgetta defaults (arena off, prepacking off)"]
            parts = ", ".join(f"{k} {v:.0f} ms ({v / base:.2f}x)" for k, v in s.items() if not k.startswith("edgetta"))
            lines.append(f"- Settings, {label} engine (unprofiled): defaults {base:.0f} ms; {parts}.")
    micro = [r for r in m["micro"] if not r["prepacking"]]
    if micro:
        ct = _op_ms(tr, "ConvTranspose")
        saved = sum(r["step_ms"] * (1 - r["conv_over_conv_transpose"]) for r in micro)
        alone = sum(r["step_ms"] for r in micro)
        lines.append(f"- Micro-benchmark (prepacking off, as edgetta runs): the stride-1 3x3 frozen input "
                     f"gradients as Conv with flipped, channel-swapped weights take "
                     + ", ".join(f"{r['conv_over_conv_transpose']:.2f}x" for r in micro)
                     + " the ConvTranspose time on the shapes below; applied to what those nodes took in "
                     f"the profiled step ({alone:.0f} ms of the step's {ct:.0f} ms of ConvTranspose), that "
                     f"would change the step by {-saved:+.0f} ms, before any reorders a Conv adds in the "
                     f"whole graph. The flipped copies of those weights would add "
                     f"{sum(r['nodes_in_graph'] * r['c_in'] * r['c_out'] * 9 * 4 for r in micro) / 2**20:.1f} MiB "
                     "(dense float32) unless the forward Conv's copy is dropped (item 2).")
    unpack = m.get("unpack") or []
    if unpack:
        group = _group(tr, "ReLU mask unpacking")
        saved = sum(r["masks_in_graph"] * (r["bitshift_ms"] - r["gather_ms"]) for r in unpack)
        chain = sum(r["masks_in_graph"] * r["bitshift_ms"] for r in unpack)
        lines.append(f"- Micro-benchmark, mask unpacking: one Gather from a 256 x 8 table takes "
                     + ", ".join(f"{r['gather_over_bitshift']:.2f}x" for r in unpack)
                     + f" the time of lean's BitShift chain on the mask sizes below; over the step's "
                     f"{sum(r['masks_in_graph'] for r in unpack)} unpackings it would save about {saved:.0f} ms of "
                     f"the chain's {chain:.0f} ms measured alone (the profiled unpacking group: "
                     f"{group['ms_per_step']:.0f} ms per step, including the NHWC masks' byte transposes, which "
                     "this does not measure).")
    if micro and unpack and UNPINNED in ms:
        both = (sum(r["step_ms"] * (1 - r["conv_over_conv_transpose"]) for r in micro)
                + sum(r["masks_in_graph"] * (r["bitshift_ms"] - r["gather_ms"]) for r in unpack))
        gap = ms[UNPINNED] - ms["ecotta_torch"]
        against = (f"against a gap to PyTorch of {gap:.0f} ms ({both / gap:.0%} of it; the two figures come from "
                   "different phases of one run)" if gap > 0 else "(the training engine is already no slower than "
                   "PyTorch here)")
        lines.append(f"- Both measured candidates together: about {both:.0f} ms per step, {against}.")
    return lines


def render(report: dict[str, Any]) -> str:
    """docs/step_time.md from a step_profile.json report."""
    out = ["# Where the adaptation step's time goes",
           "",
           "Generated by `python -m benchmarks.step_profile` from `benchmarks/results/step_profile.json`; do "
           "not edit by hand. Issue 16, item 1: measurement only, nothing here changes the graphs.",
           "",
           f"Command: `{report['command']}`. Machine: {report['machine']['platform']}, "
           f"{report['machine']['cpus']} CPUs shared with other jobs (load average per phase is listed "
           f"under each model; timings are noisy, ratios within one run are what to compare). "
           f"Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
           "",
           "How: each engine is loaded through `edgetta.engines.select_engine` with edgetta's session "
           "options plus `enable_profiling`; onnxruntime-training's Module gets them through "
           "`session_options=`. Warm-up steps are dropped; ms per step are node kernel times summed "
           "over the profiled steps and divided by their number; shares are of the summed kernel time. "
           "Frames are random uint8 images (time does not depend on pixel values). PyTorch's figures "
           "are torch.profiler's self CPU time per op.",
           ""]
    for m in report["models"]:
        tr, po = m["profiles"]["ort-training"], m["profiles"]["onnx"]
        out += [f"## {m['model']}, batch {m['batch']}, {m['threads']} thread(s)", "",
                f"Bundle `{m['bundle']}`; {m['warmup']} warm-up then {m['steps']} measured steps per run; "
                f"load average (1 min) after each phase: {', '.join(str(v) for v in m['load_avg'])}.", "",
                "Unprofiled steps: the runners of one table section were loaded together and stepped in "
                "turn. The first two rows ran with glibc's mmap threshold pinned (as the Adapter runs), "
                "after the PyTorch rows (which ran with glibc's defaults).", "",
                "| runner | step ms, unprofiled (median) | profiled step ms | kernel ms summed |",
                "|---|---|---|---|"]
        for name, label in (("ort-training", "training engine"), ("onnx", "portable engine")):
            p = m["profiles"][name]
            out.append(f"| {label} | {m['step_ms'][name]:.1f} | {p['profiled_step_ms']:.1f} | {p['kernel_ms_per_step']:.1f} |")
        if m.get("torch"):
            t = m["torch"]
            out.append(f"| EcoTTA in PyTorch | {m['step_ms']['ecotta_torch']:.1f} | {t['profiled_step_ms']:.1f} | "
                       f"{t['self_cpu_ms_per_step']:.1f} (self CPU) |")
            out.append(f"| training engine, stepped in turn with PyTorch, mmap threshold not pinned | "
                       f"{m['step_ms'][UNPINNED]:.1f} | | |")
        out += ["", "Reading:", "", *_reading(m), ""]
        for label, p in (("training engine", tr), ("portable engine", po)):
            out += [f"### {label}: groups", "", *_share_rows(p["groups"], 20), "",
                    f"### {label}: op types", "", *_share_rows(p["ops"], 15), ""]
            if p["portable_replacements"]:
                out += [f"### {label}: the replacement nodes (portable/*) by op type", "",
                        *_share_rows(p["portable_replacements"], 10), ""]
            out += [f"### {label}: top {len(p['top_nodes'])} nodes", "",
                    "| node | op | ms / step | share | input shapes |", "|---|---|---|---|---|"]
            out += [f"| `{n['name']}` | {n['op']} | {n['ms_per_step']:.2f} | {100 * n['share']:.1f}% | "
                    f"{' '.join('x'.join(map(str, s)) for s in n['input_shapes'])} |" for n in p["top_nodes"]]
            out.append("")
        if m.get("torch"):
            out += ["### EcoTTA in PyTorch: ops by self CPU time", "", *_share_rows(m["torch"]["ops"], 15), ""]
        if m["settings_ms"]:
            out += ["### onnxruntime settings (unprofiled step ms, median)", "",
                    "| engine | " + " | ".join(next(iter(m["settings_ms"].values()))) + " |",
                    "|---|" + "---|" * len(next(iter(m["settings_ms"].values())))]
            out += [f"| {e} | " + " | ".join(f"{v:.1f}" for v in s.values()) + " |" for e, s in m["settings_ms"].items()]
            out.append("")
        if m["micro"]:
            out += ["### Micro-benchmark: a frozen conv's input gradient, ConvTranspose vs Conv", "",
                    "dY of shape (batch, C_out, H, W) to dX, 3x3, stride 1, pad 1, each op alone in a session "
                    "with edgetta's options and one thread (the Conv gets onnxruntime's NCHWc reorders "
                    "around it); Conv's weights are the ConvTranspose's flipped and channel-swapped. "
                    "`nodes` is how many frozen input gradients of this shape the lean graph has, `in step` what "
                    "they took in the profiled training-engine step.", "",
                    "| C_in | C_out | H x W | nodes | in step ms | prepacking | ConvTranspose ms | Conv ms | Conv / ConvTranspose | max abs diff |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['c_in']} | {r['c_out']} | {r['hw'][0]}x{r['hw'][1]} | {r['nodes_in_graph']} | {r['step_ms']:.1f} | "
                    f"{'on' if r['prepacking'] else 'off'} | {r['conv_transpose_ms']:.2f} | {r['conv_ms']:.2f} | "
                    f"{r['conv_over_conv_transpose']:.2f} | {r['max_abs_diff']:.1e} |" for r in m["micro"]]
            out.append("")
        if m.get("unpack"):
            out += ["### Micro-benchmark: unpacking a bit-packed ReLU mask, BitShift chain vs Gather", "",
                    "(batch, bytes) uint8 to (batch, 8 x bytes) float 0/1, alone in a session with edgetta's "
                    "options and one thread: lean's chain for NCHW masks (Reshape, BitShift left by 7-k, "
                    "BitShift right by 7, Cast, Reshape) against Cast to int32, Gather from a 256 x 8 float "
                    "table, Reshape. `masks` is how many unpackings of that size one profiled step ran.", "",
                    "| bytes / sample | masks | BitShift chain ms | Gather ms | Gather / chain | max abs diff |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['mask_bytes']} | {r['masks_in_graph']} | {r['bitshift_ms']:.2f} | {r['gather_ms']:.2f} | "
                    f"{r['gather_over_bitshift']:.2f} | {r['max_abs_diff']:.1e} |" for r in m["unpack"]]
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="zoo models: the built-in checkpoint's model (wrn16_2) or untrained ones")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--micro-repeats", type=positive_int, default=10)
    p.add_argument("--no-torch", action="store_true", help="skip EcoTTA in PyTorch")
    p.add_argument("--no-settings", action="store_true", help="skip the arena / prepacking timings")
    p.add_argument("--no-micro", action="store_true", help="skip the ConvTranspose-vs-Conv micro-benchmark")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--doc", type=Path, default=DOC, help="markdown written from the report")
    p.add_argument("--render-only", action="store_true", help="only write --doc from the existing --out report")
    a = p.parse_args(argv)
    if a.render_only:
        write_text_atomic(a.doc, render(json.loads(a.out.read_text())) + "\n")
        print(f"wrote {a.doc}")
        return 0
    command = "python -m benchmarks.step_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    reports = run(a.models, a.batch, a.warmup, a.steps, a.threads, torch_on=not a.no_torch,
                  settings_on=not a.no_settings, micro_on=not a.no_micro, micro_repeats=a.micro_repeats)
    data = to_json(reports, command.strip())
    write_text_atomic(a.out, json.dumps(data, indent=1))
    write_text_atomic(a.doc, render(data) + "\n")
    print(f"wrote {a.out} and {a.doc}")
    return 0


if __name__ == "__main__":
    run_cli(main)
