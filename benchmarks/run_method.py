"""Run ONE method on ONE stream in this process and print one JSON line.

    python -m benchmarks.run_method --method tent --stream .cache/benchmarks/stream.npz --batch 64
    python -m benchmarks.run_method --method edgetta --bundle BUNDLE --stream STREAM.npz
    python -m benchmarks.run_method --method cotta --model wrn28_10 --random-steps 1 --batch 64

Memory is the process's own: peak RSS (``VmHWM``) while loading, RSS once loaded, and the
peak while adapting (the kernel's high-water mark is reset after loading by writing 5 to
``/proc/self/clear_refs``), so ``adaptation_share = adapt peak - loaded RSS``. For torch methods
the bytes autograd saved for backward in one step are counted too (parameters excluded).

``edgetta`` runs in a process where ``import torch`` fails, as on a device. Every method gets
the same thread count (torch's intra-op threads, onnxruntime's intra-op threads).

Allocator (``--malloc``): ``edgetta.Adapter`` pins glibc's mmap threshold at 64 KiB so that
freed activations go back to the OS; PyTorch leaves glibc's dynamic threshold alone. ``auto``
runs each as it ships (torch methods: glibc default; edgetta: pinned); ``pinned`` pins it for a
torch method too, to compare like with like; ``default`` is for torch methods only (the Adapter
always pins it).

This module imports no torch before it knows which method it runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import HelpFormatter, positive_int, run_cli
from benchmarks.methods import RUNNABLE, TORCH_METHODS, EcoTTASettings
from edgetta.system import MIB, peak_rss_bytes, pin_mmap_threshold, reset_peak_rss, rss_bytes


def errors(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray, names: list[str]) -> dict[str, float]:
    wrong = pred != labels
    return {names[g] if names else str(g): float(wrong[groups == g].mean()) for g in np.unique(groups)}


class TorchRunner:
    def __init__(self, a: argparse.Namespace):
        import torch
        torch.set_num_threads(a.threads)
        torch.manual_seed(a.seed)
        from benchmarks.methods import create
        from edgetta_export import checkpoint
        from edgetta_export.train import to_tensor

        self.torch = torch
        if a.model:
            from benchmarks.common import untrained_checkpoint
            ckpt = untrained_checkpoint(a.model)
        else:
            ckpt = checkpoint.load(a.checkpoint)
        hyper = None
        if a.bundle:
            hyper = EcoTTASettings.from_manifest(json.loads((Path(a.bundle) / "manifest.json").read_text()))
        kwargs = {"augmentations": a.cotta_augmentations} if a.method == "cotta" and a.cotta_augmentations else {}
        self.method = create(a.method, ckpt, lr=a.lr, hyper=hyper, seed=a.seed, **kwargs)
        self.mean, self.std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
        self.to_tensor = to_tensor
        self.contiguous = a.contiguous_input
        self.input_size = ckpt.get("input_size", 32)
        self.num_classes = len(ckpt["class_names"])
        del ckpt

    def step(self, frames: np.ndarray, count_saved: bool = False) -> tuple[np.ndarray, int | None]:
        x = self.to_tensor(frames, self.mean, self.std)  # NHWC frames permuted: channels-last strides
        if self.contiguous:
            x = x.contiguous()
        if not count_saved:
            return self.method.step(x).numpy(), None
        torch = self.torch
        own = {t.untyped_storage().data_ptr() for mod in self.method.modules()
               for t in list(mod.parameters()) + list(mod.buffers())}
        saved: dict = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = self.method.step(x).numpy()
        return logits, sum(saved.values())

    def facts(self) -> dict:
        out = {"state_bytes": self.method.state_bytes(), "torch": self.torch.__version__}
        if hasattr(self.method, "augmented_steps"):
            out["cotta_augmented_fraction"] = self.method.augmented_steps / max(1, self.method.steps)
        return out


class EdgettaRunner:
    def __init__(self, a: argparse.Namespace):
        from edgetta import Adapter
        self.adapter = Adapter.load(a.bundle, engine=a.engine, lr=a.lr, threads=a.threads,
                                    memory_arena=a.memory_arena)
        import onnxruntime  # loaded by the Adapter already; only its version is read here
        self.adapt = not a.no_adapt
        self.input_size = self.adapter.bundle.input_size[0]
        self.num_classes = len(self.adapter.class_names)
        self.ort_version = onnxruntime.__version__

    def step(self, frames: np.ndarray, count_saved: bool = False) -> tuple[np.ndarray, None]:
        return self.adapter.step(frames, adapt=self.adapt), None

    def facts(self) -> dict:
        return {"onnxruntime": self.ort_version, "torch_loaded": sys.modules.get("torch") is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_method", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--method", required=True, choices=RUNNABLE)
    p.add_argument("--checkpoint", default=None, help="host checkpoint (torch methods; default: built-in)")
    p.add_argument("--model", default=None, help="untrained zoo model instead of a checkpoint (memory runs)")
    p.add_argument("--bundle", default=None, help="bundle (edgetta; EcoTTA hyperparameters for ecotta_torch)")
    p.add_argument("--stream", default=None, help="stream .npz (images, labels, domains, ...)")
    p.add_argument("--limit", type=int, default=None, help="first N frames of the stream")
    p.add_argument("--random-steps", type=int, default=0,
                   help="instead of a stream: this many steps on random frames (memory runs)")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--lr", type=float, default=None, help="override the method's learning rate")
    p.add_argument("--cotta-augmentations", type=int, default=None)
    p.add_argument("--no-adapt", action="store_true", help="edgetta: inference only (adapt=False)")
    p.add_argument("--engine", default="ort-training", choices=["ort-training", "onnx"],
                   help="edgetta: the engine (onnx: the portable step)")
    p.add_argument("--memory-arena", action="store_true", help="edgetta: Adapter(memory_arena=True)")
    p.add_argument("--contiguous-input", action="store_true",
                   help="torch methods: NCHW-contiguous input instead of edgetta_export.train.to_tensor's channels-last "
                        "strides (PyTorch 2.13's CPU backward segfaults for EcoTTA on ResNet-50 at 224x224 with "
                        "channels-last input)")
    p.add_argument("--malloc", default="auto", choices=["auto", "pinned", "default"],
                   help="glibc mmap threshold: as each method ships (auto), pinned at 64 KiB, or glibc's default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.method == "edgetta":
        sys.modules["torch"] = None  # as on a device: onnxruntime-training must not pull torch in
        sys.modules["torchvision"] = None
        if not a.bundle:
            p.error("--method edgetta needs --bundle")
    if a.method == "edgetta" and a.malloc == "default":
        p.error("--malloc default is for the torch methods: edgetta's Adapter pins the mmap threshold itself")
    if a.no_adapt and a.method != "edgetta":
        p.error("--no-adapt is for edgetta (the torch methods have source / source_meta)")
    if not a.stream and not a.random_steps:
        p.error("give --stream or --random-steps")
    if a.stream and not Path(a.stream).is_file():
        p.error(f"--stream {a.stream}: no such file")
    if a.checkpoint is None and a.model is None and a.method != "edgetta":
        from edgetta_export.bundle import DEFAULT_CHECKPOINT
        a.checkpoint = str(DEFAULT_CHECKPOINT)
    if a.malloc == "pinned":
        pin_mmap_threshold()

    if a.stream:
        with np.load(a.stream, allow_pickle=False) as d:
            images, labels = d["images"][:a.limit], d["labels"][:a.limit].astype(np.int64)
            domains = d["domains"][:a.limit]
            names = [str(s) for s in d["domain_names"]]
            severities = d["severities"][:a.limit] if "severities" in d.files else None
    t0 = time.perf_counter()
    runner = EdgettaRunner(a) if a.method == "edgetta" else TorchRunner(a)
    load_s = time.perf_counter() - t0
    if a.random_steps:
        size = runner.input_size
        images = np.random.default_rng(a.seed).integers(0, 256, (a.batch * a.random_steps, size, size, 3),
                                                        dtype=np.uint8)
        labels = None
    gc.collect()
    rss_loaded, peak_load = rss_bytes(), peak_rss_bytes()
    hwm_reset = reset_peak_rss()

    preds, times, saved = [], [], None
    n_batches = -(-len(images) // a.batch)
    for i in range(n_batches):
        frames = images[i * a.batch:(i + 1) * a.batch]
        t = time.perf_counter()
        logits, counted = runner.step(frames, count_saved=(i == 0 and a.method in TORCH_METHODS))
        times.append(time.perf_counter() - t)
        saved = counted if counted is not None else saved
        preds.append(np.asarray(logits).argmax(1))
        if i == 0:
            rss_after_first = rss_bytes()
    peak_adapt = peak_rss_bytes()
    pred = np.concatenate(preds)
    ms = np.array(times) * 1e3
    out = {
        "method": a.method + ("_no_adapt" if a.no_adapt else ""), "batch": a.batch,
        **({"engine": a.engine, "memory_arena": a.memory_arena} if a.method == "edgetta" else {}),
        "frames": int(len(images)), "batches": n_batches,
        "threads": a.threads, "seed": a.seed, "model": a.model or None,
        "malloc": ("pinned" if a.method == "edgetta" else "default") if a.malloc == "auto" else a.malloc,
        "ms_per_batch": float(np.median(ms[1:] if len(ms) > 1 else ms)),
        "ms_per_batch_mean": float(ms.mean()), "ms_first_batch": float(ms[0]),
        "load_s": round(load_s, 2),
        "rss_loaded_mib": rss_loaded / MIB,
        "peak_rss_load_mib": peak_load / MIB,
        "peak_rss_adapt_mib": peak_adapt / MIB,
        "peak_rss_mib": max(peak_load, peak_adapt) / MIB,
        "adaptation_share_mib": (peak_adapt - rss_loaded) / MIB,
        "rss_after_first_batch_mib": rss_after_first / MIB,
        "peak_reset": hwm_reset,
        "saved_for_backward_mib": None if saved is None else saved / MIB,
        "python": platform.python_version(), "machine": platform.machine(),
        **runner.facts(),
    }
    if labels is not None:
        out["error"] = float((pred != labels).mean())
        out["error_per_domain"] = errors(pred, labels, domains, names)
        if severities is not None and len(np.unique(severities)) > 1:
            out["error_per_severity"] = errors(pred, labels, severities, [])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_cli(main)
