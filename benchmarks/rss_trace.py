"""Where in a step the memory goes: the process's RSS over one adaptation step, node by node.

    python -m benchmarks.rss_trace                                # the built-in model, training engine
    python -m benchmarks.rss_trace --model resnet50 --engine onnx --plot /tmp/r50.png
    python -m benchmarks.rss_trace --bundle bundles/default --threshold 2

The static estimate (``edgetta profile``) follows the graph's order; onnxruntime may run another
(on x86-64 its NCHWc pass re-creates the frozen convs with later node indices, which its
priority-based order then runs after older ready nodes). This measures instead: one warm-up step,
then one step while a second process reads this one's resident set from /proc every 0.3 ms
(onnxruntime-training's step holds the GIL, so a thread could not), with onnxruntime's profiler on.
Each node's end is matched with the RSS at that moment; the nodes where it moved by more than
``--threshold`` MiB are printed, with the peak and the node running then. Linux only.

The samples and the profile share the monotonic clock; the step's first profiled node is
taken to start when ``step`` is called (its profile holds the warm-up step too, before the
largest gap). Writes JSON (``--out``) and, with ``--plot``, RSS against time, peak marked.
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, HelpFormatter, export_cached_bundle, run_cli, untrained_checkpoint
from edgetta.bundle import Bundle
from edgetta.engines import select_engine, session_options
from edgetta.errors import EdgettaError
from edgetta.profile import MIB
from edgetta.system import pin_mmap_threshold, write_text_atomic

OUT = RESULTS / "rss_trace.json"

_SAMPLER = r"""
import os, sys, time
pid, stop, out = sys.argv[1:4]
rows = []
with open(f"/proc/{pid}/statm") as f:
    while not os.path.exists(stop):
        f.seek(0)
        rows.append(f"{time.perf_counter_ns()} {f.read().split()[1]}")
        time.sleep(0.0003)
with open(out, "w") as f:
    f.write("\n".join(rows))
"""


def trace(bundle_dir: str | os.PathLike, engine: str = "ort-training", batch: int = 64,
          threads: int = 1) -> dict[str, Any]:
    """RSS samples and node events of one step after a warm-up step, in this process."""
    if not Path("/proc/self/statm").exists():
        raise EdgettaError("rss_trace reads /proc: Linux only")
    pin_mmap_threshold()  # as the Adapter does
    bundle = Bundle.open(bundle_dir)
    work = Path(tempfile.mkdtemp(prefix="rss-trace-"))
    opts = session_options(threads=threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / "profile")
    runner = select_engine(engine, bundle, opts=opts)
    x = np.random.default_rng(0).standard_normal((batch, 3, *bundle.input_size)).astype(np.float32)
    runner.step(x)
    stop, samples = work / "stop", work / "samples.txt"
    sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid()), str(stop), str(samples)])
    time.sleep(0.3)
    t0 = time.perf_counter_ns()
    runner.step(x)
    t1 = time.perf_counter_ns()
    time.sleep(0.05)
    stop.touch()
    sampler.wait(timeout=60)
    del runner  # the profile is written when the session ends
    gc.collect()
    profiles = glob.glob(str(work / "profile*.json"))
    if not profiles:
        raise EdgettaError(f"onnxruntime wrote no profile under {work}")
    events = [e for e in json.loads(Path(max(profiles, key=os.path.getsize)).read_text())
              if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    events.sort(key=lambda e: e["ts"])
    gap = max(range(len(events) - 1), key=lambda i: events[i + 1]["ts"] - events[i]["ts"] - events[i]["dur"])
    step_events = events[gap + 1:]
    first = step_events[0]["ts"]
    page = os.sysconf("SC_PAGE_SIZE")
    rows = [line.split() for line in samples.read_text().splitlines() if line]
    t_ms = np.array([(int(t) - t0) / 1e6 for t, _ in rows])
    rss = np.array([int(p) * page / MIB for _, p in rows])
    nodes = [{"name": e["name"][:-len("_kernel_time")], "op": e["args"].get("op_name", ""),
              "start_ms": (e["ts"] - first) / 1e3, "ms": e["dur"] / 1e3} for e in step_events]
    return {"bundle": str(bundle_dir), "engine": engine, "batch": batch, "threads": threads,
            "step_ms": (t1 - t0) / 1e6, "t_ms": t_ms.tolist(), "rss_mib": rss.tolist(), "nodes": nodes}


def changes(result: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The peak, the node running at it, and the nodes at whose end RSS had moved by more than
    ``threshold`` MiB since the previous such node."""
    t, rss = np.array(result["t_ms"]), np.array(result["rss_mib"])
    inside = (t >= 0) & (t <= result["step_ms"])
    if not inside.any():
        raise EdgettaError("no RSS sample fell inside the step")
    t, rss = t[inside], rss[inside]

    def at(ms: float) -> float:
        return float(rss[min(bisect_left(t, ms), len(rss) - 1)])

    peak_i = int(rss.argmax())
    peak_t = float(t[peak_i])
    running = next((n for n in result["nodes"] if n["start_ms"] <= peak_t <= n["start_ms"] + n["ms"]),
                   min(result["nodes"], key=lambda n: abs(n["start_ms"] + n["ms"] - peak_t)))
    moves, prev = [], float(rss[0])
    for n in result["nodes"]:
        now = at(n["start_ms"] + n["ms"])
        if abs(now - prev) > threshold:
            moves.append({**n, "rss_mib": now, "change_mib": now - prev})
            prev = now
    return {"start_mib": float(rss[0]), "peak_mib": float(rss.max()), "peak_ms": peak_t,
            "peak_node": running, "moves": moves}


def plot(result: dict[str, Any], summary: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t, rss = np.array(result["t_ms"]), np.array(result["rss_mib"])
    pad = 0.03 * result["step_ms"]
    keep = (t >= -pad) & (t <= result["step_ms"] + pad)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t[keep], rss[keep], lw=1)
    ax.axvline(summary["peak_ms"], color="#d62728", lw=0.8)
    right = summary["peak_ms"] > 0.5 * result["step_ms"]  # keep the label inside the axes
    ax.annotate(f"peak {summary['peak_mib']:.0f} MiB: {summary['peak_node']['op']} "
                f"{summary['peak_node']['name'][:45]} ", (summary["peak_ms"], summary["peak_mib"]),
                fontsize=8, ha="right" if right else "left", va="top")
    ax.set_xlabel("ms into the step")
    ax.set_ylabel("RSS, MiB")
    ax.set_title(f"{Path(result['bundle']).name}, {result['engine']}, batch {result['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rss_trace", description=__doc__,
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="a bundle (default: the built-in model's)")
    src.add_argument("--model", help="an untrained ERK-80%% zoo model instead (benchmarks.common)")
    p.add_argument("--engine", default="ort-training", choices=["ort-training", "onnx"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threshold", type=float, default=None,
                   help="MiB a node must move RSS by to be listed (default: 2%% of the peak)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--plot", default=None, help="PNG of RSS over the step")
    a = p.parse_args(argv)
    if not a.bundle:  # export here (torch), trace in a fresh process without it, as on a device
        from edgetta_export import checkpoint
        from edgetta_export.bundle import DEFAULT_CHECKPOINT
        ckpt = untrained_checkpoint(a.model) if a.model else checkpoint.load(DEFAULT_CHECKPOINT)
        bundle = export_cached_bundle(ckpt, f"rss_trace_{a.model or 'default'}")
        options = ["--bundle", str(bundle), "--engine", a.engine, "--batch", str(a.batch), "--out", a.out,
                   *(["--threshold", str(a.threshold)] if a.threshold is not None else []),
                   *(["--plot", a.plot] if a.plot else [])]
        return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                               "from benchmarks.rss_trace import main; from edgetta.console import run_cli; "
                               "sys.exit(run_cli(main))", *options]).returncode
    bundle = Path(a.bundle)
    result = trace(bundle, a.engine, a.batch)
    summary = changes(result, a.threshold if a.threshold is not None else 0.02 * max(result["rss_mib"]))
    print(f"{bundle} ({a.engine}, batch {a.batch}): step {result['step_ms']:.0f} ms, RSS "
          f"{summary['start_mib']:.0f} -> peak {summary['peak_mib']:.0f} MiB at {summary['peak_ms']:.0f} ms, "
          f"during {summary['peak_node']['op']} {summary['peak_node']['name']}")
    for m in summary["moves"]:
        print(f"  {m['start_ms'] + m['ms']:9.1f} ms {m['rss_mib']:8.0f} MiB ({m['change_mib']:+7.0f})  "
              f"{m['op']:22s} {m['name']}")
    # the RSS series where it moved by 0.1 MiB or more: the same curve, a fraction of the samples
    kept, last = [], None
    for t, r in zip(result["t_ms"], result["rss_mib"]):
        if last is None or abs(r - last) >= 0.1:
            kept.append((round(t, 2), round(r, 1)))
            last = r
    result["t_ms"], result["rss_mib"] = [t for t, _ in kept], [r for _, r in kept]
    nodes = result.pop("nodes")  # the summary names the ones that matter
    write_text_atomic(Path(a.out), json.dumps({**result, "node_count": len(nodes), "summary": summary}) + "\n")
    if a.plot:
        plot(result, summary, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
