"""Long-term adaptation: the continual stream repeated for many rounds without reset.

    python -m benchmarks.longterm                       # every method, 10 rounds, two processes at once
    python -m benchmarks.longterm --methods edgetta --anchor 0.01   # a drift-fix variant
    python -m benchmarks.longterm --generator independent           # the imagecorruptions stream
    python -m benchmarks.longterm --diagnose            # where the loss pulls the warmed-up meta nets
    python -m benchmarks.longterm --report              # docs/longterm.md and the plots from the JSON
    python -m benchmarks.longterm --smoke --out-dir /tmp/lt   # a tiny run (tests)

Cost on one free x86-64 core: CoTTA about 5 minutes a round (32 augmented teacher passes on
most batches), edgetta and EcoTTA-torch under a minute, the others seconds.

The stream (``--generator``): ``project``, the main suite's (``benchmarks.common.continual_stream``:
Fashion-MNIST test images as 32x32x3, the 15 corruptions in the standard order, severity 5), or
``independent``, the independent generator's (``benchmarks.independent.build_stream``: the same
test images, the 13 imagecorruptions kinds, corrupted at 128 px), repeated ``--rounds`` times
with no reset, batch ``--batch``. Results: ``benchmarks/results/longterm.json`` (project) and
``longterm_independent.json``; docs/longterm.md shows both. ``--checkpoint`` (default: the
project's default checkpoint) is the warmed-up model every method starts from. Every method runs in a fresh process with one thread
(``--jobs`` processes at once). Per round: error, error per corruption, peak RSS of the round
(the kernel's peak mark is reset at the start of each round), seconds, and the distance of the
trained parameters from their start (L2, and relative to the start's norm). Before round 1 and
after the rounds in ``--clean-after``: error on ``--clean-frames`` clean test images (the tail of
the stream's seeded permutation, so none of them is in the stream) predicted with the adapted
state and no update, the forgetting figure.

Methods: ``source``, ``bn_adapt``, ``tent``, ``cotta``, ``ecotta_torch`` (PyTorch,
``benchmarks.methods``), ``edgetta`` (the device runtime on onnxruntime-training, torch blocked),
and the regularizer ablation ``edgetta_lam0`` / ``ecotta_torch_lam0`` (a bundle exported with
lambda = 0). Each worker rewrites its own partial JSON after every round; the driver merges the
partial files into ``benchmarks/results/longterm.json`` as they change, so a stopped run keeps
the rounds it finished.

Variants, for drift (edgetta; ``--anchor`` also EcoTTA-torch; the result is stored under the method's name plus a tag,
e.g. ``edgetta+anchor0.001``): ``--lr`` (SGD learning rate), ``--lam`` and ``--e0`` (a bundle
exported with that regularizer weight / entropy threshold), ``--anchor RHO`` (after every step
the meta networks move back towards the warmed-up state by the fraction RHO of their distance:
theta <- theta0 + (1 - RHO) (theta - theta0): the device's ``Adapter(anchor=RHO)``).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from benchmarks.common import CACHE, RESULTS, ROOT, HelpFormatter, continual_stream, run_cli, write_generated_doc
from edgetta.system import atomic_write, peak_rss_bytes, reset_peak_rss, rss_bytes, write_text_atomic

log = logging.getLogger("benchmarks.longterm")

TORCH_METHODS = ("source", "bn_adapt", "tent", "cotta", "ecotta_torch", "ecotta_torch_lam0")
EDGETTA_METHODS = ("edgetta", "edgetta_lam0")
METHODS = TORCH_METHODS + EDGETTA_METHODS
DEFAULT_METHODS = ("cotta", "edgetta", "edgetta_lam0", "tent", "ecotta_torch", "ecotta_torch_lam0",
                   "bn_adapt", "source")  # longest first: with two at once CoTTA runs beside the rest
DOCS = ROOT / "docs" / "longterm.md"
MIB = 1 << 20


# ---------------------------------------------------------------- typed records


@dataclass
class RoundResult:
    round: int
    error: float
    error_per_domain: dict[str, float]
    peak_rss_mib: float
    rss_end_mib: float
    seconds: float
    param_distance: float | None
    param_distance_rel: float | None
    mean_loss: float | None = None
    clean_error: float | None = None              # prediction as the method makes it
    clean_error_batch_stats: float | None = None  # EcoTTA / edgetta: meta BNs on the clean batch's statistics


@dataclass
class RecoveryPoint:
    """After the last round the world turns clean: single-frame clean error once the adapted
    state has adapted on ``batches`` clean batches, and the warmed-up state's on the same batches."""
    batches: int
    clean_error: float
    clean_error_fresh: float


@dataclass
class MethodResult:
    method: str                 # stored under this name: base method + variant tag
    base: str                   # the method that ran (edgetta, tent, ...)
    lam: float | None           # EcoTTA's regularizer weight (EcoTTA methods)
    threads: int
    lr: float | None = None     # the learning rate override of a variant
    e0: float | None = None     # EcoTTA's entropy threshold
    anchor: float | None = None
    checkpoint: str = ""
    bundle_sha256: str = ""     # of its manifest (which lists every file's sha256): runs side by side share it
    rounds: list[RoundResult] = field(default_factory=list)
    clean_error_start: float | None = None
    clean_error_start_batch_stats: float | None = None
    recovery: list[RecoveryPoint] = field(default_factory=list)  # edgetta
    rss_loaded_mib: float | None = None
    peak_reset: bool = False
    torch_loaded: bool | None = None
    worker_command: str = ""
    started: str = ""
    finished: str | None = None
    notes: list[str] = field(default_factory=list)


class Runner(Protocol):
    def step(self, frames: np.ndarray) -> np.ndarray: ...          # predict, then adapt
    def predict(self, frames: np.ndarray) -> np.ndarray: ...       # adapted state, no update
    # the same with every BatchNorm on the batch's statistics (None: predict does that already)
    predict_batch_stats: Callable[[np.ndarray], np.ndarray] | None
    def distance(self) -> tuple[float | None, float | None]: ...   # (L2, L2 / norm at start)


def _distance(now: list[np.ndarray], start: list[np.ndarray]) -> tuple[float | None, float | None]:
    if not start:
        return None, None
    d = float(np.sqrt(sum(float(((a - b).astype(np.float64) ** 2).sum()) for a, b in zip(now, start))))
    norm = float(np.sqrt(sum(float((b.astype(np.float64) ** 2).sum()) for b in start)))
    return d, d / norm if norm else None


# ---------------------------------------------------------------- workers


class EdgettaRunner:
    """``edgetta.Adapter`` on one bundle, in a process where torch cannot be imported."""

    def __init__(self, bundle: Path, threads: int, lr: float | None = None, anchor: float | None = None):
        from edgetta import Adapter
        self.notes: list[str] = []
        self.adapter = Adapter.load(bundle, threads=threads, lr=lr, anchor=anchor or 0.0)
        self.trainable = list(self.adapter.bundle.manifest.trainable)
        self.start = self.adapter.meta_state()
        self.losses: list[float] = []
        self.snapshot = CACHE / "longterm" / f"snapshot-{os.getpid()}.npz"

    def step(self, frames: np.ndarray) -> np.ndarray:
        logits = self.adapter.step(frames)
        self.losses.append(self.adapter.last_loss)
        return logits

    def predict(self, frames: np.ndarray) -> np.ndarray:
        return self.adapter.step(frames, adapt=False)

    def predict_batch_stats(self, frames: np.ndarray) -> np.ndarray:
        """The logits an adaptation step computes (meta BatchNorms on this batch's statistics),
        with the state saved before and resumed after: nothing changes."""
        snapshot = self.snapshot
        self.adapter.save(snapshot)
        try:
            return self.adapter.step(frames)
        finally:
            self.adapter.resume(snapshot)
            snapshot.unlink()

    def distance(self) -> tuple[float | None, float | None]:
        now = self.adapter.meta_state()
        return _distance([now[n] for n in self.trainable], [self.start[n] for n in self.trainable])

    def mean_loss(self, n: int) -> float:
        return float(np.mean(self.losses[-n:]))


class TorchRunner:
    """A ``benchmarks.methods`` method; ``predict`` runs the network the method predicts with,
    without gradient and without touching its state."""

    def __init__(self, method: str, bundle: Path, checkpoint_path: Path, threads: int, seed: int,
                 anchor: float | None = None):
        import torch
        from benchmarks.methods import EcoTTASettings, create
        from benchmarks.tta import EcoTTATorch
        from edgetta_export import checkpoint
        from edgetta_export.train import to_tensor
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch, self.to_tensor, self.notes = torch, to_tensor, []
        ckpt = checkpoint.load(checkpoint_path)
        hyper = EcoTTASettings.from_manifest(json.loads((bundle / "manifest.json").read_text()))
        if anchor:  # the registry's factory knows no anchor: the class itself, with the bundle's settings
            self.method = EcoTTATorch(ckpt, lr=hyper.lr, momentum=hyper.momentum, lam=hyper.lam, e0=hyper.e0,
                                      bn_momentum=hyper.bn_momentum, anchor=anchor)
        else:
            self.method = create(method.removesuffix("_lam0"), ckpt, hyper=hyper, seed=seed)
        self.mean, self.std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
        self.trained = [p for mod in self.method.modules()[:1] for p in mod.parameters() if p.requires_grad]
        self.start = [p.detach().numpy().copy() for p in self.trained]
        # the network that makes the method's predictions: CoTTA predicts with its EMA teacher
        teacher = getattr(self.method, "teacher", None)
        self.predictor = teacher if teacher is not None else self.method.modules()[0]
        self.is_ecotta = method.startswith("ecotta_torch")
        self.predict_batch_stats = self._predict_batch_stats if self.is_ecotta else None

    def _x(self, frames: np.ndarray):
        return self.to_tensor(frames, self.mean, self.std)

    def step(self, frames: np.ndarray) -> np.ndarray:
        return self.method.step(self._x(frames)).numpy()

    def predict(self, frames: np.ndarray) -> np.ndarray:
        net = self.predictor
        if self.is_ecotta:  # meta BatchNorms on their running statistics, as edgetta predicts
            net.eval()
        with self.torch.no_grad():
            out = net(self._x(frames)).numpy()
        if self.is_ecotta:
            net.train()
        return out

    def _predict_batch_stats(self, frames: np.ndarray) -> np.ndarray:
        net = self.predictor
        saved = {k: v.clone() for k, v in net.state_dict().items()}  # train mode moves running stats
        with self.torch.no_grad():
            out = net(self._x(frames)).numpy()
        net.load_state_dict(saved)
        return out

    def distance(self) -> tuple[float | None, float | None]:
        return _distance([p.detach().numpy() for p in self.trained], self.start)


def clean_subset(n: int, seed: int = 0, split: str = "test") -> Path:
    """``n`` clean Fashion-MNIST ``split`` images (32x32x3) in a cached .npz: the last ``n`` of the
    seeded permutation whose first images the streams of ``seed`` corrupt (``continual_stream``,
    ``benchmarks.independent.build_stream``, ``demo_stream.build(split=...)``), so none of them is
    in the stream. Written by the driver: the edgetta worker cannot import the host package."""
    from edgetta_export import datasets
    path = CACHE / f"clean_fashion_mnist_{split}_{n}_seed{seed}.npz"
    if not path.exists():
        images, labels = datasets.fashion_mnist(split)
        idx = np.random.default_rng(seed).permutation(len(images))[-n:]
        with atomic_write(path) as f:
            np.savez(f, images=images[idx], labels=labels[idx].astype(np.int64), source_index=idx)
    return path


RECOVERY_AFTER = (1, 2, 3, 5, 10, 20)
RECOVERY_OFFSET = 5000  # the permutation's images from here on: after every stream's, before the clean subset


def recovery_subset(n: int, seed: int = 0, split: str = "test") -> Path:
    """``n`` clean Fashion-MNIST ``split`` images for the recovery curve: positions RECOVERY_OFFSET
    on of the seeded permutation whose head the streams corrupt and whose tail ``clean_subset``
    takes, so they are in neither."""
    from edgetta_export import datasets
    path = CACHE / f"recovery_fashion_mnist_{split}_{n}_seed{seed}.npz"
    if not path.exists():
        images, labels = datasets.fashion_mnist(split)
        idx = np.random.default_rng(seed).permutation(len(images))[RECOVERY_OFFSET:RECOVERY_OFFSET + n]
        with atomic_write(path) as f:
            np.savez(f, images=images[idx], labels=labels[idx].astype(np.int64), source_index=idx)
    return path


def recovery_curve(runner: "EdgettaRunner", frames: np.ndarray, clean_x: np.ndarray, clean_y: np.ndarray,
                   batch: int, after: tuple[int, ...] = RECOVERY_AFTER) -> list[RecoveryPoint]:
    """The world back to clean after the stream: the adapted state adapts on clean ``frames``, one
    batch at a time, and after ``after`` batches predicts the clean images as a device predicts
    single frames (running statistics); then the same from the warmed-up state (``reset``), the
    reference. Leaves the adapter in the warmed-up state's curve's end."""
    def curve() -> dict[int, float]:
        errs = {}
        for k in range(1, max(after) + 1):
            runner.adapter.step(frames[(k - 1) * batch:k * batch])
            if k in after:
                errs[k] = float((_predict_all(runner.predict, clean_x, batch) != clean_y).mean())
        return errs
    if len(frames) < max(after) * batch:
        raise ValueError(f"recovery needs {max(after) * batch} frames, got {len(frames)}")
    adapted = curve()
    runner.adapter.reset()
    fresh = curve()
    return [RecoveryPoint(k, adapted[k], fresh[k]) for k in after]


def _predict_all(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(images[i:i + batch])).argmax(1) for i in range(0, len(images), batch)])


def run_worker(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    with np.load(a.stream, allow_pickle=False) as d:
        images, labels = d["images"], d["labels"].astype(np.int64)
        domains, names = d["domains"], [str(s) for s in d["domain_names"]]
    with np.load(a.clean, allow_pickle=False) as d:
        clean_x, clean_y = d["images"], d["labels"]
    edgetta = a.worker in EDGETTA_METHODS
    runner: Runner
    if edgetta:
        runner = EdgettaRunner(Path(a.bundle), a.threads, a.lr, a.anchor)
    else:
        runner = TorchRunner(a.worker, Path(a.bundle), Path(a.checkpoint), a.threads, a.seed, a.anchor)
    ecotta = json.loads((Path(a.bundle) / "manifest.json").read_text())["ecotta"]
    res = MethodResult(method=a.worker + a.tag, base=a.worker, threads=a.threads, lr=a.lr, anchor=a.anchor,
                       checkpoint=checkpoint_label(Path(a.checkpoint)),
                       bundle_sha256=hashlib.sha256((Path(a.bundle) / "manifest.json").read_bytes()).hexdigest(),
                       lam=ecotta["lambda"] if "ecotta" in a.worker or edgetta else None,
                       e0=ecotta["e0"] if "ecotta" in a.worker or edgetta else None,
                       worker_command=shlex.join([sys.executable, "-m", "benchmarks.longterm", *sys.argv[1:]]),
                       started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       torch_loaded=sys.modules.get("torch") is not None, notes=list(runner.notes))
    res.rss_loaded_mib = rss_bytes() / MIB
    def clean_errors(batch_stats: bool = True) -> tuple[float, float | None]:
        err = float((_predict_all(runner.predict, clean_x, a.batch) != clean_y).mean())
        if runner.predict_batch_stats is None or not batch_stats:
            return err, None
        return err, float((_predict_all(runner.predict_batch_stats, clean_x, a.batch) != clean_y).mean())

    res.clean_error_start, res.clean_error_start_batch_stats = clean_errors()
    out = Path(a.partial)
    n_batches = -(-len(images) // a.batch)
    for r in range(1, a.rounds + 1):
        res.peak_reset = reset_peak_rss()
        t = time.perf_counter()
        pred = _predict_all(runner.step, images, a.batch)
        seconds = time.perf_counter() - t
        peak, now = peak_rss_bytes(), rss_bytes()
        wrong = pred != labels
        dist, rel = runner.distance()
        row = RoundResult(round=r, error=float(wrong.mean()),
                          error_per_domain={names[g]: float(wrong[domains == g].mean()) for g in np.unique(domains)},
                          peak_rss_mib=peak / MIB, rss_end_mib=now / MIB, seconds=round(seconds, 1),
                          param_distance=dist, param_distance_rel=rel)
        if isinstance(runner, EdgettaRunner):
            row.mean_loss = runner.mean_loss(n_batches)
        if r in a.clean_after:
            # on batch statistics edgetta takes an adaptation step per batch (and undoes it):
            # before round 1 and after the last round only
            row.clean_error, row.clean_error_batch_stats = clean_errors(batch_stats=r == a.rounds)
        res.rounds.append(row)
        log.info("%s round %d: error %.4f clean %s peak %.1f MiB distance %s (%.0f s)", res.method, r, row.error,
                 row.clean_error, row.peak_rss_mib, dist, seconds)
        if r == a.rounds:
            res.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if isinstance(runner, EdgettaRunner):  # the adapted state, for a look at what moved
                runner.adapter.save(out.with_suffix(".state.npz"))
                if a.recovery:
                    with np.load(a.recovery, allow_pickle=False) as d:
                        res.recovery = recovery_curve(runner, d["images"], clean_x, clean_y, a.batch)
        write_text_atomic(out, json.dumps(asdict(res), indent=1))
    return 0


# ---------------------------------------------------------------- driver


@contextlib.contextmanager
def _locked(path: Path):
    """Several drivers may merge into one report: one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = CACHE / "longterm" / (path.resolve().as_posix().replace("/", "_") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge(json_path: Path, config: dict[str, Any] | None, results: dict[str, Any]) -> dict[str, Any]:
    """Replace only the given methods (and the config, when given) in the report."""
    return update_json(json_path, {"config": config} if config is not None else {}, results)


def update_json(json_path: Path, sections: dict[str, Any], methods: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace top-level ``sections`` and the given ``methods`` of the report, under the lock."""
    with _locked(json_path):
        data = json.loads(json_path.read_text()) if json_path.exists() else {}
        data.update(sections)
        data.setdefault("methods", {}).update(methods or {})
        write_text_atomic(json_path, json.dumps(data, indent=1))
    return data


GENERATORS = ("project", "independent")


def default_checkpoint() -> Path:
    from edgetta_export.bundle import DEFAULT_CHECKPOINT
    return Path(DEFAULT_CHECKPOINT)


def checkpoint_label(path: Path) -> str:
    """The checkpoint as a report names it: relative to the repository when inside it, with the
    start of its sha256 (the default checkpoint's file is replaced when the method changes)."""
    path = Path(path).resolve()
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    return f"{name} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


def bundles(settings: set[tuple[float, float | None]], checkpoint_path: Path | None = None
            ) -> dict[tuple[float, float | None], Path]:
    """One bundle of the checkpoint (default: the project's) per (lambda, E0) (cached); the other
    export settings are the defaults."""
    from benchmarks.common import export_cached_bundle
    from edgetta_export import checkpoint
    path = Path(checkpoint_path or default_checkpoint())
    ckpt = checkpoint.load(path)
    stem = "" if path.resolve() == default_checkpoint().resolve() else f"_{path.stem}"
    return {(lam, e0): export_cached_bundle(ckpt, f"longterm{stem}_lam{lam:g}" + ("" if e0 is None else f"_e0{e0:g}"),
                                            lam=lam, e0=e0)
            for lam, e0 in settings}


def generator_stream(generator: str, per_type: int, severity: int, seed: int) -> Path:
    """The cached continual stream of Fashion-MNIST test images of one generator."""
    if generator == "project":
        return continual_stream(per_type, severity, seed)
    from benchmarks.independent import KINDS, StreamSpec, build_stream
    return build_stream(StreamSpec(KINDS, per_type, severity, seed))


def json_name(generator: str) -> str:
    return "longterm.json" if generator == "project" else f"longterm_{generator}.json"


@dataclass(frozen=True)
class Job:
    """One method's long-term run in a worker process: its stream, clean images and bundle."""
    method: str
    stream: Path
    clean: Path
    bundle: Path
    checkpoint: Path
    partial: Path                # the worker's JSON, rewritten after every round
    tag: str = ""
    rounds: int = 10
    batch: int = 64
    threads: int = 1
    seed: int = 0
    clean_after: tuple[int, ...] = (1, 5, 10)
    lr: float | None = None
    anchor: float | None = None
    recovery: Path | None = None  # clean frames for the recovery curve after the last round (edgetta)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "benchmarks.longterm", "--worker", self.method, "--stream", str(self.stream),
               "--bundle", str(self.bundle), "--checkpoint", str(self.checkpoint), "--partial", str(self.partial),
               "--tag", self.tag, "--rounds", str(self.rounds), "--batch", str(self.batch),
               "--threads", str(self.threads), "--seed", str(self.seed), "--clean", str(self.clean),
               "--clean-after", *map(str, self.clean_after)]
        return cmd + [f"--{k}={v}" for k, v in (("lr", self.lr), ("anchor", self.anchor), ("recovery", self.recovery))
                      if v is not None]


def run_jobs(jobs: list[Job], parallel: int, on_update: Callable[[Job, dict[str, Any]], None],
             poll: float = 5.0) -> list[Job]:
    """Run ``jobs``, ``parallel`` worker processes at once, each with one thread per
    ``job.threads``; ``on_update(job, record)`` whenever a worker rewrote its partial JSON.
    Returns the jobs that failed (their log's tail is logged)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    pending = list(jobs)
    running: dict[Job, tuple[subprocess.Popen, float]] = {}
    failed = []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.partial.parent.mkdir(parents=True, exist_ok=True)
            job.partial.unlink(missing_ok=True)
            log_path = job.partial.with_suffix(".log")
            threads = str(job.threads)
            with open(log_path, "w") as logf:
                running[job] = (subprocess.Popen(job.command(), cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                                 env=dict(env, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)),
                                0.0)
            log.info("started %s%s (log %s)", job.method, job.tag, log_path)
        time.sleep(poll)
        for job, (proc, seen) in list(running.items()):
            rc = proc.poll()
            if job.partial.exists() and job.partial.stat().st_mtime != seen:
                seen = job.partial.stat().st_mtime
                on_update(job, json.loads(job.partial.read_text()))
                running[job] = (proc, seen)
            if rc is not None:
                del running[job]
                if rc != 0:
                    tail = job.partial.with_suffix(".log").read_text().strip().splitlines()[-5:]
                    failed.append(job)
                    log.error("%s%s failed (exit %d): %s", job.method, job.tag, rc, " | ".join(tail))
                else:
                    log.info("finished %s%s", job.method, job.tag)
    return failed


def variant_tag(a: argparse.Namespace) -> str:
    """``+lam1+lr0.001+anchor0.002``: the settings that differ from the defaults."""
    parts = [("lam", a.lam, 0.5), ("e0", a.e0, None), ("lr", a.lr, None), ("anchor", a.anchor, None)]
    return "".join(f"+{k}{v:g}" for k, v, default in parts if v != default)


def _partial_dir(smoke: bool, generator: str = "project") -> Path:
    return CACHE / "longterm" / (("smoke" if smoke else "full") + ("" if generator == "project" else f"-{generator}"))


def collect(a: argparse.Namespace) -> int:
    """Merge the workers' partial files of ``--methods`` (with this variant's tag) into the report:
    for rounds a stopped driver did not merge."""
    json_path = Path(a.out_dir) / json_name(a.generator)
    found = {}
    for m in a.methods:
        partial = _partial_dir(a.smoke, a.generator) / f"{m}{variant_tag(a)}.json"
        if partial.exists():
            found[m] = json.loads(partial.read_text())
            # the command that reproduces the row: this one, without --collect, for this method
            rest = [x for x in a.argv if x != "--collect"]
            i = rest.index("--methods") if "--methods" in rest else len(rest)
            j = next((k for k in range(i + 1, len(rest)) if rest[k].startswith("--")), len(rest))
            found[m].setdefault("command", "python -m benchmarks.longterm " + shlex.join(rest[:i] + ["--methods", m] + rest[j:]))
            log.info("%s: %d rounds in %s", m, len(found[m]["rounds"]), partial)
    merge(json_path, None, {r["method"]: r for r in found.values()})
    return 0


def run_bundle(rec: dict[str, Any]) -> Path | None:
    """The cached bundle a run used, found by the sha256 of its manifest (the exporter's code
    may have changed since, and a re-export would not match the saved state)."""
    for manifest in sorted((CACHE / "bundles").glob("*/manifest.json")):
        if hashlib.sha256(manifest.read_bytes()).hexdigest() == rec.get("bundle_sha256"):
            return manifest.parent
    return None


def evaluate_saved(a: argparse.Namespace) -> int:
    """For an edgetta run whose worker predates the batch-statistics clean error or the recovery
    curve: load the bundle and the state the worker saved after its last round, check that the
    clean error on running statistics is the one recorded, and fill in the batch-statistics
    figures and the recovery curve."""
    json_path = Path(a.out_dir) / json_name(a.generator)
    with np.load(clean_subset(a.clean_frames, a.seed), allow_pickle=False) as d:
        clean_x, clean_y = d["images"], d["labels"]
    tag = variant_tag(a)
    for m in a.methods:
        partial = _partial_dir(a.smoke, a.generator) / f"{m}{tag}.json"
        rec = json.loads(partial.read_text())
        last = rec["rounds"][-1]
        runner = EdgettaRunner(run_bundle(rec) or bundles({(0.0 if m.endswith("_lam0") else a.lam, a.e0)},
                                                          a.checkpoint).popitem()[1], a.threads)

        def err(fn: Callable[[np.ndarray], np.ndarray]) -> float:
            return float((_predict_all(fn, clean_x, a.batch) != clean_y).mean())
        if err(runner.predict) != rec["clean_error_start"]:
            raise SystemExit(f"error: {m}: the bundle's clean error is not the recorded one; not filled in")
        rec["clean_error_start_batch_stats"] = err(runner.predict_batch_stats)
        runner.adapter.resume(partial.with_suffix(".state.npz"))
        if err(runner.predict) != last["clean_error"]:
            raise SystemExit(f"error: {m}: the saved state's clean error is not the recorded one; not filled in")
        last["clean_error_batch_stats"] = err(runner.predict_batch_stats)
        with np.load(recovery_subset(max(RECOVERY_AFTER) * a.batch, a.seed), allow_pickle=False) as d:
            rec["recovery"] = [asdict(p) for p in recovery_curve(runner, d["images"], clean_x, clean_y, a.batch)]
        note = (f"batch-statistics clean errors and the recovery curve filled in from the saved state by "
                f"'python -m benchmarks.longterm --evaluate-saved{'' if a.generator == 'project' else ' --generator ' + a.generator} --methods {m}'")
        rec["notes"] = [n for n in rec.get("notes", []) if not n.startswith("batch-statistics clean errors")] + [note]
        write_text_atomic(partial, json.dumps(rec, indent=1))
        merge(json_path, None, {rec["method"]: rec})
        log.info("%s: clean error on batch statistics %.4f -> %.4f", m, rec["clean_error_start_batch_stats"],
                 last["clean_error_batch_stats"])
    return 0


def run_driver(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out_dir = Path(a.out_dir)
    json_path = out_dir / json_name(a.generator)
    stream = generator_stream(a.generator, a.frames_per_type, a.severity, a.seed)
    clean = clean_subset(a.clean_frames, a.seed)
    recovery = recovery_subset(max(RECOVERY_AFTER) * a.batch, a.seed)
    with np.load(stream) as d, np.load(clean) as c, np.load(recovery) as r:
        frames_per_round = int(d["labels"].shape[0])
        description = str(d["description"])
        if "source_index" in d.files and np.intersect1d(d["source_index"], c["source_index"]).size:
            raise SystemExit("error: the clean images overlap the stream")
        if np.intersect1d(r["source_index"], c["source_index"]).size or (
                "source_index" in d.files and np.intersect1d(d["source_index"], r["source_index"]).size):
            raise SystemExit("error: the recovery frames overlap the stream or the clean images")
    tag = variant_tag(a)
    allowed = set(EDGETTA_METHODS) | ({"ecotta_torch"} if tag.startswith("+anchor") else set())
    if tag and set(a.methods) - allowed:
        raise SystemExit("error: --lam/--e0/--lr/--anchor variants are for edgetta and edgetta_lam0 "
                         "(--anchor alone also for ecotta_torch)")
    checkpoint_path = Path(a.checkpoint or default_checkpoint())
    setting = {m: (0.0 if m.endswith("_lam0") else a.lam, a.e0) for m in a.methods}
    paths = bundles(set(setting.values()), checkpoint_path)
    partial_dir = _partial_dir(a.smoke, a.generator)
    command = ("python -m benchmarks.longterm " + shlex.join(a.argv)).strip()
    config = {"command": command, "generator": a.generator, "stream": description,
              "checkpoint": checkpoint_label(checkpoint_path), "frames_per_type": a.frames_per_type,
              "severity": a.severity, "frames_per_round": frames_per_round, "rounds": a.rounds,
              "batch": a.batch, "threads": a.threads, "seed": a.seed, "clean_frames": a.clean_frames,
              "clean_after": a.clean_after, "smoke": a.smoke,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}}
    old = json.loads(json_path.read_text()).get("config") if json_path.exists() else None
    same = ("frames_per_type", "rounds", "batch", "severity")
    keep = old if old and all(old.get(k) == config[k] for k in same) else None
    if keep is not None:  # an earlier run's config stays; facts it lacks are filled in
        keep = {**{k: config[k] for k in ("generator", "stream", "checkpoint")}, **keep}
    merge(json_path, keep or config, {})
    jobs = [Job(m, stream, clean, paths[setting[m]], checkpoint_path, partial_dir / f"{m}{tag}.json", tag,
                a.rounds, a.batch, a.threads, a.seed, tuple(a.clean_after), a.lr, a.anchor,
                recovery if m in EDGETTA_METHODS else None) for m in a.methods]

    def update(job: Job, record: dict[str, Any]) -> None:
        record["command"] = command  # the driver's: the command that reproduces this row
        merge(json_path, None, {record["method"]: record})
    failed = run_jobs(jobs, a.jobs, update, a.poll)
    data = json.loads(json_path.read_text())
    data["config"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data["config"]["machine"]["load_avg_at_end"] = os.getloadavg()
    merge(json_path, data["config"], {})
    if not a.no_report:
        for p in write_report(out_dir, None if a.smoke else DOCS):
            log.info("wrote %s", p)
    return 1 if failed else 0


# ---------------------------------------------------------------- diagnosis


def diagnose(stream: Path, clean: Path, lam: float, batch: int, checkpoint_path: Path) -> dict[str, Any]:
    """Where the test-time loss pulls the warmed-up meta networks (EcoTTA in PyTorch, the
    default checkpoint): for a clean batch and the first batch of every corruption, the
    gradients of the masked entropy and of lam * regularizer with respect to the meta
    parameters, their norms and cosine; how alike the regularizer's gradients are across
    batches; and the gradient that reaches the meta networks' conv branches."""
    import torch
    from edgetta_export import checkpoint
    from edgetta_export.bundle import build_model
    from edgetta_export.ecotta import ecotta_loss
    from edgetta_export.train import to_tensor

    torch.set_num_threads(1)
    ckpt = checkpoint.load(checkpoint_path)
    model = build_model(ckpt).train()
    names = [n for n, _ in model.metas.named_parameters()]
    params = list(model.metas.parameters())
    norm = ckpt["normalization"]

    def flat(t: Any) -> Any:
        g = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])

    with np.load(stream) as d, np.load(clean) as c:
        per = len(d["images"]) // len(d["domain_names"])
        batches = [("clean", c["images"][:batch])] + [
            (str(n), d["images"][k * per:k * per + batch]) for k, n in enumerate(d["domain_names"])]
    branch_params = np.concatenate([np.full(p.numel(), ".bn_meta." not in n) for n, p in zip(names, params)])
    rows, reg_grads = [], []
    branch = 0.0
    for name, images in batches:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        _, _, ent, reg = ecotta_loss(model, to_tensor(images, norm["mean"], norm["std"]), lam, None)
        ge, gr = flat(ent), flat(lam * reg)
        branch += float((ge + gr)[torch.from_numpy(branch_params)].abs().sum())
        model.load_state_dict(saved)  # train-mode forwards move running statistics
        reg_grads.append(gr / gr.norm())
        rows.append({"batch": name, "entropy": float(ent), "regularizer": float(reg),
                     "grad_entropy": float(ge.norm()), "grad_regularizer": float(gr.norm()),
                     "cosine": float(ge @ gr / (ge.norm() * gr.norm()))})
    g = torch.stack(reg_grads)
    cos = (g @ g.T).numpy()
    off = cos[~np.eye(len(cos), dtype=bool)]
    return {"lambda": lam, "batch": batch, "rows": rows,
            "regularizer_gradient_cosine_between_batches": {"mean": float(off.mean()), "min": float(off.min())},
            "gradient_reaching_conv_branches": branch,
            "conv_branch_bn_weight_abs_max": max(float(m.bn.weight.abs().max()) for m in model.metas),
            "conv_branch_bn_bias_max": max(float(m.bn.bias.max()) for m in model.metas)}


# ---------------------------------------------------------------- report


def summary(m: dict[str, Any]) -> dict[str, float | None]:
    """The figures the issue asks about, for one method's record."""
    rounds = m["rounds"]
    if not rounds:
        return {}
    peaks = [r["peak_rss_mib"] for r in rounds]
    clean = clean_points(m, False)
    clean_b = clean_points(m, True)
    return {"round1": rounds[0]["error"], "last": rounds[-1]["error"], "last_round": rounds[-1]["round"],
            "drift": rounds[-1]["error"] - rounds[0]["error"],
            "clean_start": clean[0][1], "clean_last": clean[-1][1] if len(clean) > 1 else None,
            "forgetting": clean[-1][1] - clean[0][1] if len(clean) > 1 else None,
            "forgetting_batch_stats": (clean_b[-1][1] - clean_b[0][1]
                                       if len(clean_b) > 1 and clean_b[0][0] == 0 else None),
            "peak_spread": (max(peaks) - min(peaks)) / min(peaks),
            "peak_spread_after_1": (max(peaks[1:]) - min(peaks[1:])) / min(peaks[1:]) if len(peaks) > 1 else None,
            "peak_max": max(peaks), "distance_last": rounds[-1]["param_distance"],
            "distance_rel_last": rounds[-1]["param_distance_rel"]}


def clean_points(m: dict[str, Any], batch_stats: bool) -> list[tuple[int, float]]:
    """(round, clean error) from round 0 on: as the method predicts, or with every BatchNorm on
    the clean batch's statistics (the same thing for the methods that always predict so)."""
    running = m["method"].startswith(("ecotta", "edgetta"))  # predict on running statistics

    def pick(own: float | None, batch: float | None) -> float | None:
        return batch if batch_stats and running else own
    start = pick(m["clean_error_start"], m.get("clean_error_start_batch_stats"))
    pts = [(0, start)] + [(r["round"], pick(r["clean_error"], r.get("clean_error_batch_stats")))
                          for r in m["rounds"] if r["clean_error"] is not None]
    return [(r, e) for r, e in pts if e is not None]


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def label(name: str) -> str:
    from benchmarks.methods import spec
    return spec(name.removesuffix("_lam0")).short + (", lambda=0" if name.endswith("_lam0") else "")


VARIANT_COLOURS = ("#000000", "#8c564b", "#e377c2", "#ff7f0e")


def _style(name: str, variants: list[str]) -> dict[str, Any]:
    """The registry's colour of the method; the lambda = 0 ablation dashed in the same colour;
    a variant (name+tag) dash-dotted in a colour of its own."""
    from benchmarks.methods import spec
    if name in variants:
        return {"color": VARIANT_COLOURS[variants.index(name) % len(VARIANT_COLOURS)], "linestyle": "-.",
                "label": label(name)}
    return {"color": spec(name.removesuffix("_lam0")).colour, "linestyle": "--" if name.endswith("_lam0") else "-",
            "label": label(name)}


def _order(methods: dict[str, Any]) -> list[str]:
    return [m for m in METHODS if m in methods] + sorted(m for m in methods if m not in METHODS)


def plots(data: dict[str, Any], out_dir: Path, prefix: str = "longterm") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = data["methods"]
    order = _order(methods)
    variants = [m for m in order if m not in METHODS]
    cfg = data["config"]
    written = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    adapting = [100 * r["error"] for m in order if m != "source" for r in methods[m]["rounds"]]
    top = max(adapting, default=100.0) + 1.0  # source sits far above: named in the legend instead
    for m in order:
        rs = methods[m]["rounds"]
        style = _style(m, variants)
        errs = [100 * r["error"] for r in rs]
        if errs and min(errs) > top:
            style["label"] += f" ({min(errs):.1f}-{max(errs):.1f}%, off the scale)"
        ax.plot([r["round"] for r in rs], errs, marker="o", ms=3, **style)
    if adapting:
        ax.set_ylim(min(adapting) - 0.5, top)
    ax.set_xlabel("round (one pass over the 15-corruption stream, no reset)")
    ax.set_ylabel("error on the stream, %")
    ax.set_title(f"Long-term continual adaptation: {cfg['frames_per_round']} frames per round, batch {cfg['batch']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    written.append(out_dir / f"{prefix}_error.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, batch_stats in zip(axes, (False, True)):
        for m in order:
            pts = clean_points(methods[m], batch_stats)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=4, **_style(m, variants))
        ax.set_xlabel("after round (0: before adaptation)")
        ax.set_title("as each method predicts (EcoTTA, edgetta: running statistics)" if not batch_stats
                     else "every BatchNorm on the clean batch's statistics", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"error on {cfg['clean_frames']} clean test images, %")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Forgetting: adapted state, no update", fontsize=11)
    fig.tight_layout()
    written.append(out_dir / f"{prefix}_clean.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for m in order:
        rs = methods[m]["rounds"]
        axes[0].plot([r["round"] for r in rs], [r["peak_rss_mib"] for r in rs], marker="o", ms=3, **_style(m, variants))
        if rs and rs[0]["param_distance_rel"] is not None:
            axes[1].plot([r["round"] for r in rs], [r["param_distance_rel"] for r in rs], marker="o", ms=3,
                         **_style(m, variants))
    axes[0].set_ylabel("peak RSS of the round, MiB")
    axes[1].set_ylabel("||theta - theta_start|| / ||theta_start||")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    # the left panel has every method (the right one only those that train): its handles name them all
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    written.append(out_dir / f"{prefix}_rss_distance.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def markdown(data: dict[str, Any], fig_dir: str, generator: str = "project") -> str:
    """The report of one generator's JSON: the project's as the document's top, another one's as
    a section of it (headings one level down, its own figures)."""
    cfg, methods = data["config"], data["methods"]
    order = _order(methods)
    rounds = max((len(methods[m]["rounds"]) for m in order), default=0)
    top = "#" if generator == "project" else "##"
    prefix = Path(json_name(generator)).stem
    stream = (f"the 15 corruptions in the standard order at severity {cfg['severity']}, {cfg['frames_per_type']} "
              "images per corruption" if generator == "project" else
              f"the independent generator ({cfg.get('stream', '')}; docs/validation.md), {cfg['frames_per_type']} "
              "images per kind")
    lines = [
        f"{top} Long-term adaptation: ten rounds of the continual stream"
        + ("" if generator == "project" else f", {generator} generator"),
        "",
        f"Generated by `python -m benchmarks.longterm --report` from `benchmarks/results/{json_name(generator)}`; "
        "the numbers come from the run below, nothing here is typed in by hand.",
        "",
        "- Checkpoint (the warmed-up model every method starts from), as each run recorded it: "
        + "; ".join(f"`{ck}` ({', '.join(label(m) for m in ms)})" if ck else f"not recorded ({', '.join(label(m) for m in ms)})"
                    for ck, ms in _by_checkpoint(methods, order)) + ".",
        f"- Command: `{cfg['command'].strip()}` (started {cfg['started']}, finished {cfg.get('finished', 'not yet')}).",
        f"- Machine: {cfg['machine']['platform']}, {cfg['machine']['cpus']} CPUs shared with other jobs "
        f"(load average at start {', '.join(f'{v:.1f}' for v in cfg['machine']['load_avg_at_start'])}); "
        f"every method in its own process, {cfg['threads']} thread.",
        f"- Stream: Fashion-MNIST test images presented as 32x32x3 (padded 2 pixels, channel repeated), "
        f"{stream} ({cfg['frames_per_round']} frames per round), batch {cfg['batch']}, repeated "
        f"{cfg['rounds']} times with no reset. The same images come back every round.",
        f"- Clean error: {cfg['clean_frames']} clean test images not in the stream, predicted with the "
        "adapted state and no update: before round 1 and after rounds "
        f"{', '.join(map(str, cfg['clean_after']))}. Methods that normalize with batch statistics "
        "(BN adapt, TENT, CoTTA) get them from clean batches of the same size; EcoTTA and edgetta "
        "predict with their meta BatchNorms' running statistics.",
        "- Distance: L2 norm of (trained parameters now - at the start), relative to the start's "
        "norm. edgetta and EcoTTA: the meta networks (from the warmed-up state); TENT: BatchNorm "
        "affines; CoTTA: the student's weights.",
        "- Peak RSS: the kernel's peak mark of the process, reset at the start of each round.",
        "",
        f"{top}# Error per round (%)",
        "",
        "| method | " + " | ".join(f"r{i}" for i in range(1, rounds + 1)) + " | r_last - r1 |",
        "|---|" + "---:|" * (rounds + 1),
    ]
    for m in order:
        rs = methods[m]["rounds"]
        s = summary(methods[m])
        cells = [_pct(r["error"]) for r in rs] + ["..."] * (rounds - len(rs))
        lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {_pct(s.get('drift'), True)} |")
    after = cfg["clean_after"]
    lines += ["", f"{top}# Forgetting: clean error (%) with the adapted state, no update", "",
              "Two ways to predict: as the method predicts single frames (EcoTTA and edgetta: meta "
              "BatchNorms on the running statistics the stream left behind, those of its last "
              "corruption), and with every BatchNorm on the clean batch's statistics (what BN adapt, "
              "TENT and CoTTA always do), which leaves only what the trained parameters forgot. On batch "
              "statistics edgetta takes an adaptation step per clean batch and undoes it (state saved "
              "and resumed), so it is measured before round 1 and after the last round only."
              + (" The EcoTTA-torch runs without it predate that column." if any(
                  m.startswith("ecotta") and methods[m].get("clean_error_start_batch_stats") is None for m in order)
                 else ""), "",
              "| method | start | " + " | ".join(f"after r{r}" for r in after) + " | change | "
              "batch stats: start | " + " | ".join(f"after r{r}" for r in after) + " | change |",
              "|---|" + "---:|" * (2 * len(after) + 4)]
    for m in order:
        rec, s = methods[m], summary(methods[m])
        if not s:
            continue
        cells = []
        for batch_stats in (False, True):
            pts = dict(clean_points(rec, batch_stats))
            cells += [_pct(pts.get(0))] + [_pct(pts.get(r)) for r in after]
            cells.append(_pct(s["forgetting_batch_stats" if batch_stats else "forgetting"], True))
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    lines += recovery_lines(methods, order, cfg, top)
    lines += ["", f"{top}# Parameter distance and memory", "",
              "| method | distance, last round (relative) | peak RSS MiB (max) | peak spread r1-last | r2-last |",
              "|---|---:|---:|---:|---:|"]
    for m in order:
        s = summary(methods[m])
        if not s:
            continue
        dist = "-" if s["distance_last"] is None else f"{s['distance_last']:.3g} ({s['distance_rel_last']:.2%})"
        spread2 = "-" if s["peak_spread_after_1"] is None else f"{s['peak_spread_after_1']:.1%}"
        lines.append(f"| {label(m)} | {dist} | {s['peak_max']:.0f} | {s['peak_spread']:.1%} | {spread2} |")
    lines += ["", f"{top}# Against the issue's targets (edgetta)", ""]
    for m in [m for m in order if m.startswith("edgetta")]:
        if not methods[m]["rounds"]:
            continue
        s = summary(methods[m])
        ok = lambda b: "met" if b else "NOT met"  # noqa: E731
        fb = s["forgetting_batch_stats"]
        lines.append(f"- {label(m)}: round {s['last_round']} - round 1 = {100 * s['drift']:+.2f} points "
                     f"(target within 1: {ok(abs(s['drift']) <= 0.01)}); clean error after round "
                     f"{s['last_round']} - warmed-up = {100 * s['forgetting']:+.2f} points on running statistics "
                     f"(target within 2: {ok(s['forgetting'] is not None and s['forgetting'] <= 0.02)})"
                     + ("" if fb is None else f", {100 * fb:+.2f} on batch statistics ({ok(fb <= 0.02)})")
                     + f"; peak RSS spread over rounds {s['peak_spread']:.1%} (target within 2%: "
                       f"{ok(s['peak_spread'] <= 0.02)})" + recovered_within(methods[m], 0.02) + ".")
    lines += diagnosis_lines(data.get("diagnosis"))
    commands = sorted({methods[m].get("command", cfg["command"]) for m in order})
    lines += ["", "Runs (each row is reproduced by the command that wrote it):", ""]
    lines += [f"- `{c.strip()}`: " + ", ".join(label(m) for m in order if methods[m].get("command", cfg["command"]) == c)
              for c in commands]
    notes = sorted({n for m in order for n in methods[m].get("notes", [])})
    if notes:
        lines += ["", "Notes from the runs:", ""] + [f"- {n}" for n in notes]
    lines += ["", f"{top}# Figures", "",
              f"![error per round]({fig_dir}/{prefix}_error.png)", "",
              f"![clean error after each checkpointed round]({fig_dir}/{prefix}_clean.png)", "",
              f"![peak RSS and parameter distance per round]({fig_dir}/{prefix}_rss_distance.png)", ""]
    return "\n".join(lines) + "\n"


def recovered_within(rec: dict[str, Any], points: float) -> str:
    """The clause of the targets line on the recovery curve: after how many clean batches the
    single-frame clean error is within ``points`` of the warmed-up state's on the same batches."""
    curve = rec.get("recovery") or []
    k = next((p["batches"] for p in curve if p["clean_error"] - p["clean_error_fresh"] <= points), None)
    if not curve:
        return ""
    return (f"; back on clean frames, single frames are within {100 * points:g} points of the warmed-up "
            f"model's after {k} batch{'es' if k != 1 else ''}" if k is not None else
            f"; back on clean frames, single frames are not within {100 * points:g} points of the warmed-up "
            f"model's after {curve[-1]['batches']} batches")


def recovery_lines(methods: dict[str, Any], order: list[str], cfg: dict[str, Any], top: str) -> list[str]:
    """The recovery table: the adapted state back on clean frames (edgetta's runs that have it)."""
    have = [m for m in order if methods[m].get("recovery")]
    if not have:
        return []
    after = [p["batches"] for p in methods[have[0]]["recovery"]]
    out = ["", f"{top}# Back to clean: how fast single frames recover", "",
           "After the last round the world turns clean. The adapted state goes on adapting, one batch of "
           f"{cfg['batch']} clean test images at a time (images in neither the stream nor the {cfg['clean_frames']} "
           "clean ones), and after k batches predicts the clean images as the device predicts single frames "
           "(running statistics). Beside it, the warmed-up model adapting on the same batches: the reference. "
           "Methods on batch statistics (BN adapt, TENT, CoTTA) need no such recovery; what they forgot is the "
           "forgetting table's batch-statistics column.", "",
           "Each cell: the adapted state's error (the warmed-up model's on the same batches), %.", "",
           "| clean batches adapted on | " + " | ".join(label(m) for m in have) + " |",
           "|---:|" + "---:|" * len(have)]
    for i, k in enumerate(after):
        cells = [f"{_pct(p['clean_error'])} ({_pct(p['clean_error_fresh'])})"
                 for p in (methods[m]["recovery"][i] for m in have)]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out


def _by_checkpoint(methods: dict[str, Any], order: list[str]) -> list[tuple[str, list[str]]]:
    """The methods grouped by the checkpoint their run recorded ("" where it recorded none)."""
    groups: dict[str, list[str]] = {}
    for m in order:
        groups.setdefault(methods[m].get("checkpoint", ""), []).append(m)
    return sorted(groups.items())


def diagnosis_lines(d: dict[str, Any] | None) -> list[str]:
    if not d:
        return []
    rows = d["rows"]
    out = ["", "## Where the loss pulls the warmed-up meta networks", "",
           f"`{d['command']}`: EcoTTA in PyTorch at the warmed-up state (numerically the same updates as "
           f"edgetta), lambda = {d['lambda']:g}, one batch of {d['batch']} clean images and the first batch "
           "of every corruption. Gradient norms with respect to all meta parameters.", "",
           "| batch | entropy | regularizer | grad. entropy term | grad. lambda x regularizer | cosine |",
           "|---|---:|---:|---:|---:|---:|"]
    out += [f"| {r['batch']} | {r['entropy']:.3f} | {r['regularizer']:.3f} | {r['grad_entropy']:.3f} | "
            f"{r['grad_regularizer']:.3f} | {r['cosine']:+.2f} |" for r in rows]
    c = d["regularizer_gradient_cosine_between_batches"]
    out += ["", f"- Cosine between the regularizer's gradients of two different batches: {c['mean']:.2f} on "
                f"average over all pairs, lowest {c['min']:.2f}.",
            f"- Gradient reaching the meta networks' conv branches: {d['gradient_reaching_conv_branches']:g} "
            f"(their BatchNorm weights are at most {d['conv_branch_bn_weight_abs_max']:g} in absolute value and "
            f"their biases at most {d['conv_branch_bn_bias_max']:g}: ReLU(0) passes no gradient)."]
    return out


def write_report(out_dir: Path, doc: Path | None) -> list[Path]:
    """Plots beside the JSONs; the markdown at ``doc`` (docs/longterm.md), or beside the JSONs:
    the project generator's report, then every other generator's that has a JSON in ``out_dir``."""
    doc = doc or out_dir / "longterm.md"
    fig_dir = os.path.relpath(out_dir, doc.parent)
    written, parts = [], []
    for generator in GENERATORS:
        json_path = out_dir / json_name(generator)
        if json_path.exists():
            data = json.loads(json_path.read_text())
            written += plots(data, out_dir, json_path.stem)
            parts.append(markdown(data, fig_dir, generator))
    return written + [write_generated_doc(doc, "\n".join(parts))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.longterm", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--frames-per-type", type=int, default=200)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--clean-frames", type=int, default=2000)
    p.add_argument("--clean-after", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--lam", type=float, default=0.5, help="EcoTTA's lambda of the bundle (not the _lam0 methods')")
    p.add_argument("--e0", type=float, default=None, help="EcoTTA's entropy threshold (default: the exporter's)")
    p.add_argument("--lr", type=float, default=None, help="edgetta: SGD learning rate (default: the bundle's)")
    p.add_argument("--anchor", type=float, default=None,
                   help="edgetta: after each step move the meta networks this fraction back to the warmed-up state")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="processes at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", choices=GENERATORS, default="project",
                   help="the stream's corruptions: the project's or the independent imagecorruptions'")
    p.add_argument("--checkpoint", default=None,
                   help="the warmed-up checkpoint every method starts from (default: export/weights' default)")
    p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="only regenerate the report from the JSON")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--diagnose", action="store_true",
                   help="only measure where the loss pulls the warmed-up meta networks (PyTorch; seconds)")
    p.add_argument("--evaluate-saved", action="store_true",
                   help="edgetta: fill in the batch-statistics clean error of a finished run from its saved state")
    p.add_argument("--collect", action="store_true",
                   help="only merge the partial results of --methods (a stopped run's) into the JSON")
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 frames per type, batch 8, 2 rounds")
    # worker mode (one method in this process)
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    p.add_argument("--clean", help=argparse.SUPPRESS)
    p.add_argument("--recovery", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    if a.worker in EDGETTA_METHODS:
        sys.modules["torch"] = None  # as on a device: onnxruntime-training must not pull torch in
        sys.modules["torchvision"] = None
    if a.worker:
        return run_worker(a)
    if a.report:
        out_dir = Path(a.out_dir)
        for path in write_report(out_dir, DOCS if out_dir == RESULTS else None):
            print(f"wrote {path}")
        return 0
    if a.diagnose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        stream = continual_stream(a.frames_per_type, a.severity, a.seed)
        diag = diagnose(stream, clean_subset(a.clean_frames, a.seed), a.lam, a.batch,
                        Path(a.checkpoint or default_checkpoint()))
        diag["command"] = ("python -m benchmarks.longterm " + shlex.join(a.argv)).strip()
        update_json(Path(a.out_dir) / "longterm.json", {"diagnosis": diag})
        print(json.dumps(diag, indent=1))
        return 0
    if a.evaluate_saved:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return evaluate_saved(a)
    if a.collect:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return collect(a)
    if a.smoke:
        a.frames_per_type, a.batch, a.rounds, a.clean_frames, a.clean_after, a.poll = 2, 8, 2, 16, [1, 2], 0.5
    return run_driver(a)


if __name__ == "__main__":
    run_cli(main)
