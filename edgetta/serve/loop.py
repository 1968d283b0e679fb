"""The serve loop, runnable in process: ``Service(config).run()`` returns the summary.

Three threads do the work: the reader (``edgetta.sources.FrameReader``) captures, this loop
predicts each delivered frame and writes its line, the adaptation worker
(``edgetta.streaming``) adapts on full batches and swaps the new state in.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from ..errors import BundleError, EdgettaError, FrameError, SourceError, StateError
from ..sources import FrameReader, OpenContext, SkippedFrame, open_source, printable
from ..streams import check_labels
from .config import Refused, ServeConfig
from .http import Preview, start_http
from .telemetry import StatusLine, Summary, Telemetry

log = logging.getLogger("edgetta.serve")
STATE_FILE = "state.npz"


def adaptation_peak_mib(bundle: Any, batch: int, provider: str = "cpu",
                        engine: str = "auto") -> tuple[float, str]:
    """Peak RSS (MiB) of a process running one adaptation step at ``batch``: the bundle's
    profile when it was measured for this batch, engine and architecture, else measured in a
    fresh process."""
    import platform
    prof = bundle.manifest.profile
    if (prof is not None and prof.batch == batch and prof.engine == engine
            and prof.machine == platform.machine()):
        return float(prof.adaptation_peak_mib), "from the bundle's profile"
    from ..profile import MIB, measure_step
    try:
        return measure_step(bundle.path, batch, provider=provider, engine=engine)["peak_after_step"] / MIB, \
            "measured"
    except (RuntimeError, OSError, EdgettaError) as e:
        raise Refused(str(e)) from None


def lock_state_dir(state_dir: Path) -> Any:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        f = open(state_dir / "lock", "w")
    except OSError as e:
        raise Refused(f"cannot use --state-dir {state_dir}: {e.strerror or e}") from None
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        pass
    except OSError:
        f.close()
        raise Refused(f"another 'edgetta serve' is using --state-dir {state_dir}") from None
    return f


def resume(adapter: Any, path: Path) -> int | None:
    """Steps of the resumed state, or None when there is none or it cannot be used (then the
    bundle's warmed-up state is kept, and the file is left for inspection)."""
    if not path.exists():
        return None
    try:
        adapter.resume(path)
    except (StateError, BundleError) as e:
        log.warning("%s; starting from the bundle's warmed-up state", e)
        return None
    return int(adapter.steps)


def open_output(path: str) -> TextIO:
    if path == "-":
        return sys.stdout
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)
    except OSError as e:
        raise Refused(f"cannot write --output {path}: {e.strerror or e}") from None


def record_of(pred: Any, latency_s: float) -> dict[str, Any]:
    finite = bool(pred.finite) and math.isfinite(pred.confidence)
    rec = {"frame": pred.index, "timestamp": round(pred.timestamp, 6), "class": pred.class_name,
           "class_index": pred.class_index,
           "confidence": round(pred.confidence, 5) if finite else None,
           "adapted": pred.adapted, "batch": pred.batch, "predict_ms": round(pred.predict_ms, 3),
           "latency_ms": round(latency_s * 1e3, 3)}
    if not finite:
        rec["finite"] = False
    if pred.label is not None:
        rec["label"] = pred.label
    return rec


class Service:
    """Everything ``edgetta serve`` runs, built from a ``ServeConfig``."""

    def __init__(self, cfg: ServeConfig, stop: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.telemetry: Telemetry | None = None
        self.code = 0

    def run(self, install_signals: bool = True) -> Summary:
        """Start, serve until the source ends, ``--limit``, a signal or ``stop``; then adapt
        on what is buffered, checkpoint and return the summary. Raises ``Refused`` (or
        another ``EdgettaError``) before start."""
        with ExitStack() as stack:
            self._start(stack)
            previous = {}
            if install_signals and threading.current_thread() is threading.main_thread():
                previous = {s: signal.signal(s, lambda *_: self.stop.set())
                            for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                self._loop()
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
                self._finish()
            return self.telemetry.summary()

    # -- start ----------------------------------------------------------------------------
    def _start(self, stack: ExitStack) -> None:
        from ..adapter import Adapter
        from ..bundle import Bundle
        from ..streaming import AdapterPredictor, CollapseGuard, SourceModel, StreamingAdapter
        cfg = self.cfg
        bundle = Bundle.open(cfg.bundle)
        engine = cfg.engine
        if engine == "auto" and not cfg.no_adapt and bundle.manifest.graphs.portable_step is not None:
            # onnxruntime-training's Module holds the GIL for a whole step, which froze prediction
            # and capture for as long (docs/serve.md); the portable step runs in an
            # InferenceSession, which releases it
            engine = "onnx"
        if cfg.memory_budget is not None and not cfg.no_adapt:
            need, how = adaptation_peak_mib(bundle, cfg.batch, cfg.provider, engine)
            if need > cfg.memory_budget:
                raise Refused(f"adapting {bundle.path} at batch {cfg.batch} needs {need:.0f} MiB peak "
                              f"RSS ({how}), over --memory-budget {cfg.memory_budget:g} MiB; try a "
                              "smaller --batch")
        ctx = OpenContext(loop=cfg.loop, backoff=cfg.backoff, stop=self.stop, timeout=cfg.timeout,
                          limits=cfg.limits)
        source = open_source(cfg.source, ctx)
        labels = source.labels
        if labels is not None:
            labels = check_labels(labels, len(labels), source.name, len(bundle.class_names))
        if cfg.preview is not None:
            from ..sources.decode import require_pillow
            try:
                require_pillow("--preview")
            except SourceError as e:
                raise Refused(str(e)) from None
        if cfg.state_dir:
            stack.callback(lock_state_dir(Path(cfg.state_dir)).close)
        try:
            adapter = Adapter(bundle, provider=cfg.provider, lr=cfg.lr, engine=engine,
                              threads=cfg.adapt_threads, memory_arena=cfg.memory_arena).open_predictor()
        except (RuntimeError, ValueError) as e:
            raise Refused(str(e)) from None
        predictor = AdapterPredictor(adapter)
        # the warmed-up model, taken before any resume: the guard's reference and the baseline
        baseline = SourceModel(adapter, predictor)
        self.state_path = Path(cfg.state_dir) / STATE_FILE if cfg.state_dir else None
        resumed = resume(adapter, self.state_path) if self.state_path else None
        if resumed is not None:
            log.info("edgetta serve: resumed the adapted state from %s (%d steps)", self.state_path, resumed)
        guard = CollapseGuard(cfg.collapse_window, cfg.collapse_diversity, cfg.collapse_entropy)
        use_baseline = not (cfg.no_baseline and cfg.collapse_window == 0)
        self.sa = StreamingAdapter(adapter, batch_size=cfg.batch, adapt=not cfg.no_adapt, guard=guard,
                                   baseline=baseline if use_baseline else None, predictor=predictor,
                                   blocking=not source.live, state_path=self.state_path,
                                   checkpoint_every=cfg.checkpoint_every)
        stack.callback(self.sa.worker.close, 30.0)
        self.source, self.labels = source, labels
        self.reader = FrameReader(source, self.stop, fps=cfg.fps, on_skip=self._skip)
        t = self.telemetry = Telemetry(self.sa, source, self.reader, resumed, cfg.stale_after,
                                       cfg.stuck_after, adapter.engine, adapter.provider)
        self.sa.worker.on_adapted = t.adapt_hist.observe
        self.out = open_output(cfg.output)
        if self.out is not sys.stdout:
            stack.callback(self.out.close)
        if cfg.http is not None:
            srv = start_http(cfg.host, cfg.http, t.handle, "metrics", cfg.http_connections, cfg.http_timeout)
            stack.callback(self._close_server, srv)
            t.servers.append(srv)
            log.info("edgetta serve: http://%s:%d/metrics (also /health, /ready, /predictions)",
                     cfg.host, srv.server_address[1])
        self.preview = None
        if cfg.preview is not None:
            self.preview = t.preview = Preview(cfg.preview_clients)
            stack.callback(self.preview.close)
            srv = start_http(cfg.host, cfg.preview, self.preview.handle, "preview",
                             cfg.preview_clients + 2, cfg.http_timeout)
            stack.callback(self._close_server, srv)
            t.servers.append(srv)
            log.info("edgetta serve: preview on http://%s:%d/", cfg.host, srv.server_address[1])
        self.status = StatusLine(t, cfg.progress or sys.stderr.isatty(), sys.stderr.isatty())
        self.reader.start()

    @staticmethod
    def _close_server(srv: Any) -> None:
        srv.shutdown()
        srv.server_close()

    def _skip(self, item: SkippedFrame) -> None:
        t = self.telemetry
        with t.lock:  # the reader thread and the loop both count
            t.skipped[item.kind] += 1
            first = t.skipped[item.kind] == 1
        if first:
            log.warning("skipped a frame (%s): %s; further '%s' frames are skipped and counted "
                        "without a message", item.kind, printable(item.detail, 300), item.kind)

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        cfg, sa, t, reader = self.cfg, self.sa, self.telemetry, self.reader
        try:
            while not self.stop.is_set() and (cfg.limit is None or sa.frames < cfg.limit):
                d = reader.get(timeout=0.25)
                if d is None:
                    if reader.done:
                        if reader.error is not None:
                            raise reader.error
                        break
                    self.status.update()
                    continue
                label = None if self.labels is None else int(self.labels[d.position % len(self.labels)])
                try:
                    pred = sa.push(d.frame, label=label, index=d.position)
                except FrameError as e:
                    self._skip(SkippedFrame(e.kind, str(e)))
                    continue
                latency = time.monotonic() - d.received
                rec = record_of(pred, latency)
                self.out.write(json.dumps(rec) + "\n")
                self.out.flush()
                t.frame(rec, latency)
                if self.preview is not None:
                    caption = f"{pred.class_name} {pred.confidence:.0%}" if pred.finite else "?"
                    self.preview.update(d.position, d.frame, caption)
                self.status.update()
        except BrokenPipeError:  # the reader of stdout went away
            pass
        except SourceError as e:
            log.error("%s", e)
            self.code = 1

    def _finish(self) -> None:
        t = self.telemetry
        if t is None:
            return
        t.stopping = True
        self.stop.set()
        self.sa.close(timeout=120)  # every frame marked adapted is adapted on
        if self.state_path is not None and self.sa.adapt:
            self.sa.worker.request_checkpoint(self.state_path, wait=60)
        self.status.end()
