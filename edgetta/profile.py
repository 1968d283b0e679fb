"""Memory profile of a bundle: what one adaptation step and one inference hold in memory.

Static part: every tensor of the exported graphs gets its exact size from one probe run at
batch 1 and 2 (sizes are linear in the batch), then a liveness pass over the execution order
says which buffers are allocated at each node, handing freed buffers on to new tensors of the
same size as onnxruntime's allocation planner does. Forward tensors still alive when the
forward pass ends are the activations kept for backward; each is judged by what the nodes that
read it later really need. A target profile (``edgetta.targets``) sets element sizes and
allocator alignment, so targets we cannot run here are still checked.

The probe needs the ``onnx`` package (host side); the exporter writes what it finds (nodes,
tensor sizes, weights) into the bundle as JSON (``graphs.facts``), so a device profiles a bundle
with only the base dependencies (``bundle_facts``).

Measured part: peak RSS of a real adaptation step in a fresh process (``measure_step``), on the
engine that will run there.
"""
from __future__ import annotations

import heapq
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import manifest as names
from .bundle import Bundle
from .errors import BundleError, EdgettaError
from .system import MIB, atomic_write
from .targets import Target

FACTS_FILE = "graph_facts.json"
FACTS_FORMAT = 1
# the batch symbol the lean graph gives the main backward pass's tensors
# (edgetta_export.lean.separate_backward_buffers): onnxruntime's planner then hands them no
# buffer of the forward pass, and neither does the liveness pass (``_liveness``)
BACKWARD_BATCH = "edgetta_backward_batch"


@dataclass(frozen=True)
class Node:
    """What the analysis needs of a graph node (the same attributes as onnx's NodeProto)."""
    op_type: str
    input: tuple[str, ...]
    output: tuple[str, ...]


@dataclass
class TensorInfo:
    name: str
    elems1: int          # elements at batch 1
    elems2: int          # elements at batch 2
    itemsize: int
    is_float: bool
    shape1: tuple = ()

    def elems(self, batch: int) -> int:
        return self.elems1 + (self.elems2 - self.elems1) * (batch - 1)

    def nbytes(self, batch: int, target: Target) -> int:
        size = self.elems(batch) * (target.float_bytes if self.is_float else self.itemsize)
        a = target.alignment
        return -(-size // a) * a if size else 0


@dataclass
class GraphFacts:
    nodes: list[Any]
    tensors: dict[str, TensorInfo]
    params: dict[str, int] = field(default_factory=dict)   # initializer name -> elements
    # tensors declared with BACKWARD_BATCH: buffers are handed on only among them
    backward_batch: frozenset[str] = frozenset()
    _order: list[Any] | None = field(default=None, repr=False)

    def order(self) -> list[Any]:
        """The nodes in execution order (computed once: every analysis walks it)."""
        if self._order is None:
            self._order = execution_order(self.nodes)
        return self._order

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [[n.op_type, list(n.input), list(n.output)] for n in self.nodes],
                "tensors": {k: [t.elems1, t.elems2, t.itemsize, t.is_float, list(t.shape1)]
                            for k, t in self.tensors.items()},
                "params": self.params, "backward_batch": sorted(self.backward_batch)}

    @classmethod
    def from_json(cls, data: Any) -> "GraphFacts":
        try:
            nodes = [Node(str(op), tuple(map(str, ins)), tuple(map(str, outs)))
                     for op, ins, outs in data["nodes"]]
            tensors = {str(k): TensorInfo(str(k), int(e1), int(e2), int(size), bool(fl), tuple(map(int, shape)))
                       for k, (e1, e2, size, fl, shape) in data["tensors"].items()}
            params = {str(k): int(v) for k, v in data["params"].items()}
            backward = frozenset(map(str, data.get("backward_batch", [])))  # absent before it existed
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"graph facts are malformed ({type(e).__name__}: {e})") from None
        return cls(nodes, tensors, params, backward)


def _onnx():
    import onnx  # host side only: the exporter's dependency
    return onnx


def _probe(model, feeds_for_batch, batches=(1, 2)) -> dict[str, TensorInfo]:
    """Run the graph with every intermediate tensor exposed, at two batch sizes."""
    onnx = _onnx()
    from .ort import onnxruntime
    ort = onnxruntime()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    seen = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in seen:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                seen.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    runs = []
    for b in batches:
        outs = sess.run(None, feeds_for_batch(b))
        runs.append({n: np.asarray(o) for n, o in zip(out_names, outs)})
    infos = {}
    for n in out_names:
        a1, a2 = runs[0][n], runs[1][n]
        infos[n] = TensorInfo(n, int(a1.size), int(a2.size), a1.dtype.itemsize,
                              bool(np.issubdtype(a1.dtype, np.floating)), tuple(a1.shape))
    feeds = feeds_for_batch(1)
    for n, v in feeds.items():
        v2 = feeds_for_batch(2)[n]
        infos.setdefault(n, TensorInfo(n, int(v.size), int(v2.size), v.dtype.itemsize,
                                       bool(np.issubdtype(v.dtype, np.floating)), tuple(v.shape)))
    return infos


def initializer_elems(graph: Any) -> dict[str, int]:
    """Elements of every initializer of an onnx GraphProto, dense and sparse alike."""
    out = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    out.update({s.values.name: int(np.prod(s.dims)) for s in graph.sparse_initializer})
    return out


def _facts(model: Any, feeds: Any) -> GraphFacts:
    nodes = [Node(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    backward = frozenset(vi.name for vi in model.graph.value_info
                         if any(d.dim_param == BACKWARD_BATCH for d in vi.type.tensor_type.shape.dim))
    return GraphFacts(nodes, _probe(model, feeds), initializer_elems(model.graph), backward)


def _frames(bundle: Bundle, batch: int) -> np.ndarray:
    c, h, w = bundle.manifest.input.shape
    return np.random.default_rng(0).standard_normal((batch, c, h, w)).astype(np.float32)


def training_facts(bundle: Bundle) -> GraphFacts:
    """Facts of the onnxruntime-training graph (host side: needs onnx and onnxruntime-training)."""
    onnx = _onnx()
    from .ort import training_api
    g = bundle.manifest.graphs.training
    model = onnx.load(str(bundle.file(g.file)))
    state = training_api().CheckpointState.load_checkpoint(str(bundle.file(g.checkpoint)))

    def feeds(batch: int) -> dict[str, np.ndarray]:
        out = {}
        for i in model.graph.input:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            if i.name == names.INPUT:
                out[i.name] = _frames(bundle, batch)
            elif i.name.endswith(".accumulation.buffer"):
                out[i.name] = np.zeros(shape, np.float32)
            elif i.type.tensor_type.elem_type == onnx.TensorProto.BOOL:
                out[i.name] = np.array([True])
            else:
                out[i.name] = state.parameters[i.name].data
        return out

    return _facts(model, feeds)


def portable_facts(bundle: Bundle) -> GraphFacts | None:
    """Facts of the portable step graph, if the bundle has one (host side: needs onnx)."""
    step = bundle.manifest.graphs.portable_step
    if step is None:
        return None
    model = _onnx().load(str(bundle.file(step.file)))
    init = bundle.initial_meta_state()
    m = bundle.manifest

    def feeds(batch: int) -> dict[str, np.ndarray]:
        out = {names.INPUT: _frames(bundle, batch), names.LR: np.array(m.adaptation.lr, np.float32),
               names.MOMENTUM: np.array(m.adaptation.momentum, np.float32)}
        for p in m.trainable:
            out[p] = init[p]
            out[names.velocity(p)] = np.zeros_like(init[p])
        return out

    return _facts(model, feeds)


def inference_facts(bundle: Bundle) -> GraphFacts:
    """Facts of the inference graph (host side: needs onnx)."""
    model = _onnx().load(str(bundle.file(bundle.manifest.graphs.inference.file)))
    return _facts(model, lambda batch: {names.INPUT: _frames(bundle, batch)})


def write_facts(bundle: Bundle, path: str | os.PathLike) -> None:
    """Probe every graph of ``bundle`` and write the facts the device profiles from (export)."""
    graphs = {"ort-training": training_facts(bundle), "inference": inference_facts(bundle)}
    portable = portable_facts(bundle)
    if portable is not None:
        graphs["onnx"] = portable
    data = {"format": FACTS_FORMAT, "graphs": {k: v.to_json() for k, v in graphs.items()}}
    with atomic_write(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))


def bundle_facts(bundle: Bundle) -> dict[str, GraphFacts]:
    """The facts the exporter wrote into the bundle: "ort-training", "inference" and, with a
    portable step, "onnx". Needs neither onnx nor torch."""
    name = bundle.manifest.graphs.facts
    if name is None:
        raise BundleError(f"{bundle.path} carries no graph facts for the profiler: export it again")
    try:
        data = json.loads(bundle.file(name).read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise BundleError(f"{bundle.path}: {name} cannot be read: {str(e)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FACTS_FORMAT or not isinstance(data.get("graphs"), dict):
        raise BundleError(f"{bundle.path}: {name} is not graph facts of format {FACTS_FORMAT}")
    return {k: GraphFacts.from_json(v) for k, v in data["graphs"].items()}


def _kept_for_backward(order: list[Any], chain_output: str) -> dict[str, list[tuple[Any, int]]]:
    """Forward tensors still alive when the forward pass ends, with the nodes that read them
    afterwards. The forward pass ends with the last node on the way to ``chain_output`` (the
    logits) in execution ``order``; the regularizer's gradients, which need no upstream
    gradient, may run before that and keep nothing."""
    rank = {id(n): k for k, n in enumerate(order)}
    producer = {o: n for n in order for o in n.output if o}
    stack, chain = [producer[chain_output]] if chain_output in producer else [], set()
    while stack:
        n = stack.pop()
        if id(n) not in chain:
            chain.add(id(n))
            stack.extend(producer[x] for x in n.input if x in producer)
    boundary = max((rank[i] for i in chain), default=-1)
    kept: dict[str, list[tuple[Any, int]]] = {}
    for n in order[boundary + 1:]:
        if n.op_type in ("Shape", "Size"):  # metadata only: the data is not kept
            continue
        for idx, x in enumerate(n.input):
            if x and (x == "input" or (x in producer and rank[id(producer[x])] <= boundary)):
                kept.setdefault(x, []).append((n, idx))
    return kept


def _judge(consumers: list[tuple[Any, int]]) -> str:
    """What a kept forward tensor is really needed for by its gradient nodes."""
    verdicts = set()
    for node, idx in consumers:
        if node.op_type == "ConvGrad" and idx == 1:
            weight_grad = len(node.output) > 1 and node.output[1] != ""
            verdicts.add("needed" if weight_grad else "not needed")
        elif node.op_type == "ReluGrad" and idx == 1:
            verdicts.add("sign mask")
        else:
            verdicts.add("needed")
    if "needed" in verdicts:
        return "needed"
    return "sign mask" if "sign mask" in verdicts else "not needed"


def topological_order(nodes: list[Any], first: Callable[[Any], bool] = lambda node: False) -> list[Any]:
    """``nodes`` in Kahn's topological order, each after the producers of its inputs: among the
    ready nodes, those ``first`` picks, then the lowest index (as close to the given order as the
    dependencies allow)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {producer[x] for x in node.input if x in producer and producer[x] != i}
        waiting[i] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(i)

    def key(i: int) -> tuple[int, int]:
        return (0 if first(nodes[i]) else 1, i)

    ready = [key(i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for r in readers.get(i, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, key(r))
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order


def execution_order(nodes: list[Any]) -> list[Any]:
    """The order onnxruntime's priority-based execution runs ``nodes`` in: Kahn's topological
    sort that takes Shape and Size first, then the lowest node index among the ready nodes.
    A gradient that depends only on constants (the regularizer's: d loss / d loss is 1) is
    ready during the forward pass and runs there."""
    return topological_order(nodes, lambda node: node.op_type in ("Shape", "Size"))


def _liveness(facts: GraphFacts, batch: int, target: Target, skip: set[str]) -> tuple[int, list[int]]:
    """Bytes allocated at each node of the execution order. Buffers are handed on as
    onnxruntime's allocation planner does: a new tensor takes the most recently freed buffer of
    exactly its size, and a buffer that is handed on stays allocated from its first tensor's
    creation to its last tensor's last use, gaps included. Tensors of the backward pass's own
    batch symbol (``GraphFacts.backward_batch``), and those computed from them (whose shapes
    onnxruntime may not know, and then reuses no buffer for), share buffers only with each other."""
    nodes = facts.order()
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for x in node.input:
            if x:
                last_use[x] = i
    apart = set(facts.backward_batch)
    if apart:
        for node in nodes:
            if any(x in apart for x in node.input):
                apart.update(o for o in node.output if o)
    spans: list[list] = []                         # per buffer: [first node, last node, size key]
    free: dict[tuple, list[int]] = {}              # size key -> freed buffers, most recent last
    buffer_of: dict[str, int] = {}
    if "input" in facts.tensors:                   # fed by the caller: never handed on
        spans.append([0, last_use.get("input", 0), (None, None, facts.tensors["input"].nbytes(batch, target), False)])
    for i, node in enumerate(nodes):
        for o in node.output:
            if not o or o in skip or o not in facts.tensors or o in buffer_of:
                continue
            t = facts.tensors[o]
            key = (t.elems1, t.elems2, t.nbytes(batch, target), o in apart)
            if free.get(key):
                bid = free[key].pop()
            else:
                bid = len(spans)
                spans.append([i, i, key])
            buffer_of[o] = bid
            spans[bid][1] = max(spans[bid][1], last_use.get(o, i))
        for name in dict.fromkeys(list(node.input) + list(node.output)):
            bid = buffer_of.get(name)
            if bid is not None and last_use.get(name, i) == i and spans[bid][1] == i:
                free.setdefault(spans[bid][2], []).append(bid)
    end = len(nodes)
    delta = np.zeros(end + 2, dtype=np.int64)
    for first, last, (_, _, size, _) in spans:
        delta[first] += size
        delta[last + 1] -= size
    live = np.cumsum(delta)[:end]
    return int(live.max()) if end else 0, live.tolist()


def _second_layout_elems(train: GraphFacts, trainable: set[str]) -> int:
    """Frozen weights that a backward conv reads. On x86-64 onnxruntime runs the forward
    convolutions in its blocked NCHWc layout, on a reordered copy of their weights, while
    ``ConvTranspose`` (``ConvGrad`` in a generated graph) reads the original: measured, the
    training session holds those weights twice (benchmarks/load_memory.py). Elsewhere, with
    pre-packing off, both read one copy."""
    weight_input = {"ConvTranspose": 1, "ConvGrad": 2}
    read = {n.input[weight_input[n.op_type]] for n in train.nodes
            if n.op_type in weight_input and len(n.input) > weight_input[n.op_type]}
    return int(sum(train.params.get(w, 0) for w in read - trainable))


def analyse(bundle: Bundle, target: Target, batch: int, momentum: float | None = None,
            train: GraphFacts | None = None, infer: GraphFacts | None = None,
            engine: str = "ort-training") -> dict[str, Any]:
    """Static memory breakdown of one adaptation step of ``engine`` and of inference, in bytes.
    Without ``train`` / ``infer`` the facts the bundle carries are used."""
    m = bundle.manifest
    if train is None or infer is None:
        facts = bundle_facts(bundle)
        if engine not in facts:
            raise BundleError(f"{bundle.path} carries no graph facts for engine {engine}")
        train, infer = train or facts[engine], infer or facts["inference"]
    momentum = m.adaptation.momentum if momentum is None else momentum
    fb = target.float_bytes
    trainable = set(m.trainable)
    stats = set(m.kept_running_stats)

    def pbytes(tensor_names) -> int:
        return int(sum(train.tensors[n].nbytes(1, target) if n in train.tensors else 0 for n in tensor_names))

    frozen_elems = sum(v for k, v in train.params.items())
    params_trainable = pbytes(trainable)
    buffers = pbytes(stats)
    # onnxruntime-training keeps persistent gradient buffers; the portable step's gradients
    # are ordinary tensors of its run (counted in the workspace)
    grads = params_trainable if engine == "ort-training" else 0
    optimizer = params_trainable if momentum else 0

    consumers = _kept_for_backward(train.order(), names.LOGITS)
    kept = []
    for name, cons in consumers.items():
        info = train.tensors.get(name)
        if info is None or info.elems2 == info.elems1:  # batch-independent (shapes, scalars)
            continue
        kept.append({"name": name, "shape_at_batch": [batch, *info.shape1[1:]] if info.shape1 else [],
                     "bytes": info.nbytes(batch, target),
                     "consumers": sorted({n.op_type for n, _ in cons}), "need": _judge(cons)})
    kept.sort(key=lambda r: -r["bytes"])
    kept_bytes = sum(r["bytes"] for r in kept)
    skip = set(train.params) | trainable | stats
    peak, _ = _liveness(train, batch, target, skip)
    infer_peak, _ = _liveness(infer, batch, target, set(infer.params))
    by_need = {k: sum(r["bytes"] for r in kept if r["need"] == k) for k in ("needed", "sign mask", "not needed")}
    frozen_bytes = frozen_elems * fb
    adaptation = {
        "parameters_frozen": frozen_bytes,
        "parameters_frozen_second_layout": _second_layout_elems(train, trainable) * fb if target.arch == "x86_64" else 0,
        "parameters_trainable": params_trainable,
        "running_stats": buffers, "gradients": grads, "optimizer_state": optimizer,
        "activations_kept": kept_bytes, "workspace": max(peak - kept_bytes, 0),
    }
    adaptation["total"] = int(sum(adaptation.values()))
    infer_params = sum(infer.params.values()) * fb
    inference = {"parameters": infer_params, "workspace": infer_peak}
    inference["total"] = infer_params + infer_peak
    lean = by_need["needed"] + by_need["sign mask"] // (8 * fb)
    return {
        "bundle": str(bundle.path), "target": target.as_dict(), "batch": batch, "engine": engine,
        "adaptation": adaptation, "inference": inference,
        "activations_by_need": by_need,
        "activations_if_masks_only": lean,
        "kept_tensors": kept,
        "fits": adaptation["total"] <= target.budget_mib * MIB,
    }


_MEASURE = r"""
import json, platform, sys, time
sys.modules['torch'] = None
from edgetta.system import minor_faults, peak_rss_bytes as hwm, reset_peak_rss, rss_bytes
rss_before_load, peak_before_load = rss_bytes(), hwm()
import numpy as np
from edgetta import Adapter
bundle, batch, provider, steps, arena, engine = sys.argv[1:7]
batch, steps = int(batch), int(steps)
a = Adapter.load(bundle, provider=provider, memory_arena=arena == '1', engine=engine)
# a device predicts single frames while it adapts (serve): count the inference session as loaded
a.open_predictor()
frames = np.random.default_rng(0).integers(0, 256, (batch, *a.bundle.input_size, 3), dtype=np.uint8)
x = a.preprocess(frames)
# reset the peak to the current RSS (Linux 4.0+), so that loading's transients do not hide the step's
peak_reset = reset_peak_rss()
rss_loaded = rss_bytes()
hwm_loaded = hwm()
# page faults: without an arena each fresh allocation is faulted in
f0, t = minor_faults(), time.perf_counter()
for _ in range(steps):
    a.adapt(x)
step_ms = (time.perf_counter() - t) * 1e3 / steps
faults_per_step = None if f0 is None else (minor_faults() - f0) / steps
hwm_step = hwm()
t = time.perf_counter()
a.predict_tensor(x)
infer_ms = (time.perf_counter() - t) * 1e3
print(json.dumps(dict(rss_before_load=rss_before_load, peak_before_load=peak_before_load,
                      rss_loaded=rss_loaded, peak_loaded=hwm_loaded, peak_after_step=hwm_step,
                      peak_after_inference=hwm(), peak_reset=peak_reset, step_ms=step_ms,
                      minor_faults_per_step=faults_per_step,
                      inference_ms=infer_ms, engine=a.engine, provider=a.provider,
                      machine=platform.machine(), python=platform.python_version())))
"""


class MeasureError(EdgettaError):
    """The fresh process measuring an adaptation step failed."""


def measure_step(bundle_dir: str | os.PathLike, batch: int, provider: str = "cpu",
                 steps: int = 2, arena: bool = False, timeout: float = 600,
                 engine: str = "auto") -> dict[str, Any]:
    """Peak RSS of real adaptation steps of ``engine`` in a fresh process (torch blocked, as on
    a device). The result names the engine, provider and machine that measured.

    ``step_peak`` is the growth of the peak over the loaded process: activations, workspace and
    the allocator's own slack. onnxruntime exposes no arena statistics to Python, so RSS is the
    measured figure. The peak is reset after loading where Linux allows it (``peak_reset``);
    otherwise a step that stays under loading's own peak is undercounted. Raises MeasureError
    (an EdgettaError) with the child's last line when it fails."""
    env = dict(os.environ)  # the child imports this edgetta, installed or not
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(bundle_dir), str(batch), provider,
                            str(steps), "1" if arena else "0", engine],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"measuring an adaptation step of {bundle_dir} took over {timeout:g} s") from None
    except OSError as e:  # e.g. under qemu-user without binfmt_misc: no child of this architecture
        raise MeasureError(f"cannot start a fresh process to measure an adaptation step: {e}; "
                           "use --no-measure") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}, no output"])[-1]
        raise MeasureError(f"measuring an adaptation step of {bundle_dir} failed: {last[:300]}")
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MeasureError(f"measuring an adaptation step of {bundle_dir} printed no result") from None
    out["step_peak"] = out["peak_after_step"] - out["peak_loaded"]
    out["batch"] = batch
    return out


def arch_name(machine: str) -> str:
    """The architecture name targets use for a ``platform.machine()`` value."""
    m = machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}.get(m, m)


@dataclass(frozen=True)
class Verdict:
    """Whether one adaptation step fits a target, and by which figure it was judged. The
    quantity is always the peak RSS of the adapting process. Where this machine has the target's
    architecture it is measured; elsewhere it is estimated as the static figure for the target
    plus what a measured process held beyond its own static figure (interpreter, libraries,
    onnxruntime's sessions, allocator slack): this machine's fresh process, or with --no-measure
    the one the exporter measured."""
    fits: bool
    peak_mib: float
    budget_mib: float
    measured: bool
    how: str

    def line(self, target_name: str) -> str:
        word = "fits" if self.fits else "DOES NOT FIT"
        return (f"adaptation step {word} the {self.budget_mib:g} MiB budget of {target_name}: "
                f"peak RSS {self.peak_mib:.1f} MiB ({self.how})")


def host_target(machine: str) -> Target | None:
    """The first target of ``machine``'s architecture (to analyse what was measured here)."""
    from .targets import TARGETS
    return next((t for t in TARGETS.values() if arch_name(t.arch) == arch_name(machine)), None)


def verdict(report: dict[str, Any], target: Target, measured: dict[str, Any] | None,
            bundle: Bundle | None = None) -> Verdict:
    """Judge ``report`` (``analyse`` for ``target``) by the peak RSS of the adapting process."""
    budget = float(target.budget_mib)
    static = report["adaptation"]["total"] / MIB
    if measured is not None and arch_name(measured["machine"]) == arch_name(target.arch):
        peak = measured["peak_after_step"] / MIB
        how = (f"measured on this {measured['machine']} machine, engine {measured['engine']}, "
               f"provider {measured['provider']}")
        return Verdict(peak <= budget, peak, budget, True, how)
    host = host_target(measured["machine"]) if measured is not None else None
    if measured is not None and host is not None and bundle is not None:
        here = analyse(bundle, host, report["batch"], engine=report["engine"])["adaptation"]["total"] / MIB
        overhead = measured["peak_after_step"] / MIB - here
        source = (f"{overhead:.0f} MiB this {measured['machine']} process held beyond its static "
                  f"{here:.1f} MiB (runtime, sessions, allocator)")
    elif bundle is not None and bundle.manifest.profile is not None:
        prof = bundle.manifest.profile
        overhead = prof.adaptation_peak_mib - prof.adaptation_static_mib
        source = (f"{overhead:.0f} MiB the exporter's process held beyond its static figure "
                  f"({prof.machine or 'export machine'}, engine {prof.engine or 'ort-training'}, "
                  f"batch {prof.batch})")
    else:
        overhead, source = 0.0, "nothing measured: the runtime itself is not counted"
    how = (f"estimated: static {static:.1f} MiB for {target.name} (engine {report['engine']}) + "
           f"{source}; not measured on {target.arch}")
    peak = static + overhead
    return Verdict(peak <= budget, peak, budget, False, how)


def format_table(report: dict[str, Any], measured: dict[str, Any] | None = None,
                 judged: Verdict | None = None) -> str:
    t = report["target"]
    rows = [f"bundle {report['bundle']}  target {t['name']} ({t['arch']}, {t['ram_mib']} MiB RAM, "
            f"budget {t['budget_mib']} MiB)  batch {report['batch']}  engine {report['engine']}", "",
            f"{'one adaptation step (static)':32s} {'MiB':>9s}"]
    for k, v in report["adaptation"].items():
        rows.append(f"  {k.replace('_', ' '):30s} {v / MIB:9.2f}")
    rows += ["", f"{'inference alone (static)':32s} {'MiB':>9s}"]
    for k, v in report["inference"].items():
        rows.append(f"  {k.replace('_', ' '):30s} {v / MIB:9.2f}")
    n = report["activations_by_need"]
    rows += ["", "activations kept for backward, by what their gradient really needs:",
             f"  needed (trainable layers)      {n['needed'] / MIB:9.2f}",
             f"  sign mask would do (ReLU)      {n['sign mask'] / MIB:9.2f}",
             f"  not needed (frozen conv input) {n['not needed'] / MIB:9.2f}",
             f"  if only masks were kept        {report['activations_if_masks_only'] / MIB:9.2f}"]
    if measured:
        rows += ["", f"measured on this machine ({measured['machine']}, Python {measured['python']}, "
                     f"engine {measured['engine']}, provider {measured['provider']}, fresh process, "
                     f"{measured['batch']} frames): runtime before loading {measured['rss_before_load'] / MIB:.1f} MiB, "
                     f"loaded {measured['rss_loaded'] / MIB:.1f} MiB, peak after step "
                     f"{measured['peak_after_step'] / MIB:.1f} MiB (step adds {measured['step_peak'] / MIB:.1f} MiB), "
                     f"step {measured['step_ms']:.1f} ms, inference {measured['inference_ms']:.1f} ms"]
    if judged is not None:
        rows.append("\n" + judged.line(t["name"]))
    return "\n".join(rows)


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Stacked bar chart of the breakdown (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = dict(report["adaptation"])
    total = parts.pop("total")
    kept = parts.pop("activations_kept")
    workspace = parts.pop("workspace")
    for need, v in report["activations_by_need"].items():
        parts[f"activations: {need}"] = v
    parts["workspace"] = workspace
    fig, ax = plt.subplots(figsize=(8, 3.2))
    colours = list(plt.cm.tab10.colors)
    left = 0.0
    for i, (k, v) in enumerate(parts.items()):
        ax.barh(["adaptation step"], [v / MIB], left=left, color=colours[i % 10], label=k.replace("_", " "))
        left += v / MIB
    ax.barh(["inference"], [report["inference"]["parameters"] / MIB], color=colours[0])
    ax.barh(["inference"], [report["inference"]["workspace"] / MIB],
            left=report["inference"]["parameters"] / MIB, color=colours[(len(parts) - 1) % 10])
    measured = report.get("measured")
    if measured:
        ax.axvline(measured["step_peak"] / MIB, color="black", ls=":",
                   label=f"measured step growth {measured['step_peak'] / MIB:.0f} MiB")
    del kept, total
    budget = report["target"]["budget_mib"]
    if budget < 4 * report["adaptation"]["total"] / MIB:
        ax.axvline(budget, color="red", ls="--", label=f"budget {budget} MiB")
    ax.set_xlabel("MiB")
    ax.set_title(f"{Path(report['bundle']).name}: batch {report['batch']} on {report['target']['name']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
