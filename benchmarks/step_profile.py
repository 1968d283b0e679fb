"""Where one adaptation step's time goes, before and after the lean graph's speed rewrites
(issue 16): onnxruntime's profiler on both engines, torch.profiler on EcoTTA in PyTorch, side by
side in one process.

    python -m benchmarks.step_profile                       # WRN-16-2 (built-in) and WRN-40-2 (untrained)
    python -m benchmarks.step_profile --models wrn28_10 --warmup 1 --steps 3 --add

Each model is exported twice: with export/lean.py's defaults ("after") and with its speed
rewrites off (``BEFORE``: ConvTranspose input gradients, BitShift mask unpacking). Engines are
loaded through ``edgetta.engines.select_engine`` with edgetta's own session options (one
intra-op thread). Phase 1: EcoTTA in PyTorch (``benchmarks.methods.create("ecotta_torch", ...)``)
stepped in turn with the training engine of both variants, glibc's allocator as it is; then
torch.profiler's self CPU time per aten op. Phase 2 (glibc's mmap threshold pinned, as the
Adapter does): both engines of both variants stepped in turn. Phase 3: onnxruntime's profile of
each (per op type, named groups, top nodes). Optional: the onnxruntime settings (arena,
prepacking), the micro-benchmarks that chose the rewrites (on the graph before them); by default
the memory of each engine and variant in a fresh process.

Writes benchmarks/results/step_profile.json and docs/step_time.md (generated from it).
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
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import RESULTS, ROOT, HelpFormatter, export_cached_bundle, positive_int, run_cli
from edgetta.system import pin_mmap_threshold, write_text_atomic
from edgetta_export.lean import LeanOptions

DOC = ROOT / "docs" / "step_time.md"
OUT = RESULTS / "step_profile.json"
MODELS = ("wrn16_2", "wrn40_2")
ENGINES = ("ort-training", "onnx")
TOP_NODES = 10
SUBGRAPH_OPS = ("Loop", "If", "Scan")  # onnxruntime's kernel time of these includes their bodies' nodes
UNPINNED = "ort-training, glibc's mmap threshold not pinned, stepped in turn with PyTorch"

# groups of nodes, by the names the exporter gives them (export/lean.py, export/portable.py) and
# onnxruntime's layout pass; the first rule that matches wins
GROUPS: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    # onnxruntime's NCHWc pass appends _nchwc to the Conv nodes it converts
    ("frozen conv input gradient (Conv of flipped kernels, or ConvTranspose)",
     lambda name, op: "ConvGrad_0_lean" in name),
    ("ReLU mask unpacking (Gather or BitShift, Cast, Transpose, ...)", lambda name, op: ".unpacked" in name and not name.endswith("_lean")),
    ("ReLU mask application (Mul)", lambda name, op: name.endswith("_lean")),
    ("ReLU mask packing (Greater, Cast, MatMulInteger, ...)", lambda name, op: ".mask" in name or ".band" in name),
    ("NCHWc layout reorders", lambda name, op: op in ("ReorderInput", "ReorderOutput")),
    ("meta conv gradients (ConvGrad; dX apart where merged)",
     lambda name, op: op == "ConvGrad" or "_input_gradient" in name),
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
    unpack_heads: list[NodeTime]   # per mask unpacking, its Gather (or first BitShift, before)


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


@dataclass(frozen=True)
class MemoryResult:
    """One engine's adaptation steps in a fresh, torch-free process
    (``edgetta.profile.measure_step``), in MiB."""
    variant: str                  # "before" or "after" the speed rewrites
    engine: str
    rss_loaded_mib: float         # the process with the engine loaded
    peak_after_step_mib: float    # the peak over the steps (reset after loading)
    step_growth_mib: float        # that peak minus the loaded process
    flipped_weight_mib: float     # the export-time flipped kernels the lean graph holds (dense)


@dataclass
class ModelReport:
    model: str
    bundle: str                   # after the speed rewrites (export/lean.py's defaults)
    bundle_before: str            # the same checkpoint exported with them off (BEFORE)
    batch: int
    threads: int
    warmup: int
    steps: int
    command: str = ""
    backbone_norm: str = ""       # the EcoTTA variant the bundles hold (manifest ecotta.backbone_norm)
    step_ms: dict[str, float] = field(default_factory=dict)        # unprofiled medians, by runner
    step_ms_all: dict[str, list[float]] = field(default_factory=dict)
    settings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> setting -> ms
    profiles: dict[str, EngineProfile] = field(default_factory=dict)
    profiles_before: dict[str, EngineProfile] = field(default_factory=dict)
    torch: TorchProfile | None = None
    micro: list[MicroResult] = field(default_factory=list)
    unpack: list[UnpackResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)
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


def time_engines(bundle_dirs: dict[str, Path], x: np.ndarray, warmup: int, steps: int, threads: int,
                 settings: dict[str, dict[str, bool]]) -> dict[tuple[str, str, str], list[float]]:
    """Wall ms of unprofiled steps, (engine, variant, setting) -> times: every engine of every
    bundle variant under edgetta's defaults, and of the last variant under every setting, all
    loaded at once and stepped in turn."""
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    last = list(bundle_dirs)[-1]
    default = next(iter(settings))
    runners = {(engine, variant, label): select_engine(engine, Bundle.open(path), "cpu",
                                                       opts=_engine_options(threads, **kw))
               for engine in ENGINES for variant, path in bundle_dirs.items()
               for label, kw in settings.items() if label == default or variant == last}
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
    return summarize(engine, events, warmup, steps, times, layout_renames(bundle_dir, engine))


def layout_renames(bundle_dir: Path, engine: str) -> dict[str, str]:
    """onnxruntime's x86 NCHWc pass renames every Conv it converts after its output
    (``<output>_nchwc``): the lean graph's input-gradient Convs, by those names."""
    import onnx

    from edgetta.bundle import Bundle
    b = Bundle.open(bundle_dir)
    graphs = b.manifest.graphs
    spec = graphs.training if engine == "ort-training" else graphs.portable_step
    graph = onnx.load(str(b.file(spec.file)), load_external_data=False).graph
    return {n.output[0] + "_nchwc": n.name for n in graph.node
            if n.op_type == "Conv" and "ConvGrad_0_lean" in n.name}


def summarize(engine: str, events: list[dict[str, Any]], warmup: int, steps: int,
              step_ms: Sequence[float], renames: dict[str, str] | None = None) -> EngineProfile:
    """Per-op, per-group and per-node totals of the node kernel events that fall inside the
    last ``steps`` model runs (earlier runs are the warm-up); ``renames`` gives nodes that
    onnxruntime renamed their names in the graph."""
    renames = renames or {}
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
        if e["args"].get("op_name") in SUBGRAPH_OPS:  # its body's nodes are reported one by one
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        name = e["name"][:-len("_kernel_time")]
        name = renames.get(name, name)
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
        frozen_input_gradients=[row(n, t) for n, t in ranked if "ConvGrad_0_lean" in n],
        unpack_heads=[row(n, t) for n, t in ranked if _unpack_head(n, meta[n][0])])


def _unpack_head(name: str, op: str) -> bool:
    """The node that expands a packed mask's bytes (export/lean.py's names)."""
    return ".unpacked" in name and ((op == "BitShift" and name.endswith(".high_node"))
                                    or (op == "Gather" and name.endswith((".u8_node", ".flat_node"))))


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
    for node in profile.unpack_heads:  # BitShift reads (N, bytes, 1); Gather the table, then (N, bytes)
        sizes[node.input_shapes[0 if node.op == "BitShift" else 1][1]] += 1
    return dict(sizes)


VARIANTS = ("before", "after")
# the graphs as they were before issue 16's rewrites: ConvTranspose input gradients (depthwise
# ones at stride 1 excepted), masks unpacked by two BitShifts, the portable step's meta conv
# weight gradients as a Conv of transposed tensors
BEFORE = LeanOptions(conv_input_gradients=False, gather_unpack=False, portable_gradients=False, activation_bits=None,
                     fast_elementwise=False, wide_mask_packing=False, declared_unpack_shapes=False,
                     merged_weight_gradients=False, memory_order=False)


def key(runner: str, variant: str) -> str:
    """A runner's key in ``ModelReport.step_ms``: the name alone after the rewrites."""
    return runner if variant == "after" else f"{runner}, before"


def model_bundle(model: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """The checkpoint and its cached bundles (with the portable step), before and after the
    speed rewrites: the built-in checkpoint for wrn16_2, benchmarks.common's untrained recipe
    for any other zoo model."""
    from benchmarks.common import untrained_checkpoint
    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT
    ckpt = checkpoint.load(DEFAULT_CHECKPOINT)
    if ckpt["model"] != model:
        ckpt = untrained_checkpoint(model)
    return ckpt, {"before": export_cached_bundle(ckpt, f"step_profile_{model}_before", portable=True,
                                                 lean_options=BEFORE),
                  "after": export_cached_bundle(ckpt, f"step_profile_{model}", portable=True)}


def frames_for(bundle_dir: Path, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 NHWC frames of the bundle's input size and their preprocessed NCHW tensor."""
    from edgetta.bundle import Bundle
    from edgetta.preprocess import preprocess
    b = Bundle.open(bundle_dir)
    h, w = b.input_size
    frames = np.random.default_rng(seed).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    return frames, preprocess(frames, b.manifest.input.as_dict())


def measure_memory(bundle_dirs: dict[str, Path], batch: int) -> list[MemoryResult]:
    """Each engine of each variant in a fresh process: RSS once loaded and the steps' peak."""
    from edgetta.profile import MIB, measure_step
    out = []
    for variant, path in bundle_dirs.items():
        rewrites = json.loads((path / "manifest.json").read_text())["training_graph"]["rewrites"]
        flipped = rewrites.get("flipped_weight_bytes", 0) / MIB
        for engine in ENGINES:
            m = measure_step(path, batch, engine=engine)
            out.append(MemoryResult(variant, engine, round(m["rss_loaded"] / MIB, 1),
                                    round(m["peak_after_step"] / MIB, 1), round(m["step_peak"] / MIB, 1),
                                    round(flipped, 2)))
    return out


def run(models: Sequence[str], batch: int, warmup: int, steps: int, threads: int, *, torch_on: bool = True,
        settings_on: bool = True, micro_on: bool = True, micro_repeats: int = 10, memory_on: bool = True,
        bundles: dict[str, tuple[dict[str, Any], dict[str, Path]]] | None = None,
        command: str = "") -> list[ModelReport]:
    """Every measurement for ``models``, each on its bundles before and after the speed rewrites;
    ``bundles`` (model -> checkpoint, {"before": path, "after": path}) replaces the cached
    bundles (the tests' tiny ones). PyTorch runs first, with glibc's default allocator settings,
    stepped in turn with the training engine of both variants; then the mmap threshold is pinned
    as the Adapter pins it, and both engines of both variants are stepped in turn."""
    from benchmarks.methods import EcoTTASettings
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    bundles = bundles or {m: model_bundle(m) for m in models}
    reports = {m: ModelReport(m, os.path.relpath(bundles[m][1]["after"], ROOT),
                              os.path.relpath(bundles[m][1]["before"], ROOT), batch, threads, warmup, steps, command)
               for m in models}
    inputs = {m: frames_for(bundles[m][1]["after"], batch) for m in models}
    for m in models:
        manifest = json.loads((bundles[m][1]["after"] / "manifest.json").read_text())
        reports[m].backbone_norm = manifest["ecotta"].get("backbone_norm", "source")
    if torch_on:
        for m in models:
            ckpt, dirs = bundles[m]
            hyper = EcoTTASettings.from_manifest(json.loads((dirs["after"] / "manifest.json").read_text()))
            # the training engines alongside, before the mmap threshold is pinned: ratios to
            # PyTorch that the machine's load cannot skew
            x = inputs[m][1]
            runners = {key(UNPINNED, v): select_engine("ort-training", Bundle.open(dirs[v]), "cpu",
                                                       opts=_engine_options(threads)) for v in VARIANTS}
            plain, prof = profile_torch(ckpt, hyper, inputs[m][0], warmup, steps, threads,
                                        {k: (lambda r=r: r.step(x)) for k, r in runners.items()})
            del runners
            gc.collect()
            for k, v in plain.items():
                reports[m].step_ms_all[k] = [round(t, 2) for t in v]
            reports[m].torch = prof
            reports[m].load_avg.append(round(os.getloadavg()[0], 2))
    pin_mmap_threshold()
    for m in models:
        r, dirs, x = reports[m], bundles[m][1], inputs[m][1]
        default = next(iter(SETTINGS))
        times = time_engines(dirs, x, warmup, steps, threads, SETTINGS if settings_on else {default: SETTINGS[default]})
        r.load_avg.append(round(os.getloadavg()[0], 2))
        for engine in ENGINES:
            for v in VARIANTS:
                r.step_ms_all[key(engine, v)] = [round(t, 2) for t in times[(engine, v, default)]]
            if settings_on:
                r.settings_ms[engine] = {label: round(_median(times[(engine, "after", label)]), 2)
                                         for label in SETTINGS}
        for v in VARIANTS:
            for engine in ENGINES:
                (r.profiles if v == "after" else r.profiles_before)[engine] = profile_engine(
                    dirs[v], engine, x, warmup, steps, threads)
                r.load_avg.append(round(os.getloadavg()[0], 2))
        r.step_ms = {k: round(_median(v), 2) for k, v in r.step_ms_all.items()}
        if micro_on:  # the candidates as they were measured before they were applied
            profile = r.profiles_before["ort-training"]
            node_ms = {n.name: n.ms_per_step for n in profile.frozen_input_gradients}
            for (c_in, c_out, h, w), names in sorted(stride1_input_gradients(dirs["before"], profile).items()):
                for prepacking in (False, True):
                    r.micro.append(conv_transpose_vs_conv(c_in, c_out, (h, w), batch, threads, prepacking,
                                                          micro_repeats, len(names), sum(node_ms[n] for n in names)))
            for size, count in sorted(unpack_sizes(profile).items()):
                r.unpack.append(unpack_bitshift_vs_gather(batch, size, threads, micro_repeats, count))
            r.load_avg.append(round(os.getloadavg()[0], 2))
        if memory_on:
            r.memory = measure_memory(dirs, batch)
            r.load_avg.append(round(os.getloadavg()[0], 2))
    return [reports[m] for m in models]


def _git_state() -> str:
    """The commit measured, and whether the exporter's files differed from it (others' work in
    progress in a shared checkout)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "export", "edgetta"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()[1::2]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def to_json(reports: Sequence[ModelReport], command: str, git: str | None = None) -> dict[str, Any]:
    """``git``: the code the bundles were exported from (``_git_state`` taken before the run;
    by default, now)."""
    import onnxruntime
    versions = {"onnxruntime": onnxruntime.__version__}
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return {"command": command, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git": git if git is not None else _git_state(),
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


def _ratios(m: dict[str, Any], variant: str) -> dict[str, float]:
    """The issue's two ratios for one variant: training engine / PyTorch (stepped in turn, neither
    allocator setting changed) and portable / training engine (stepped in turn, pinned)."""
    ms = m["step_ms"]
    out = {"portable_over_training": ms[key("onnx", variant)] / ms[key("ort-training", variant)]}
    if "ecotta_torch" in ms:
        out["training_over_torch"] = ms[key(UNPINNED, variant)] / ms["ecotta_torch"]
    return out


def _reading(m: dict[str, Any]) -> list[str]:
    """The short reading of one model's tables: every figure comes from the report."""
    tr, po = m["profiles"]["ort-training"], m["profiles"]["onnx"]
    ms = m["step_ms"]
    lines = []
    before, after = _ratios(m, "before"), _ratios(m, "after")
    if "ecotta_torch" in ms:
        lines.append(f"- Training engine against EcoTTA in PyTorch (stepped in turn, neither process-wide allocator "
                     f"setting changed): {ms[key(UNPINNED, 'before')]:.0f} ms before, {ms[UNPINNED]:.0f} ms after, "
                     f"PyTorch {ms['ecotta_torch']:.0f} ms: {before['training_over_torch']:.2f}x before, "
                     f"{after['training_over_torch']:.2f}x after (issue 16 wants at most 1.0).")
    lines.append(f"- Portable engine against the training engine (stepped in turn, mmap threshold pinned as the "
                 f"Adapter pins it): training {ms[key('ort-training', 'before')]:.0f} -> {ms['ort-training']:.0f} ms, "
                 f"portable {ms[key('onnx', 'before')]:.0f} -> {ms['onnx']:.0f} ms: "
                 f"{before['portable_over_training']:.2f}x before, {after['portable_over_training']:.2f}x after "
                 f"(issue 16 wants at most 1.2).")
    for label, engine in (("training engine", "ort-training"), ("portable engine", "onnx")):
        b, a = m["profiles_before"][engine], m["profiles"][engine]
        fig_b, fig_a = _group(b, "frozen conv input gradient"), _group(a, "frozen conv input gradient")
        un_b, un_a = _group(b, "ReLU mask unpacking"), _group(a, "ReLU mask unpacking")
        lines.append(f"- Profiled, {label}: frozen conv input gradients {fig_b['ms_per_step']:.0f} -> "
                     f"{fig_a['ms_per_step']:.0f} ms, mask unpacking {un_b['ms_per_step']:.0f} -> "
                     f"{un_a['ms_per_step']:.0f} ms, NCHWc reorders {_group(b, 'NCHWc')['ms_per_step']:.0f} -> "
                     f"{_group(a, 'NCHWc')['ms_per_step']:.0f} ms; all kernels {b['kernel_ms_per_step']:.0f} -> "
                     f"{a['kernel_ms_per_step']:.0f} ms per step.")
    for label, p in (("training engine", tr), ("portable engine", po)):
        top = ", ".join(f"{g['name'].split(' (')[0]} {100 * g['share']:.0f}%" for g in p["groups"][:4])
        lines.append(f"- Largest groups now, {label}: {top}.")
    rep = _group(po, "portable step's")
    if rep["ms_per_step"]:
        top = po["portable_replacements"][:3]
        extra = ("; by op type: " + ", ".join(f"{r['name']} {r['ms_per_step']:.0f} ms" for r in top)) if top else ""
        lines.append(f"- The portable step's own replacement nodes take {rep['ms_per_step']:.0f} ms "
                     f"({100 * rep['share']:.0f}%) where the training engine runs onnxruntime-training's "
                     f"fused kernels (meta ConvGrad {_op_ms(tr, 'ConvGrad'):.0f} ms, BatchNorm and its gradient "
                     f"{_op_ms(tr, 'BatchNormInternal') + _op_ms(tr, 'BatchNormalizationGrad'):.0f} ms){extra}.")
    mem = {(r["variant"], r["engine"]): r for r in m.get("memory") or []}
    if mem:
        parts = [f"{'training' if e == 'ort-training' else 'portable'} engine {mem['before', e]['rss_loaded_mib']:.0f} -> "
                 f"{mem['after', e]['rss_loaded_mib']:.0f} MiB loaded, peak {mem['before', e]['peak_after_step_mib']:.0f} "
                 f"-> {mem['after', e]['peak_after_step_mib']:.0f} MiB" for e in ENGINES if ("after", e) in mem]
        lines.append(f"- Memory, fresh processes (one run each, so a few MiB is noise): the flipped kernels are "
                     f"{mem['after', ENGINES[0]]['flipped_weight_mib']:.1f} MiB dense; " + "; ".join(parts) + ".")
    return lines


def _comparison_rows(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Groups of one engine's profile, before and after the rewrites."""
    names = [g["name"] for g in after["groups"]] + [g["name"] for g in before["groups"]
                                                     if g["name"] not in {a["name"] for a in after["groups"]}]
    out = ["| | before ms / step | after ms / step | after - before |", "|---|---|---|---|"]
    for n in names:
        b, a = _group(before, n)["ms_per_step"], _group(after, n)["ms_per_step"]
        out.append(f"| {n} | {b:.1f} | {a:.1f} | {a - b:+.1f} |")
    out.append(f"| all node kernels | {before['kernel_ms_per_step']:.1f} | {after['kernel_ms_per_step']:.1f} | "
               f"{after['kernel_ms_per_step'] - before['kernel_ms_per_step']:+.1f} |")
    return out


RUNNER_LABELS = {"ort-training": "training engine", "onnx": "portable engine", "ecotta_torch": "EcoTTA in PyTorch",
                 UNPINNED: "training engine, stepped in turn with PyTorch, mmap threshold not pinned"}


def _runner_label(k: str) -> str:
    for variant in VARIANTS:
        for runner, label in RUNNER_LABELS.items():
            if k == key(runner, variant):
                return f"{label}, {variant}" if runner != "ecotta_torch" else label
    return k


def _options_text(options: LeanOptions) -> str:
    """``LeanOptions(...)`` with the fields that differ from the defaults."""
    default = LeanOptions()
    changed = [f"{f.name}={getattr(options, f.name)!r}" for f in fields(options)
               if getattr(options, f.name) != getattr(default, f.name)]
    return f"LeanOptions({', '.join(changed)})"


def render(report: dict[str, Any]) -> str:
    """docs/step_time.md from a step_profile.json report."""
    out = ["# Where the adaptation step's time goes",
           "",
           "Generated by `python -m benchmarks.step_profile` from `benchmarks/results/step_profile.json`; do "
           "not edit by hand. Issue 16: the lean graph's speed rewrites (export/lean.py: stride-1 frozen input "
           "gradients as a Conv of flipped, channel-swapped kernels; masks unpacked by one Gather from a 256 x 8 "
           "table and packed 64 signs to a row; elementwise work in cheaper kernels; shapes declared for the "
           "backward pass's planner; kept inputs compressed to 8 bits, rounded to nearest; one weight gradient per "
           "meta conv from the summed output gradients of the loss's two terms, its input gradient apart, at "
           "stride 1 a Conv of flipped kernels), each model's bundle "
           "measured before (`" + _options_text(BEFORE) + "`) and after (the defaults) in one run; the portable step's "
           "own rewrites (meta conv weight gradients as one MatMul per kernel offset in a Loop, stride-1 meta "
           "input gradients as a Conv of flipped kernels, BatchNorm gradients with one full-size pass fewer) are "
           "in the same before/after.",
           "",
           "Code: " + "; ".join(f"{m['model']} at {m.get('git', report.get('git', 'not recorded'))}" for m in report["models"]) + f". Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs shared with other jobs "
           f"(load average per phase is listed under each model; timings are noisy, ratios within one run are "
           f"what to compare). Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
           "",
           "How: each engine is loaded through `edgetta.engines.select_engine` with edgetta's session "
           "options (one intra-op thread); the runners of one phase are loaded together and stepped in turn "
           "(A, B, A, B, ...), so that the machine's load falls on all alike; step ms are medians of unprofiled "
           "steps. The profiles add `enable_profiling` (onnxruntime-training's Module gets it through "
           "`session_options=`); warm-up steps are dropped; ms per step are node kernel times summed over the "
           "profiled steps and divided by their number; shares are of the summed kernel time. Frames are random "
           "uint8 images (time does not depend on pixel values). PyTorch's figures are torch.profiler's self "
           "CPU time per op. Memory: `edgetta.profile.measure_step`, a fresh torch-free process per engine "
           "and variant, batch as above, two steps.",
           "",
           "## Summary: the issue's ratios, before and after, each model's in one run",
           "",
           "| model | EcoTTA variant | batch | EcoTTA in PyTorch ms | training engine ms, before -> after | training / PyTorch, "
           "before -> after | portable engine ms, before -> after | portable / training, before -> after | "
           "load average (1 min) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        ms, b, a = m["step_ms"], _ratios(m, "before"), _ratios(m, "after")
        torch_ms = f"{ms['ecotta_torch']:.0f}" if "ecotta_torch" in ms else "not run"
        tt = (f"{b['training_over_torch']:.2f} -> {a['training_over_torch']:.2f}" if "training_over_torch" in a
              else "not run")
        tr_ms = (f"{ms[key(UNPINNED, 'before')]:.0f} -> {ms[UNPINNED]:.0f}" if UNPINNED in ms else
                 f"{ms[key('ort-training', 'before')]:.0f} -> {ms['ort-training']:.0f}")
        out.append(f"| {m['model']} | {m.get('backbone_norm') or 'not recorded'} | {m['batch']} | {torch_ms} | {tr_ms} | {tt} | {ms[key('onnx', 'before')]:.0f} -> "
                   f"{ms['onnx']:.0f} | {b['portable_over_training']:.2f} -> {a['portable_over_training']:.2f} | "
                   f"{min(m['load_avg']):.2f}-{max(m['load_avg']):.2f} |")
    out += ["", "The training engine's figures in the first ms column are those stepped in turn with PyTorch; "
            "the portable / training ratio comes from the later phase where both engines of both variants were "
            "stepped in turn. EcoTTA variant: the frozen backbone's BatchNorms on their source statistics "
            "(`source`, the paper's; folded into the convolutions) or on the test batch's (`batch`), as the "
            "checkpoint says: wrn16_2 is the built-in checkpoint, other models untrained checkpoints of "
            "benchmarks.common's recipe.", ""]
    for m in report["models"]:
        tr, po = m["profiles"]["ort-training"], m["profiles"]["onnx"]
        out += [f"## {m['model']}, batch {m['batch']}, {m['threads']} thread(s)", "",
                f"Command: `{m.get('command') or report['command']}`. Bundles `{m['bundle_before']}` (before) and "
                f"`{m['bundle']}` (after); {m['warmup']} warm-up then {m['steps']} measured steps per run; "
                f"load average (1 min) after each phase: {', '.join(str(v) for v in m['load_avg'])}.", "",
                "| runner | step ms, unprofiled (median) |", "|---|---|"]
        out += [f"| {_runner_label(k)} | {v:.1f} |" for k, v in m["step_ms"].items()]
        profiled = [f"| {label}, {v} | {p['profiled_step_ms']:.1f} | {p['kernel_ms_per_step']:.1f} |"
                    for v, profs in (("before", m["profiles_before"]), ("after", m["profiles"]))
                    for e, label in (("ort-training", "training engine"), ("onnx", "portable engine"))
                    for p in [profs[e]]]
        if m.get("torch"):
            profiled.append(f"| EcoTTA in PyTorch | {m['torch']['profiled_step_ms']:.1f} | "
                            f"{m['torch']['self_cpu_ms_per_step']:.1f} (self CPU) |")
        out += ["", "| profiled runner | profiled step ms | kernel ms summed |", "|---|---|---|", *profiled]
        out += ["", "Reading:", "", *_reading(m), ""]
        if m.get("memory"):
            out += ["### Memory, fresh process per engine and variant (MiB)", "",
                    "| variant | engine | RSS loaded | peak over the steps | step's growth | flipped kernels (dense) |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['variant']} | {r['engine']} | {r['rss_loaded_mib']:.1f} | {r['peak_after_step_mib']:.1f} | "
                    f"{r['step_growth_mib']:.1f} | {r['flipped_weight_mib']:.2f} |" for r in m["memory"]]
            out.append("")
        for label, engine in (("training engine", "ort-training"), ("portable engine", "onnx")):
            out += [f"### {label}: groups before and after", "",
                    *_comparison_rows(m["profiles_before"][engine], m["profiles"][engine]), ""]
        for label, p in (("training engine", tr), ("portable engine", po)):
            out += [f"### {label}, after: op types", "", *_share_rows(p["ops"], 15), ""]
            if p["portable_replacements"]:
                out += [f"### {label}, after: the replacement nodes (portable/*) by op type", "",
                        *_share_rows(p["portable_replacements"], 10), ""]
            out += [f"### {label}, after: top {len(p['top_nodes'])} nodes", "",
                    "| node | op | ms / step | share | input shapes |", "|---|---|---|---|---|"]
            out += [f"| `{n['name']}` | {n['op']} | {n['ms_per_step']:.2f} | {100 * n['share']:.1f}% | "
                    f"{' '.join('x'.join(map(str, s)) for s in n['input_shapes'])} |" for n in p["top_nodes"]]
            out.append("")
        if m.get("torch"):
            out += ["### EcoTTA in PyTorch: ops by self CPU time", "", *_share_rows(m["torch"]["ops"], 15), ""]
        if m["settings_ms"]:
            out += ["### onnxruntime settings, after (unprofiled step ms, median)", "",
                    "| engine | " + " | ".join(next(iter(m["settings_ms"].values()))) + " |",
                    "|---|" + "---|" * len(next(iter(m["settings_ms"].values())))]
            out += [f"| {e} | " + " | ".join(f"{v:.1f}" for v in s.values()) + " |" for e, s in m["settings_ms"].items()]
            out.append("")
        if m["micro"]:
            out += ["### Micro-benchmark (before's graph): a frozen conv's input gradient, ConvTranspose vs Conv", "",
                    "dY of shape (batch, C_out, H, W) to dX, 3x3, stride 1, pad 1, each op alone in a session "
                    "with edgetta's options and one thread; Conv's weights are the ConvTranspose's flipped and "
                    "channel-swapped. `nodes`: frozen input gradients of this shape, `in step`: what they took in "
                    "the profiled training-engine step before the rewrites.", "",
                    "| C_in | C_out | H x W | nodes | in step ms | prepacking | ConvTranspose ms | Conv ms | Conv / ConvTranspose | max abs diff |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['c_in']} | {r['c_out']} | {r['hw'][0]}x{r['hw'][1]} | {r['nodes_in_graph']} | {r['step_ms']:.1f} | "
                    f"{'on' if r['prepacking'] else 'off'} | {r['conv_transpose_ms']:.2f} | {r['conv_ms']:.2f} | "
                    f"{r['conv_over_conv_transpose']:.2f} | {r['max_abs_diff']:.1e} |" for r in m["micro"]]
            out.append("")
        if m.get("unpack"):
            out += ["### Micro-benchmark (before's graph): unpacking a bit-packed ReLU mask, BitShift chain vs Gather", "",
                    "(batch, bytes) uint8 to (batch, 8 x bytes) float 0/1, alone in a session with edgetta's "
                    "options and one thread: the chain for NCHW masks (Reshape, BitShift left by 7-k, "
                    "BitShift right by 7, Cast, Reshape) against Cast to int32, Gather from a 256 x 8 float "
                    "table, Reshape. `masks`: unpackings of that size in one step.", "",
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
    p.add_argument("--settings", action="store_true", help="also time the arena / prepacking settings")
    p.add_argument("--micro", action="store_true",
                   help="also run the ConvTranspose-vs-Conv and unpacking micro-benchmarks on the graph before")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    p.add_argument("--add", action="store_true",
                   help="keep the other models of the existing --out report (a model measured again is replaced)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--doc", type=Path, default=DOC, help="markdown written from the report")
    p.add_argument("--render-only", action="store_true", help="only write --doc from the existing --out report")
    a = p.parse_args(argv)
    if a.render_only:
        write_text_atomic(a.doc, render(json.loads(a.out.read_text())) + "\n")
        print(f"wrote {a.doc}")
        return 0
    command = ("python -m benchmarks.step_profile " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    git = _git_state()  # before the bundles are exported: the code they hold, whatever is committed during the run
    reports = run(a.models, a.batch, a.warmup, a.steps, a.threads, torch_on=not a.no_torch,
                  settings_on=a.settings, micro_on=a.micro, micro_repeats=a.micro_repeats,
                  memory_on=not a.no_memory, command=command)
    data = to_json(reports, command, git)
    for m in data["models"]:
        m["git"] = data["git"]
    if a.add and a.out.exists():  # the models kept keep the code they were measured on
        old = json.loads(a.out.read_text())
        fresh = {m["model"] for m in data["models"]}
        data["models"] = [{"git": old.get("git", "not recorded"), **m} for m in old["models"]
                          if m["model"] not in fresh] + data["models"]
    write_text_atomic(a.out, json.dumps(data, indent=1))
    write_text_atomic(a.doc, render(data) + "\n")
    print(f"wrote {a.out} and {a.doc}")
    return 0


if __name__ == "__main__":
    run_cli(main)
