"""What a loaded bundle costs before any step: the frozen weights as onnxruntime holds them.

    python -m benchmarks.load_memory                          # WRN-28-10, ResNet-50 on this machine
    python -m benchmarks.load_memory --arm64                  # also on aarch64 (scripts/arm64_emulation.sh)
    python -m benchmarks.load_memory --part adapter --models wrn16_2 wrn28_10 --arm64

For each model, a bundle with and without the export's BatchNorm folding
(``export_bundle(fold_batchnorms=...)``); each session is created alone in a fresh process, with
onnxruntime's weight pre-packing on (its default) and off (edgetta's setting), and its RSS
growth is recorded: the inference session, onnxruntime-training's Module on the training graph
(x86-64 only: there is no aarch64 build), and the portable step on plain onnxruntime.
``--arm64`` runs the plain-onnxruntime sessions again in the emulated arm64 Python, where
onnxruntime has no NCHWc layout; RSS there is the qemu-user process's (its translated code
counts too), so compare its rows with each other, not with a board's.

``--part adapter``: the whole ``Adapter`` (engine and inference session, edgetta's settings,
one thread) on the folded bundle, each engine with and without shared frozen weights
(``share_weights``), one fresh process each: RSS added by loading, then by one prediction and
one step at ``--batch``, the median step time, and how far its logits and adapted state are
from the same engine's without sharing. Step times under emulation say nothing about a board.
Writes ``benchmarks/results/load_memory.json`` (``rows``: sessions, ``adapter_rows``: adapters).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import (RESULTS, ROOT, HelpFormatter, export_cached_bundle, load_json, merge_json, run_cli,
                               untrained_checkpoint)

ARM = Path(os.environ.get("EDGETTA_ARM64_ROOT", "/opt/edgetta-arm64"))

# one session in a fresh process, with the Adapter's allocator and session settings (pre-packing
# as asked); plain onnxruntime, or onnxruntime-training's Module
CHILD = r"""
import json, sys
kind, path, prepack = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
from edgetta.engines import session_options
from edgetta.system import pin_mmap_threshold, rss_bytes as rss
pin_mmap_threshold()  # as the Adapter does
import onnxruntime as ort
ort.set_default_logger_severity(3)
opts = session_options(prepacking=prepack)
if kind == "module":
    from edgetta.ort import training_api  # onnxruntime.training.api without torch
    api = training_api()
    before = rss()
    state = api.CheckpointState.load_checkpoint(path + "/checkpoint")
    session = api.Module(path + "/training_model.onnx", state, device="cpu", session_options=opts)
else:
    before = rss()
    session = ort.InferenceSession(path + "/" + kind, opts, providers=["CPUExecutionProvider"])
print(json.dumps({"loaded_bytes": rss() - before}))
"""

SESSIONS = {"inference": "inference.onnx", "training module": "module", "portable step": "portable_step.onnx"}

# one Adapter in a fresh process: RSS after loading, after a prediction and ``steps`` steps;
# its outputs go to an npz for the comparison with the unshared run
ADAPTER_CHILD = r"""
import json, sys, time
import numpy as np
path, engine, share, batch, steps, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
from edgetta.system import rss_bytes as rss
from edgetta import Adapter
from edgetta.ort import has_training_api
has_training_api()  # onnxruntime's training API, where it exists, is imported before the baseline
before = rss()
a = Adapter.load(path, engine=engine, share_weights=share, threads=1)
loaded = rss() - before
frames = np.random.default_rng(0).integers(0, 256, (batch, *a.bundle.input_size, 3), dtype=np.uint8)
predicted = a.step(frames[:1], adapt=False)
times, adapted = [], []
for _ in range(steps):
    t = time.perf_counter()
    adapted.append(a.step(frames))
    times.append(time.perf_counter() - t)
stepped = rss() - before
np.savez(out, predicted=predicted, adapted=np.stack(adapted), **{"state/" + k: v for k, v in a.meta_state().items()})
print(json.dumps(dict(engine=a.engine, shared_bytes=a.shared.nbytes if a.shared else 0, loaded=loaded,
                      stepped=stepped, step_s=sorted(times)[len(times) // 2])))
"""


def weights_bytes(bundle: Path) -> int:
    import onnx
    from edgetta.profile import initializer_elems  # dense and sparse initializers alike
    return 4 * sum(initializer_elems(onnx.load(bundle / "inference.onnx").graph).values())


def run_child(code: str, args: list[str], emulated: bool) -> dict:
    """Run ``code`` in a fresh Python (the emulated arm64 one if ``emulated``); its last line of
    output, as JSON."""
    if emulated:
        cmd = ["qemu-aarch64-static", "-L", str(ARM / "sysroot"), str(ARM / "sysroot/usr/bin/python3.11")]
        env = dict(os.environ, PYTHONPATH=f"{ARM / 'site'}{os.pathsep}{ROOT}")
    else:
        cmd = [sys.executable]
        env = dict(os.environ)
    r = subprocess.run([*cmd, "-c", code, *args], capture_output=True, text=True, env=env, timeout=3600, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(kind: str, bundle: Path, prepack: bool, emulated: bool) -> int:
    return run_child(CHILD, [kind, str(bundle), "1" if prepack else "0"], emulated)["loaded_bytes"]


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two runs' logits and adapted state."""
    with np.load(a) as x, np.load(b) as y:
        return max(float(np.abs(x[k] - y[k]).max()) for k in x.files)


def measure_adapters(model: str, bundle: Path, machine: str, emulated: bool, batch: int,
                     steps: int, scratch: Path) -> list[dict]:
    """One row per engine and sharing setting: see the module's docstring."""
    mib = 1 << 20
    rows = []
    for engine in ("onnx",) if emulated else ("ort-training", "onnx"):
        outputs = {}
        for share in (False, True):
            outputs[share] = scratch / f"{model}_{machine}_{engine}_{int(share)}.npz"
            r = run_child(ADAPTER_CHILD, [str(bundle), engine, "1" if share else "0", str(batch), str(steps),
                                          str(outputs[share])], emulated)
            row = {"model": model, "machine": machine, "engine": engine, "share_weights": share,
                   "batch": batch, "steps": steps, "shared_mib": round(r["shared_bytes"] / mib, 1),
                   "loaded_mib": round(r["loaded"] / mib, 1), "after_step_mib": round(r["stepped"] / mib, 1),
                   "step_s": round(r["step_s"], 3)}
            if share:
                row["max_abs_diff_vs_unshared"] = max_difference(outputs[False], outputs[True])
            rows.append(row)
            print(f"{model:9s} {machine:8s} {engine:12s} share={share!s:5s} shared {row['shared_mib']:6.1f} MiB  "
                  f"loaded +{row['loaded_mib']:6.1f}  after a step +{row['after_step_mib']:6.1f} MiB  "
                  f"step {row['step_s']:.3f} s" + (f"  max diff {row['max_abs_diff_vs_unshared']:.2e}" if share else ""),
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_memory", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["wrn28_10", "resnet50"])
    p.add_argument("--arm64", action="store_true", help="also measure plain onnxruntime on emulated aarch64")
    p.add_argument("--part", choices=("all", "sessions", "adapter"), default="all")
    p.add_argument("--batch", type=int, default=8, help="frames per step in the adapter part")
    p.add_argument("--arm64-batch", type=int, default=2, help="the same under emulation (slow)")
    p.add_argument("--steps", type=int, default=3, help="steps per adapter run (emulated: 1)")
    p.add_argument("--out", default=str(RESULTS / "load_memory.json"))
    a = p.parse_args(argv)
    if a.arm64 and not (ARM / "sysroot/usr/bin/python3.11").exists():
        p.error(f"no arm64 Python at {ARM}: run scripts/arm64_emulation.sh (root) first")
    command = "python -m benchmarks.load_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    machines = [platform.machine()] + (["aarch64"] if a.arm64 else [])
    mib = 1 << 20
    rows, adapter_rows = [], []
    for model in a.models:
        ckpt = untrained_checkpoint(model)
        for fold in (True,) if a.part == "adapter" else (False, True):
            bundle = export_cached_bundle(ckpt, f"{model}_load_{'folded' if fold else 'unfolded'}",
                                          portable=True, fold_batchnorms=fold)
            if fold and a.part != "sessions":
                with tempfile.TemporaryDirectory() as scratch:
                    for machine in machines:
                        emulated = machine != machines[0]
                        adapter_rows += measure_adapters(model, bundle, machine, emulated,
                                                         a.arm64_batch if emulated else a.batch,
                                                         1 if emulated else a.steps, Path(scratch))
            if a.part == "adapter":
                continue
            weights = weights_bytes(bundle)
            for machine in machines:
                for session, kind in SESSIONS.items():
                    if machine != machines[0] and kind == "module":  # no aarch64 build
                        continue
                    for prepack in (True, False):
                        loaded = measure(kind, bundle, prepack, emulated=machine != machines[0])
                        row = {"model": model, "machine": machine, "session": session,
                               "batchnorms_folded": fold, "prepacking": prepack,
                               "weights_mib": round(weights / mib, 1), "loaded_mib": round(loaded / mib, 1)}
                        rows.append(row)
                        print(f"{model:9s} {machine:8s} {session:16s} fold={fold!s:5s} prepack={prepack!s:5s} "
                              f"weights {row['weights_mib']:6.1f} MiB  loaded +{row['loaded_mib']:6.1f} MiB", flush=True)
    sections: dict = {}
    if rows:
        sections.update(rows=rows, command=command)
    if adapter_rows:
        # rows of models and machines measured by an earlier command are kept, with its command
        old = load_json(Path(a.out))
        measured = {(r["model"], r["machine"]) for r in adapter_rows}
        kept = [r for r in old.get("adapter_rows", []) if (r["model"], r["machine"]) not in measured]
        sections["adapter_rows"] = kept + [dict(r, command=command) for r in adapter_rows]
    merge_json(Path(a.out), sections)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
