"""onnxruntime's NCHWc reorders against the tensor's shape: why a frozen conv's output at 32 x 32
costs more to bring back to NCHW than the same data at other sizes (docs/speed.md).

    python -m benchmarks.reorders

One graph per shape: a Conv with constant 3 x 3 weights (onnxruntime's x86-64 NCHWc layout
converts it, with a ReorderInput before and a ReorderOutput after) and a ReduceMean over H and W,
which the layout does not cover. onnxruntime's profiler gives each node's kernel time; the
figures are medians over the runs after a warm-up, one thread, no arena. The first shapes are
WRN-40-2's at batch 64; the others change one dimension to see what the time follows.

Writes benchmarks/results/reorders.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, HelpFormatter, positive_int, run_cli
from edgetta.ort import onnxruntime
from edgetta.system import write_text_atomic

OUT = RESULTS / "reorders.json"
SHAPES = ((64, 32, 32, 32), (64, 64, 16, 16), (64, 128, 8, 8), (64, 32, 32, 31), (64, 32, 33, 33), (64, 16, 32, 32))


def kernel_ms(shape: tuple[int, int, int, int], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median kernel ms per op type of the Conv -> ReduceMean graph on ``shape`` (NCHW)."""
    from onnx import TensorProto, helper, numpy_helper
    ort = onnxruntime()
    c = shape[1]
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((c, c, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["y"], ["z"], axes=[2, 3])],
        "reorder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="edgetta-reorders-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            sess.run(None, {"x": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[e["args"]["op_name"]].append(e["dur"] / 1e3)
    return {op: round(statistics.median(t[warmup:]), 3) for op, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reorders", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--runs", type=positive_int, default=30)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    rows = []
    print("| N x C x H x W | Conv ms | ReorderInput ms | ReorderOutput ms | ReorderOutput ns per value |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        ms = kernel_ms(shape, a.runs)
        if "ReorderOutput" not in ms:
            raise SystemExit("onnxruntime made no NCHWc reorder here (its NCHWc layout is x86-64 only)")
        per_value = ms["ReorderOutput"] * 1e6 / float(np.prod(shape))
        rows.append({"shape": list(shape), "kernel_ms": ms, "reorder_output_ns_per_value": round(per_value, 3)})
        print(f"| {' x '.join(map(str, shape))} | {ms['Conv']:.2f} | {ms['ReorderInput']:.2f} | "
              f"{ms['ReorderOutput']:.2f} | {per_value:.2f} |")
    write_text_atomic(a.out, json.dumps({"command": "python -m benchmarks.reorders", "runs": a.runs,
                                         "machine": platform.platform(),
                                         "onnxruntime": onnxruntime().__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
