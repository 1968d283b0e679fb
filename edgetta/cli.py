"""``edgetta``: one verb per job.

    edgetta export [--checkpoint CKPT] --out BUNDLE     host: PyTorch checkpoint -> device bundle
    edgetta adapt BUNDLE [--stream demo|FILE]           device: accuracy with and without adaptation
    edgetta profile BUNDLE [--target T] [--batch N]     device: memory of adaptation vs a budget
    edgetta serve BUNDLE --source 0|video|dir|rtsp://|http://   device: predict and adapt a live stream
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import serve

EXPORT_HINT = ("edgetta export needs the host toolchain (PyTorch and ONNX), which the device "
               "install leaves out. Install it with:  pip install 'edgetta[export]'")


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr,
                    disable=not enabled, dynamic_ncols=True)
    except ImportError:
        return iterable


def cmd_export(a: argparse.Namespace) -> int:
    try:
        from edgetta_export import bundle as host_bundle
        from edgetta_export import checkpoint as ckpt_io
    except ImportError as e:
        print(f"error: {EXPORT_HINT}\n(missing module: {e.name})", file=sys.stderr)
        return 2
    ckpt_path = Path(a.checkpoint) if a.checkpoint else host_bundle.DEFAULT_CHECKPOINT
    t = time.time()
    manifest = host_bundle.export_bundle(
        ckpt_io.load(ckpt_path), a.out, lr=a.lr, momentum=a.momentum, lam=a.lam, e0=a.e0,
        batch_size=a.batch, sparse_storage=not a.dense_storage, lean=not a.no_lean)
    bb = manifest["backbone"]
    print(f"exported {ckpt_path.name} -> {a.out} in {time.time() - t:.1f}s: "
          f"{manifest['model']['architecture']}, K={manifest['ecotta']['k']} meta networks, "
          f"{manifest['parameters']['trainable']} trainable / {manifest['parameters']['backbone']} "
          f"backbone parameters, backbone density {bb['density']:.3f}, "
          f"bundle {manifest['bundle_bytes'] / 1e6:.2f} MB")
    return 0


def _accuracy(pred: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((pred == labels).mean())


def run_stream(adapter, images: np.ndarray, batch: int, adapt: bool, progress: bool = True,
               desc: str = "") -> np.ndarray:
    preds = []
    n_batches = (len(images) + batch - 1) // batch
    for i in _progress(range(n_batches), n_batches, desc, progress):
        logits = adapter.step(images[i * batch:(i + 1) * batch], adapt=adapt)
        preds.append(logits.argmax(1))
    return np.concatenate(preds)


def cmd_adapt(a: argparse.Namespace) -> int:
    from .adapter import Adapter
    from .bundle import BundleError
    from .streams import load_stream

    try:
        adapter = Adapter.load(a.bundle, provider=a.provider, lr=a.lr, engine=a.engine)
    except (BundleError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stream = load_stream(a.stream)
    images, labels = stream.images[:a.limit], (None if stream.labels is None else stream.labels[:a.limit])
    show = not a.quiet
    t0 = time.perf_counter()
    source = run_stream(adapter, images, a.batch, adapt=False, progress=show, desc="no adaptation")
    t1 = time.perf_counter()
    adapter.reset()
    adapted = run_stream(adapter, images, a.batch, adapt=True, progress=show, desc="adapting")
    t2 = time.perf_counter()
    report = {
        "bundle": str(a.bundle), "stream": stream.description, "frames": int(len(images)),
        "batch": a.batch, "lr": adapter.lr, "momentum": adapter.momentum, "engine": adapter.engine,
        "accuracy_no_adaptation": _accuracy(source, labels),
        "accuracy_adapted": _accuracy(adapted, labels),
        "ms_per_batch_inference": 1e3 * (t1 - t0) / max(1, -(-len(images) // a.batch)),
        "ms_per_batch_adaptation": 1e3 * (t2 - t1) / max(1, -(-len(images) // a.batch)),
        "adaptation_steps": adapter.steps,
    }
    if labels is not None and stream.domains is not None and stream.domain_names:
        doms = stream.domains[:a.limit]
        report["per_domain"] = {
            stream.domain_names[d]: {"no_adaptation": _accuracy(source[doms == d], labels[doms == d]),
                                     "adapted": _accuracy(adapted[doms == d], labels[doms == d])}
            for d in np.unique(doms)}
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"stream: {report['stream']} ({report['frames']} frames, batch {a.batch})")
    if "per_domain" in report:
        print(f"  {'domain':20s} {'no adaptation':>14s} {'adapted':>9s}")
        for name, r in report["per_domain"].items():
            print(f"  {name:20s} {100 * r['no_adaptation']:13.1f}% {100 * r['adapted']:8.1f}%")
    if labels is not None:
        print(f"accuracy without adaptation: {100 * report['accuracy_no_adaptation']:.1f}%")
        print(f"accuracy with EcoTTA adaptation (continual, online): "
              f"{100 * report['accuracy_adapted']:.1f}%")
    print(f"time per batch: inference {report['ms_per_batch_inference']:.1f} ms, "
          f"predict+adapt {report['ms_per_batch_adaptation']:.1f} ms")
    return 0


def cmd_profile(a: argparse.Namespace) -> int:
    from .bundle import Bundle, BundleError
    from .profile import MIB, analyse, format_table, measure_step, plot
    from .targets import get_target

    try:
        bundle = Bundle.open(a.bundle)
        target = get_target(a.target)
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.budget is not None:
        target = type(target)(**{**target.as_dict(), "budget_mib": int(a.budget)})
    batch = a.batch or bundle.manifest["adaptation"]["batch_size"]
    report = analyse(bundle, target, batch)
    try:
        measured = None if a.no_measure else measure_step(bundle.path, batch, provider=a.provider)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if measured:
        report["measured"] = measured
        report["fits"] = report["fits"] and measured["peak_after_step"] <= target.budget_mib * MIB
    if a.plot:
        plot(report, a.plot)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report, measured))
    return 0 if report["fits"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgetta", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a warmed-up checkpoint to a device bundle (host)")
    e.add_argument("--checkpoint", default=None,
                   help="host checkpoint from 'python -m edgetta_export.warmup' (default: the built-in "
                        "ERK-pruned WRN-16-2 trained on Fashion-MNIST)")
    e.add_argument("--out", default="bundles/default", help="bundle folder to write")
    e.add_argument("--lr", type=float, default=0.005, help="adaptation learning rate")
    e.add_argument("--momentum", type=float, default=0.9)
    e.add_argument("--lam", type=float, default=0.5, help="weight of the self-distilled regularizer")
    e.add_argument("--e0", type=float, default=None, help="entropy threshold (default 0.4 ln C)")
    e.add_argument("--batch", type=int, default=64, help="default adaptation batch size")
    e.add_argument("--dense-storage", action="store_true",
                   help="store backbone weights densely instead of as sparse initializers")
    e.add_argument("--no-lean", action="store_true",
                   help="keep onnxruntime-training's training graph as generated (frozen layers "
                        "keep float activations) instead of the mask-based rewrite")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("adapt", help="adapt a bundle on a labelled stream and report accuracy")
    d.add_argument("bundle", help="bundle folder written by 'edgetta export'")
    d.add_argument("--stream", default="demo", help="'demo' (built-in corrupted stream), .npz or .npy")
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--limit", type=int, default=None, help="use the first N frames")
    d.add_argument("--lr", type=float, default=None, help="override the bundle's learning rate")
    d.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--engine", default="ort-training", choices=["ort-training", "onnx"],
                   help="onnxruntime-training, or the portable step on plain onnxruntime")
    d.add_argument("--json", action="store_true", help="print a JSON report")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_adapt)
    serve.add_parser(sub)

    f = sub.add_parser("profile", help="memory of one adaptation step and of inference on a target")
    f.add_argument("bundle")
    f.add_argument("--target", default="x86-64",
                   help="x86-64, rpi4-4gb, rpi4-1gb, jetson-orin-nano, arm-sbc-512mb")
    f.add_argument("--batch", type=int, default=None, help="adaptation batch (default: the bundle's)")
    f.add_argument("--budget", type=float, default=None, help="MiB; overrides the target's budget")
    f.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    f.add_argument("--no-measure", action="store_true",
                   help="static analysis only (no adaptation step is run on this machine)")
    f.add_argument("--json", action="store_true")
    f.add_argument("--plot", default=None, help="write a bar chart PNG of the breakdown")
    f.set_defaults(func=cmd_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
