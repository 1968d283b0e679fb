"""What a loaded bundle costs before any step: the frozen weights as onnxruntime holds them.

    python -m benchmarks.load_memory                          # WRN-28-10, ResNet-50 on this machine
    python -m benchmarks.load_memory --arm64                  # also on aarch64 (scripts/arm64_emulation.sh)

For each model, a bundle with and without the export's BatchNorm folding
(``export_bundle(fold_batchnorms=...)``); each session is created alone in a fresh process, with
onnxruntime's weight pre-packing on (its default) and off (edgetta's setting), and its RSS
growth is recorded: the inference session, onnxruntime-training's Module on the training graph
(x86-64 only: there is no aarch64 build), and the portable step on plain onnxruntime.
``--arm64`` runs the plain-onnxruntime sessions again in the emulated arm64 Python, where
onnxruntime has no NCHWc layout; RSS there is the qemu-user process's (its translated code
counts too), so compare its rows with each other, not with a board's.
Writes ``benchmarks/results/load_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, HelpFormatter, export_cached_bundle, merge_json, run_cli, untrained_checkpoint

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


def weights_bytes(bundle: Path) -> int:
    import onnx
    from edgetta.profile import initializer_elems  # dense and sparse initializers alike
    return 4 * sum(initializer_elems(onnx.load(bundle / "inference.onnx").graph).values())


def measure(kind: str, bundle: Path, prepack: bool, emulated: bool) -> int:
    if emulated:
        cmd = ["qemu-aarch64-static", "-L", str(ARM / "sysroot"), str(ARM / "sysroot/usr/bin/python3.11")]
        env = dict(os.environ, PYTHONPATH=f"{ARM / 'site'}{os.pathsep}{ROOT}")
    else:
        cmd = [sys.executable]
        env = dict(os.environ)
    r = subprocess.run([*cmd, "-c", CHILD, kind, str(bundle), "1" if prepack else "0"],
                       capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} on {bundle} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["loaded_bytes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_memory", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["wrn28_10", "resnet50"])
    p.add_argument("--arm64", action="store_true", help="also measure plain onnxruntime on emulated aarch64")
    p.add_argument("--out", default=str(RESULTS / "load_memory.json"))
    a = p.parse_args(argv)
    if a.arm64 and not (ARM / "sysroot/usr/bin/python3.11").exists():
        p.error(f"no arm64 Python at {ARM}: run scripts/arm64_emulation.sh (root) first")
    mib = 1 << 20
    rows = []
    for model in a.models:
        ckpt = untrained_checkpoint(model)
        for fold in (False, True):
            bundle = export_cached_bundle(ckpt, f"{model}_load_{'folded' if fold else 'unfolded'}",
                                          portable=True, fold_batchnorms=fold)
            weights = weights_bytes(bundle)
            machines = [platform.machine()] + (["aarch64"] if a.arm64 else [])
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
    merge_json(Path(a.out), {"rows": rows, "command": "python -m benchmarks.load_memory " + " ".join(argv or sys.argv[1:])})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
