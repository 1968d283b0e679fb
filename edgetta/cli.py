"""``edgetta``: one verb per job.

    edgetta export [--checkpoint CKPT] --out BUNDLE     host: PyTorch checkpoint -> device bundle
    edgetta adapt BUNDLE [--stream demo|FILE]           device: accuracy with and without adaptation
    edgetta profile BUNDLE [--target T] [--batch N]     device: memory of adaptation vs a budget
    edgetta serve BUNDLE --source 0|video|dir|rtsp://|http://   device: predict and adapt a live stream
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, serve
from .console import guarded
from .targets import TARGETS

EXPORT_HINT = ("edgetta export needs the host toolchain (PyTorch and ONNX), which the device "
               "install leaves out. Install it with:  pip install 'edgetta[export]'")


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr,
                    disable=None if enabled else True, dynamic_ncols=True)
    except ImportError:
        return iterable


def cmd_export(a: argparse.Namespace) -> int:
    try:
        from edgetta_export import bundle as host_bundle
        from edgetta_export import checkpoint as ckpt_io
    except ImportError as e:
        print(f"error: {EXPORT_HINT}\n(missing module: {e.name})", file=sys.stderr)
        return 2
    from .errors import EdgettaError

    t = time.time()
    try:
        if a.arch:
            from edgetta_export import own
            if not a.data:
                raise ValueError("--arch needs --data: the meta networks are warmed up on your images")
            opts = own.WarmupOptions(k=a.k, epochs=a.warmup_epochs, batch=a.warmup_batch, seed=a.seed)
            result = own.from_image_folder(
                a.arch, a.data, a.weights, input_size=a.input_size, options=opts,
                boundaries=a.boundaries.split(",") if a.boundaries else None, mean=a.mean, std=a.std)
            ckpt, source = result.checkpoint, f"{a.arch} ({a.weights or 'untrained'})"
            print(f"clean accuracy on {result.held_back_images} held-back images of {a.data}: "
                  f"{100 * result.accuracy_before:.1f}% before meta warm-up, "
                  f"{100 * result.accuracy_after:.1f}% after ({result.train_images} images, "
                  f"parts end at {', '.join(result.part_ends)})", flush=True)
            if a.save_checkpoint:
                ckpt_io.save(a.save_checkpoint, ckpt)
        else:
            ckpt_path = Path(a.checkpoint) if a.checkpoint else host_bundle.DEFAULT_CHECKPOINT
            ckpt, source = ckpt_io.load(ckpt_path), ckpt_path.name
        options = {}
        if a.activation_bits is not None or a.activation_rounding is not None or a.lean_off:
            from dataclasses import fields

            from edgetta_export.lean import LeanOptions
            defaults = LeanOptions()
            switches = [f.name for f in fields(LeanOptions) if isinstance(getattr(defaults, f.name), bool)]
            unknown = [n for n in a.lean_off if n not in switches]
            if unknown:
                raise ValueError(f"--lean-off: no rewrite {unknown[0]!r} (choose from {', '.join(switches)})")
            bits = (defaults.activation_bits if a.activation_bits is None else
                    None if a.activation_bits == "none" else int(a.activation_bits))
            options["lean_options"] = LeanOptions(
                activation_bits=bits, activation_rounding=a.activation_rounding or defaults.activation_rounding,
                **{n: False for n in a.lean_off})
        manifest = host_bundle.export_bundle(
            ckpt, a.out, lr=a.lr, momentum=a.momentum, lam=a.lam, e0=a.e0,
            batch_size=a.batch, sparse_storage=not a.dense_storage, lean=not a.no_lean,
            profile=not a.no_profile, **options)
    except (EdgettaError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bb = manifest["backbone"]
    print(f"exported {source} -> {a.out} in {time.time() - t:.1f}s: "
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
    from .errors import EdgettaError
    from .streams import load_stream

    try:
        if a.batch < 1 or (a.limit is not None and a.limit < 1):
            raise ValueError("--batch and --limit must be at least 1")
        adapter = Adapter.load(a.bundle, engine=a.engine, provider=a.provider, lr=a.lr,
                               threads=a.threads, anchor=a.anchor, memory_arena=a.memory_arena)
    except (EdgettaError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.json:
        print(f"engine {adapter.engine}, provider {adapter.provider} ({engine_note(adapter.engine)}), "
              f"{platform.machine()}", flush=True)
    try:
        stream = load_stream(a.stream)
    except (EdgettaError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        "provider": adapter.provider, "machine": platform.machine(),
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
    """Exit 0: the adaptation step fits the target's budget; 1: it does not; 2: error."""
    from .bundle import Bundle
    from .engines import choose_engine
    from .errors import EdgettaError
    from .profile import analyse, format_table, measure_step, plot, verdict
    from .targets import get_target

    try:
        bundle = Bundle.open(a.bundle)
        target = get_target(a.target)
        if a.budget is not None:
            if not 0 < a.budget < 1 << 30:
                raise ValueError(f"--budget must be a positive number of MiB, got {a.budget:g}")
            target = type(target)(**{**target.as_dict(), "budget_mib": a.budget})
        # onnxruntime-training has wheels for x86-64 only: elsewhere the target runs the portable step
        engine = choose_engine("onnx" if a.engine == "auto" and target.arch != "x86_64" else a.engine, bundle)
        batch = a.batch or bundle.manifest.adaptation.batch_size
        if not 1 <= batch <= 65536:
            raise ValueError(f"--batch must be in 1..65536, got {batch}")
        report = analyse(bundle, target, batch, engine=engine)
        measured = None if a.no_measure else measure_step(bundle.path, batch, provider=a.provider,
                                                          engine=engine)
        judged = verdict(report, target, measured, bundle)
        report["measured"] = measured
        report["fits"] = judged.fits
        report["verdict"] = {"fits": judged.fits, "peak_rss_mib": judged.peak_mib,
                             "budget_mib": judged.budget_mib, "measured": judged.measured,
                             "quantity": "peak RSS of the adapting process", "how": judged.how}
        if a.plot:
            plot(report, a.plot)
    except (EdgettaError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report, measured, judged))
    return 0 if judged.fits else 1


def engine_note(engine: str) -> str:
    return ("onnxruntime-training" if engine == "ort-training"
            else "portable step on plain onnxruntime")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--engine, --provider and --threads, as 'adapt' and 'serve' take them."""
    p.add_argument("--engine", default="auto", choices=["auto", "ort-training", "onnx"],
                   help="auto: onnxruntime-training where it is installed, else the portable "
                        "step on plain onnxruntime")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="execution provider (auto: CUDA where this onnxruntime has it)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads (default: onnxruntime's, all cores)")
    p.add_argument("--memory-arena", action="store_true",
                   help="keep onnxruntime's memory arena: faster steps (no page faults for each step's tensors), higher peak memory (docs/speed.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgetta", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"edgetta {__version__}")
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
    e.add_argument("--no-profile", action="store_true",
                   help="skip the memory profile (one measured adaptation step) in the manifest")
    e.add_argument("--activation-bits", choices=["8", "none"], default=None,
                   help="store the meta networks' kept inputs as 8-bit integers per sample and channel, "
                        "or as float32 ('none'); default: the exporter's (docs/compressed_activations.md)")
    e.add_argument("--lean-off", nargs="+", default=[], metavar="REWRITE",
                   help="turn these rewrites of the lean graph off, by LeanOptions name (e.g. fast_elementwise, "
                        "separate_backward_buffers), to measure or rule one out; default: all on")
    e.add_argument("--activation-rounding", choices=["nearest", "stochastic"], default=None,
                   help="how 8-bit kept inputs are rounded; default: the exporter's (nearest: one pass "
                        "to store, one to restore)")
    own = e.add_argument_group("your own model and images (instead of --checkpoint)")
    own.add_argument("--arch", default=None,
                     help="zoo name (wrn16_2, resnet26, mobilenet_v2, mobilenet_v3s, ...) or "
                          "package.module:factory returning any BatchNorm CNN")
    own.add_argument("--weights", default=None, help="its state dict (.pt); without it, untrained")
    own.add_argument("--data", default=None,
                     help="image folder, one subfolder per class (JPEG/PNG): warm-up and clean accuracy")
    own.add_argument("--input-size", type=int, default=None,
                     help="square input size (default: the zoo model's, else 32)")
    own.add_argument("--k", type=int, default=4, help="number of parts / meta networks")
    own.add_argument("--boundaries", default=None,
                     help="comma-separated module names that end the K parts (default: found by torch.fx)")
    own.add_argument("--mean", type=float, nargs=3, default=None,
                     help="per-channel mean the weights were trained with (default: the folder's)")
    own.add_argument("--std", type=float, nargs=3, default=None)
    own.add_argument("--warmup-epochs", type=float, default=1.0)
    own.add_argument("--warmup-batch", type=int, default=64)
    own.add_argument("--seed", type=int, default=0)
    own.add_argument("--save-checkpoint", default=None, help="also write the warmed-up host checkpoint here")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("adapt", help="adapt a bundle on a labelled stream and report accuracy")
    d.add_argument("bundle", help="bundle folder written by 'edgetta export'")
    d.add_argument("--stream", default="demo", help="'demo' (built-in corrupted stream), .npz or .npy")
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--limit", type=int, default=None, help="use the first N frames")
    d.add_argument("--lr", type=float, default=None, help="override the bundle's learning rate")
    d.add_argument("--anchor", type=float, default=0.0,
                   help="pull the meta parameters back toward the warmed-up state by this share "
                        "after every step (0: off; docs/longterm.md)")
    add_engine_options(d)
    d.add_argument("--json", action="store_true", help="print a JSON report")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_adapt)
    serve.add_parser(sub)

    f = sub.add_parser("profile", help="memory of one adaptation step and of inference on a target")
    f.add_argument("bundle")
    f.add_argument("--target", default="x86-64", help=", ".join(TARGETS))
    f.add_argument("--batch", type=int, default=None, help="adaptation batch (default: the bundle's)")
    f.add_argument("--budget", type=float, default=None, help="MiB; overrides the target's budget")
    f.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    f.add_argument("--engine", default="auto", choices=["auto", "ort-training", "onnx"],
                   help="the engine to profile and measure (auto: the one 'adapt' would use on the "
                        "target: the portable step on ARM)")
    f.add_argument("--no-measure", action="store_true",
                   help="static analysis only (no adaptation step is run on this machine)")
    f.add_argument("--json", action="store_true")
    f.add_argument("--plot", default=None, help="write a bar chart PNG of the breakdown")
    f.set_defaults(func=cmd_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
