"""Memory and time of one adaptation step: onnxruntime-training's generated graph, edgetta's
lean rewrite, and the lean rewrite with the meta networks' kept inputs compressed to 8 bits
(``LeanOptions(activation_bits=8)``), and that with the backward pass's buffers apart
(``separate_backward_buffers``, "separated") and also the regularizer's L1 gradients in place
(``l1_gradient_in_place``, "bounded"), same model, same batches, measured side by side in one run.
"default" is today's exporter defaults; "stochastic" the same with the kept inputs rounded
stochastically, and "no_fast_elementwise", "no_wide_packing", "no_declared_shapes",
"no_merged_gradients", "no_memory_order", "no_declared_rows" the same with that rewrite off
(docs/speed.md, docs/workspace.md). Each row also says how many minor page faults a step took.

    python -m benchmarks.step_memory --batches 16 64 --repeats 5
    python -m benchmarks.step_memory --models default wrn28_10 --graphs lean compressed \
        --engines ort-training onnx --batches 64 --repeats 1

Each measurement is a fresh torch-free process (``edgetta.profile.measure_step``, two steps) on
each engine of ``--engines``; the static figures come from the graph's liveness
(``edgetta.profile.analyse``) for that engine. A model other than ``default`` (``--checkpoint``)
is an untrained ERK-80% zoo model (memory does not depend on the weights' values).

``--interleaved N`` also times the graphs against each other in this one process, one thread
each, alternating one step of each graph N times (median; on a shared machine the load then
falls on every graph alike, which separate processes do not ensure).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, HelpFormatter, run_cli, untrained_checkpoint
from edgetta.bundle import Bundle
from edgetta.profile import MIB, analyse, measure_step
from edgetta.system import write_text_atomic
from edgetta.targets import get_target
from edgetta_export import checkpoint
from edgetta_export.bundle import DEFAULT_CHECKPOINT, export_bundle
from edgetta_export.lean import LeanOptions

# graph name -> export options
GRAPHS = {"generated": dict(lean=False),
          "lean": dict(lean=True, lean_options=LeanOptions(activation_bits=None, separate_backward_buffers=False,
                                                           l1_gradient_in_place=False)),
          "compressed": dict(lean=True, lean_options=LeanOptions(activation_bits=8, separate_backward_buffers=False,
                                                                 l1_gradient_in_place=False)),
          # the backward pass's buffers apart from the forward pass's (docs/workspace.md)
          "separated": dict(lean=True, lean_options=LeanOptions(activation_bits=8, separate_backward_buffers=True,
                                                                l1_gradient_in_place=False)),
          # and the regularizer's L1 gradients without a full-size Expand
          "bounded": dict(lean=True, lean_options=LeanOptions(activation_bits=8, separate_backward_buffers=True,
                                                              l1_gradient_in_place=True)),
          # every default of today's exporter but the kept inputs' rounding, and the defaults
          # (docs/compressed_activations.md, "Rounding to nearest")
          "stochastic": dict(lean=True, lean_options=LeanOptions(activation_rounding="stochastic")),
          # and each of the step-time rewrites of 2026-12-01 off (docs/speed.md)
          "no_fast_elementwise": dict(lean=True, lean_options=LeanOptions(fast_elementwise=False)),
          "no_wide_packing": dict(lean=True, lean_options=LeanOptions(wide_mask_packing=False)),
          "no_declared_shapes": dict(lean=True, lean_options=LeanOptions(declared_unpack_shapes=False)),
          # one weight gradient per term, as before 2026-12-01's merge (docs/speed.md)
          "no_merged_gradients": dict(lean=True, lean_options=LeanOptions(merged_weight_gradients=False)),
          "no_memory_order": dict(lean=True, lean_options=LeanOptions(memory_order=False)),
          "no_declared_rows": dict(lean=True, lean_options=LeanOptions(declared_restored_rows=False)),
          "default": dict(lean=True, lean_options=LeanOptions())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_memory", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--models", nargs="+", default=["default"],
                   help="'default' (--checkpoint) or untrained zoo models (e.g. wrn28_10, resnet50)")
    p.add_argument("--graphs", nargs="+", choices=list(GRAPHS),
                   default=["generated", "lean", "compressed", "separated", "bounded"])
    p.add_argument("--engines", nargs="+", choices=["ort-training", "onnx"], default=["ort-training"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per point (median kept)")
    p.add_argument("--interleaved", type=int, default=0, metavar="N",
                   help="also time N alternating steps of the graphs in one process, one thread (0: off)")
    p.add_argument("--out", default=str(RESULTS / "step_memory.json"))
    a = p.parse_args(argv)
    rows = []
    for model in a.models:
        ckpt = checkpoint.load(a.checkpoint) if model == "default" else untrained_checkpoint(model)
        with tempfile.TemporaryDirectory() as tmp:
            bundles = {}
            for graph in a.graphs:
                bundles[graph] = Path(tmp) / graph
                export_bundle(ckpt, bundles[graph], profile=False, portable="onnx" in a.engines, **GRAPHS[graph])
            rows += measure(model, bundles, a)
    write_text_atomic(a.out, json.dumps({"checkpoint": a.checkpoint, "command": "python -m benchmarks.step_memory "
                                         + " ".join(argv if argv is not None else sys.argv[1:]),
                                         "load_average": os.getloadavg(), "rows": rows}, indent=2))
    print(f"{'model':>9s} {'engine':>12s} {'batch':>5s} {'graph':>10s} {'static MiB':>11s} {'measured MiB':>13s} "
          f"{'peak RSS':>9s} {'step ms':>8s}")
    for r in rows:
        print(f"{r['model']:>9s} {r['engine']:>12s} {r['batch']:5d} {r['graph']:>10s} {r['static_step_mib']:11.1f} "
              f"{r['measured_step_growth_mib']:13.1f} {r['measured_peak_rss_mib']:9.1f} {r['step_ms']:8.1f}")
    return 0


def measure(model: str, bundles: dict[str, Path], a: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in a.batches:
        for engine in a.engines:
            timed, cpu = interleaved_step_ms(bundles, engine, batch, a.interleaved) if a.interleaved else ({}, {})
            for graph, path in bundles.items():
                static = analyse(Bundle.open(path), get_target("x86-64"), batch, engine=engine)
                runs = sorted((measure_step(path, batch, engine=engine) for _ in range(a.repeats)),
                              key=lambda m: m["step_peak"])
                m = runs[len(runs) // 2]
                row = {"model": model, "graph": graph, "engine": engine, "batch": batch,
                       **({"interleaved_step_ms": timed[graph], "interleaved_cpu_ms": cpu[graph]} if timed else {}),
                       "static_activations_mib": round(static["adaptation"]["activations_kept"] / MIB, 1),
                       "static_step_mib": round((static["adaptation"]["activations_kept"]
                                                 + static["adaptation"]["workspace"]) / MIB, 1),
                       "measured_step_growth_mib": round(m["step_peak"] / MIB, 1),
                       "measured_peak_rss_mib": round(m["peak_after_step"] / MIB, 1),
                       "step_ms": round(sorted(r["step_ms"] for r in runs)[len(runs) // 2], 1),
                       "minor_faults_per_step": m.get("minor_faults_per_step")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def interleaved_step_ms(bundles: dict[str, Path], engine: str, batch: int, steps: int
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and CPU (user + system) ms of ``steps`` adaptation steps per graph, the
    graphs' steps alternating. On a loaded machine the CPU time moves less than the wall clock;
    the system part is mostly page faults of freshly mapped buffers."""
    from edgetta import Adapter
    adapters = {g: Adapter.load(p, engine=engine, threads=1) for g, p in bundles.items()}
    first = next(iter(adapters.values()))
    frames = np.random.default_rng(0).integers(0, 256, (batch, *first.bundle.input_size, 3), dtype=np.uint8)
    x = first.preprocess(frames)
    times: dict[str, list[float]] = {g: [] for g in adapters}
    cpu: dict[str, list[float]] = {g: [] for g in adapters}
    for a in adapters.values():  # first steps allocate and plan
        a.adapt(x)
    for _ in range(steps):
        for g, a in adapters.items():
            t, c = time.perf_counter(), time.process_time()
            a.adapt(x)
            times[g].append((time.perf_counter() - t) * 1e3)
            cpu[g].append((time.process_time() - c) * 1e3)
    return ({g: round(float(np.median(v)), 1) for g, v in times.items()},
            {g: round(float(np.median(v)), 1) for g, v in cpu.items()})


if __name__ == "__main__":
    run_cli(main)
