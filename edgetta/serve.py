"""``edgetta serve BUNDLE --source SOURCE``: predict every frame of a live source, adapt on
batches of them, for hours.

Out: one JSON line per frame (stdout or ``--output``); optionally a local HTTP endpoint
(``/predictions``, ``/health``, ``/metrics`` in the Prometheus text format) and an MJPEG
preview. The adapted state is checkpointed atomically into ``--state-dir`` every
``--checkpoint-every`` batches and on SIGTERM/SIGINT, and a restart resumes it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from .sources import CAPTURE_HINT, Backoff, SkippedFrame, SourceError, open_source

SKIP_KINDS = ("corrupt", "empty", "shape", "nan", "unsupported")
STATE_FILE = "state.npz"


class Refused(Exception):
    """Refused before start: one line on stderr, exit code 2."""


class _Interrupted(Exception):
    """SIGTERM/SIGINT while waiting for the source."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve", help="predict and adapt on a live source (camera, video, folder, stream)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("bundle", help="bundle folder written by 'edgetta export'")
    s.add_argument("--source", required=True,
                   help="camera index (0), /dev/videoN, video file, image folder, .npy/.npz, "
                        "'demo', rtsp://... or http://... (MJPEG)")
    s.add_argument("--batch", type=int, default=64, help="adaptation batch size (>= 1)")
    s.add_argument("--no-adapt", action="store_true", help="predict only")
    s.add_argument("--output", default="-", help="JSON lines to this file (appended) instead of stdout")
    s.add_argument("--http", type=int, default=None, metavar="PORT",
                   help="serve /predictions, /health and /metrics on this port (0: any free port)")
    s.add_argument("--host", default="127.0.0.1", help="address for --http and --preview")
    s.add_argument("--preview", type=int, default=None, metavar="PORT",
                   help="MJPEG preview with the predicted class drawn on each frame (needs OpenCV)")
    s.add_argument("--state-dir", default=None,
                   help="checkpoint the adapted state here, and resume it on restart")
    s.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="checkpoint every N adaptation batches (and on SIGTERM/SIGINT)")
    s.add_argument("--collapse-window", type=int, default=256, metavar="FRAMES",
                   help="collapse guard window (0: no guard)")
    s.add_argument("--collapse-share", type=float, default=0.9,
                   help="reset when one class is at least this share of the window")
    s.add_argument("--collapse-entropy", type=float, default=0.05,
                   help="reset when the window's mean entropy is below this fraction of ln C")
    s.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                   help="refuse to start if one adaptation step needs more memory (peak RSS)")
    s.add_argument("--limit", type=int, default=None, help="stop after N predicted frames")
    s.add_argument("--loop", action="store_true", help="replay a file, folder or array source")
    s.add_argument("--fps", type=float, default=None, help="pace the source to this frame rate")
    s.add_argument("--timeout", type=float, default=10.0, help="network connect/read timeout (s)")
    s.add_argument("--reconnect-delay", type=float, default=0.5,
                   help="first reconnect delay (s); doubles on each failure")
    s.add_argument("--reconnect-max-delay", type=float, default=30.0)
    s.add_argument("--reconnect-attempts", type=int, default=10,
                   help="give up after this many failed reconnects in a row (0: never)")
    s.add_argument("--progress", action="store_true",
                   help="status line on stderr even when it is not a terminal")
    s.add_argument("--no-baseline", action="store_true",
                   help="on labelled streams, do not measure accuracy without adaptation")
    s.add_argument("--lr", type=float, default=None, help="override the bundle's learning rate")
    s.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--engine", default="ort-training", choices=["ort-training", "onnx"])
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    try:
        return _serve(args)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


# -- checks before start ---------------------------------------------------------------------

def _check_args(a: argparse.Namespace) -> None:
    if a.batch < 1:
        raise Refused(f"--batch must be at least 1, got {a.batch}")
    if a.checkpoint_every < 1:
        raise Refused(f"--checkpoint-every must be at least 1, got {a.checkpoint_every}")
    if not 0 < a.collapse_share <= 1:
        raise Refused(f"--collapse-share must be in (0, 1], got {a.collapse_share}")
    if a.fps is not None and a.fps <= 0:
        raise Refused(f"--fps must be positive, got {a.fps}")


def adaptation_peak_mib(bundle: Any, batch: int, provider: str = "cpu") -> tuple[float, str]:
    """Peak RSS (MiB) of a process running one adaptation step at ``batch``: the bundle's
    profile when it was made for this batch, else measured in a fresh process."""
    prof = bundle.manifest.get("profile") or {}
    if prof.get("adaptation_peak_mib") is not None and int(prof.get("batch", batch)) == batch:
        return float(prof["adaptation_peak_mib"]), "from the bundle's profile"
    from .profile import MIB, measure_step
    try:
        return measure_step(bundle.path, batch, provider)["peak_after_step"] / MIB, "measured"
    except (RuntimeError, OSError) as e:
        raise Refused(str(e)) from None


def _lock_state_dir(state_dir: Path) -> Any:
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


def _resume(adapter: Any, path: Path) -> int | None:
    """Steps of the resumed state, or None when there is none. A file that does not load is
    moved aside (the write-then-rename checkpoint should never leave one)."""
    from .bundle import BundleError
    if not path.exists():
        return None
    try:
        adapter.resume(path)
    except BundleError as e:
        raise Refused(f"{e}; use another --state-dir") from None
    except Exception as e:  # noqa: BLE001  (zip, npy, key errors: the file is unusable)
        aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
        os.replace(path, aside)
        _log(f"warning: could not load {path} ({e}); moved to {aside.name}, starting from "
             "the warmed-up state")
        return None
    return adapter.steps


# -- HTTP: status endpoints and preview ------------------------------------------------------

def _start_http(host: str, port: int, handle: Callable[[BaseHTTPRequestHandler], None],
                what: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            try:
                handle(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: Any) -> None:
            pass

    try:
        srv = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise Refused(f"cannot listen on {host}:{port} for {what}: {e.strerror or e}") from None
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name=f"edgetta-{what}", daemon=True).start()
    return srv


def _reply(h: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Cache-Control", "no-store")
    h.end_headers()
    h.wfile.write(body)


class Preview:
    """Latest frame and its prediction, drawn and JPEG-encoded only while a client watches."""
    BOUNDARY = "edgettaframe"

    def __init__(self, cv2: Any):
        self.cv2 = cv2
        self.cond = threading.Condition()
        self.latest: tuple[int, np.ndarray, Any] | None = None
        self.closed = False

    def update(self, frame: np.ndarray, pred: Any) -> None:
        with self.cond:
            self.latest = (pred.index, frame, pred)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def render(self, frame: np.ndarray, pred: Any) -> bytes:
        cv2 = self.cv2
        scale = max(1, int(np.ceil(256 / max(1, min(frame.shape[:2])))))
        img = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        if scale > 1:
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        text = f"{pred.class_name} {pred.confidence:.0%}"
        cv2.rectangle(img, (0, 0), (img.shape[1], 28), (0, 0, 0), -1)
        cv2.putText(img, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
        return jpg.tobytes() if ok else b""

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.split("?")[0] not in ("/", "/stream.mjpg"):
            _reply(h, 404, "text/plain", b"not found; the preview is at /\n")
            return
        h.send_response(200)
        h.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={self.BOUNDARY}")
        h.send_header("Cache-Control", "no-store")
        h.end_headers()
        seen = -1
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or (self.latest and self.latest[0] != seen),
                                   timeout=1.0)
                if self.closed:
                    return
                if not self.latest or self.latest[0] == seen:
                    continue
                seen, frame, pred = self.latest
            jpg = self.render(frame, pred)
            h.wfile.write(f"--{self.BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                          f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
            h.wfile.flush()


# -- the loop's state, as the endpoints and the status line see it ---------------------------

class Stats:
    def __init__(self, sa: Any, source: Any, resumed_steps: int | None):
        self.sa = sa
        self.source = source
        self.resumed_steps = resumed_steps
        self.started = time.time()
        self.skipped: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=100)
        self.arrivals: deque[float] = deque(maxlen=120)
        self.checkpoints = 0
        self.stopping = False
        self.lock = threading.Lock()

    def frame(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.recent.append(record)
            self.arrivals.append(time.monotonic())

    @property
    def fps(self) -> float:
        with self.lock:
            a = list(self.arrivals)
        if len(a) < 2 or a[-1] == a[0]:
            return 0.0
        return (len(a) - 1) / (a[-1] - a[0])

    def predictions(self) -> dict[str, Any]:
        with self.lock:
            recent = list(self.recent)
        return {"frames": self.sa.frames, "latest": recent[-1] if recent else None,
                "predictions": recent}

    def health(self) -> dict[str, Any]:
        return {"status": "stopping" if self.stopping else "ok", "source": self.source.name,
                "uptime_s": round(time.time() - self.started, 3), "frames": self.sa.frames,
                "adaptation_steps": int(self.sa.adapter.steps), "resumed_steps": self.resumed_steps,
                "pending_frames": self.sa.pending}

    def summary(self) -> dict[str, Any]:
        sa = self.sa
        p, a = np.asarray(sa.predict_ms), np.asarray(sa.adapt_ms)
        return {
            "frames": sa.frames, "seconds": round(time.time() - self.started, 3),
            "adapted_batches": sa.adapted_batches, "batch_size": sa.batch_size,
            "adaptation_steps": int(sa.adapter.steps), "resumed_steps": self.resumed_steps,
            "skipped": {k: self.skipped[k] for k in sorted(self.skipped)},
            "resets": sa.resets, "reconnects": self.source.reconnects,
            "adapt_errors": sa.adapt_errors, "checkpoints": self.checkpoints,
            "predict_ms_mean": round(float(p.mean()), 3) if p.size else None,
            "predict_ms_p95": round(float(np.percentile(p, 95)), 3) if p.size else None,
            "adapt_ms_mean": round(float(a.mean()), 3) if a.size else None,
            "labelled": sa.labelled, "accuracy": sa.accuracy,
            "accuracy_no_adaptation": sa.accuracy_no_adaptation,
        }

    def metrics(self) -> str:
        from .profile import peak_rss_bytes
        import psutil
        sa = self.sa
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int | float]]) -> None:
            out.append(f"# HELP edgetta_{name} {help_}")
            out.append(f"# TYPE edgetta_{name} {kind}")
            out.extend(f"edgetta_{name}{labels} {value!r}" for labels, value in samples)

        metric("frames_total", "counter", "Frames predicted.", [("", sa.frames)])
        metric("adapted_batches_total", "counter", "Adaptation steps run.", [("", sa.adapted_batches)])
        kinds = sorted(set(SKIP_KINDS) | set(self.skipped))
        metric("skipped_frames_total", "counter", "Frames skipped, by kind.",
               [(f'{{kind="{k}"}}', self.skipped[k]) for k in kinds])
        metric("resets_total", "counter", "Resets to the warmed-up state by the collapse guard.",
               [("", sa.resets)])
        metric("reconnects_total", "counter", "Reconnects of the source.", [("", self.source.reconnects)])
        metric("adapt_errors_total", "counter", "Adaptation steps dropped (non-finite loss).",
               [("", sa.adapt_errors)])
        metric("checkpoints_total", "counter", "Adapted state checkpoints written.", [("", self.checkpoints)])
        metric("predict_seconds", "summary", "Per-frame prediction latency.",
               [("_sum", sa.predict_ms_total / 1e3), ("_count", sa.frames)])
        metric("adapt_seconds", "summary", "Per-batch adaptation time.",
               [("_sum", sa.adapt_ms_total / 1e3), ("_count", sa.adapted_batches)])
        metric("fps", "gauge", "Frames per second over the last frames.", [("", round(self.fps, 3))])
        metric("adaptation_steps", "gauge", "Adaptation steps in the current state.",
               [("", int(sa.adapter.steps))])
        metric("pending_frames", "gauge", "Frames buffered for the next adaptation step.",
               [("", sa.pending)])
        metric("rss_bytes", "gauge", "Resident set size.", [("", psutil.Process().memory_info().rss)])
        metric("peak_rss_bytes", "gauge", "Peak resident set size.", [("", peak_rss_bytes())])
        if sa.accuracy is not None:
            metric("accuracy", "gauge", "Accuracy so far on labelled frames (adapted).",
                   [("", round(sa.accuracy, 6))])
        if sa.accuracy_no_adaptation is not None:
            metric("accuracy_no_adaptation", "gauge", "Accuracy so far without adaptation.",
                   [("", round(sa.accuracy_no_adaptation, 6))])
        return "\n".join(out) + "\n"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0].rstrip("/") or "/"
        if path == "/metrics":
            _reply(h, 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics().encode())
        elif path == "/health":
            _reply(h, 200, "application/json", json.dumps(self.health()).encode())
        elif path == "/predictions":
            _reply(h, 200, "application/json", json.dumps(self.predictions()).encode())
        else:
            _reply(h, 404, "text/plain", b"endpoints: /predictions /health /metrics\n")


class StatusLine:
    """fps, batches and accuracy on stderr: redrawn in place on a terminal, else one line
    every few seconds (with --progress)."""

    def __init__(self, stats: Stats, enabled: bool, tty: bool):
        self.stats, self.enabled, self.tty = stats, enabled, tty
        self.last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 5.0)):
            return
        self.last = now
        sa = self.stats.sa
        parts = [f"{sa.frames} frames", f"{self.stats.fps:.1f} fps",
                 f"{sa.adapted_batches} adapted batches"]
        if sa.predict_ms:
            parts.append(f"predict {np.mean(sa.predict_ms):.1f} ms")
        if sa.adapt_ms:
            parts.append(f"adapt {np.mean(sa.adapt_ms):.0f} ms/batch")
        if sa.accuracy is not None:
            acc = f"acc {sa.accuracy:.1%}"
            if sa.accuracy_no_adaptation is not None:
                acc += f" (no adaptation {sa.accuracy_no_adaptation:.1%})"
            parts.append(acc)
        n_skip = sum(self.stats.skipped.values())
        if n_skip:
            parts.append(f"{n_skip} skipped")
        if sa.resets:
            parts.append(f"{sa.resets} resets")
        line = "  ".join(parts)
        sys.stderr.write(f"\r\033[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled and self.tty:
            self.update(force=True)
            sys.stderr.write("\n")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _open_output(path: str) -> TextIO:
    if path == "-":
        return sys.stdout
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)
    except OSError as e:
        raise Refused(f"cannot write --output {path}: {e.strerror or e}") from None


# -- the command -----------------------------------------------------------------------------

def _serve(a: argparse.Namespace) -> int:
    from .adapter import Adapter
    from .bundle import Bundle, BundleError
    from .preprocess import FrameError
    from .streaming import CollapseGuard, SourceModel, StreamingAdapter

    _check_args(a)
    try:
        bundle = Bundle.open(a.bundle)
    except BundleError as e:
        raise Refused(str(e)) from None
    if a.memory_budget is not None and not a.no_adapt:
        need, how = adaptation_peak_mib(bundle, a.batch, a.provider)
        if need > a.memory_budget:
            raise Refused(f"adapting {bundle.path} at batch {a.batch} needs {need:.0f} MiB peak "
                          f"RSS ({how}), over --memory-budget {a.memory_budget:g} MiB; try a "
                          "smaller --batch")
    cv2 = None
    if a.preview is not None:
        try:
            import cv2
        except ImportError:
            raise Refused(f"--preview needs OpenCV, which is not installed: {CAPTURE_HINT}") from None
    stop = threading.Event()
    backoff = Backoff(a.reconnect_delay, a.reconnect_max_delay, a.reconnect_attempts)
    try:
        source = open_source(a.source, loop=a.loop, backoff=backoff, stop=stop, timeout=a.timeout)
    except SourceError as e:
        raise Refused(str(e)) from None
    lock = _lock_state_dir(Path(a.state_dir)) if a.state_dir else None
    servers: list[ThreadingHTTPServer] = []
    preview = None
    out = None
    try:
        try:
            adapter = Adapter(bundle, provider=a.provider, lr=a.lr, engine=a.engine)
        except (BundleError, RuntimeError, ValueError) as e:
            raise Refused(str(e)) from None
        baseline = None
        if source.labels is not None and not a.no_baseline:
            baseline = SourceModel(adapter)  # before resuming: the warmed-up state
        state_path = Path(a.state_dir) / STATE_FILE if a.state_dir else None
        resumed = _resume(adapter, state_path) if state_path else None
        if resumed is not None:
            _log(f"edgetta serve: resumed the adapted state from {state_path} ({resumed} steps)")
        guard = CollapseGuard(a.collapse_window, a.collapse_share, a.collapse_entropy)
        sa = StreamingAdapter(adapter, batch_size=a.batch, adapt=not a.no_adapt, guard=guard,
                              baseline=baseline)
        stats = Stats(sa, source, resumed)
        out = _open_output(a.output)
        if a.http is not None:
            srv = _start_http(a.host, a.http, stats.handle, "metrics")
            servers.append(srv)
            _log(f"edgetta serve: http://{a.host}:{srv.server_address[1]}/metrics "
                 "(also /health, /predictions)")
        if cv2 is not None:
            preview = Preview(cv2)
            srv = _start_http(a.host, a.preview, preview.handle, "preview")
            servers.append(srv)
            _log(f"edgetta serve: preview on http://{a.host}:{srv.server_address[1]}/")
        status = StatusLine(stats, a.progress or sys.stderr.isatty(), sys.stderr.isatty())
        return _loop(a, source, sa, stats, status, out, preview, state_path, stop, FrameError)
    finally:
        if preview is not None:
            preview.close()
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        if out is not None and out is not sys.stdout:
            out.close()
        if lock is not None:
            lock.close()


def _loop(a: argparse.Namespace, source: Any, sa: Any, stats: Stats, status: StatusLine,
          out: TextIO, preview: Preview | None, state_path: Path | None, stop: threading.Event,
          frame_error: type) -> int:
    waiting = {"source": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        if waiting["source"]:  # blocked on a camera or socket: leave now
            raise _Interrupted()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def checkpoint() -> None:
        if state_path is not None:
            sa.adapter.save(state_path)
            stats.checkpoints += 1

    def skip(kind: str, detail: str) -> None:
        stats.skipped[kind] += 1
        if stats.skipped[kind] == 1:
            _log(f"warning: skipped a frame ({kind}): {detail}; further '{kind}' frames are "
                 "skipped and counted without a message")

    code = 0
    saved_at = sa.adapted_batches
    labels = source.labels
    t0 = time.monotonic()
    it = iter(source)
    pos = -1
    try:
        while not stop.is_set() and (a.limit is None or sa.frames < a.limit):
            if a.fps:
                delay = t0 + (sa.frames + sum(stats.skipped.values())) / a.fps - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            waiting["source"] = True
            try:
                item = next(it, None)
            finally:
                waiting["source"] = False
            if item is None:
                break
            pos += 1
            if isinstance(item, SkippedFrame):
                skip(item.kind, item.detail)
                continue
            label = None if labels is None else int(labels[pos % len(labels)])
            try:
                pred = sa.push(item, label=label, index=pos)
            except frame_error as e:
                msg = str(e)
                skip("nan" if "NaN" in msg else "empty" if "empty" in msg else "shape", msg)
                continue
            record = {"frame": pos, "timestamp": round(pred.timestamp, 6), "class": pred.class_name,
                      "class_index": pred.class_index, "confidence": round(pred.confidence, 5),
                      "adapted": pred.adapted, "batch": pred.batch,
                      "predict_ms": round(pred.predict_ms, 3)}
            if label is not None:
                record["label"] = label
            out.write(json.dumps(record) + "\n")
            out.flush()
            stats.frame(record)
            if preview is not None:
                preview.update(item, pred)
            if sa.adapted_batches - saved_at >= a.checkpoint_every:
                checkpoint()
                saved_at = sa.adapted_batches
            status.update()
    except _Interrupted:
        pass
    except BrokenPipeError:  # the reader of stdout went away
        stop.set()
    except SourceError as e:
        _log(f"error: {e}")
        code = 1
    finally:
        stats.stopping = True
        for s, h in previous.items():
            signal.signal(s, h)
    sa.flush()  # every frame marked adapted is adapted on
    checkpoint()
    status.end()
    _print_summary(stats)
    return code


def _print_summary(stats: Stats) -> None:
    s = stats.summary()
    fps = s["frames"] / s["seconds"] if s["seconds"] else 0.0
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    _log(f"edgetta serve: {s['frames']} frames in {s['seconds']:.1f} s ({fps:.1f} fps), "
         f"{s['adapted_batches']} adapted batches of {s['batch_size']}, skipped: {skipped}, "
         f"resets {s['resets']}, reconnects {s['reconnects']}")
    if s["predict_ms_mean"] is not None:
        lat = f"latency: predict {s['predict_ms_mean']:.2f} ms per frame (p95 {s['predict_ms_p95']:.2f})"
        if s["adapt_ms_mean"] is not None:
            lat += f", adaptation {s['adapt_ms_mean']:.1f} ms per batch"
        _log(lat)
    if s["accuracy"] is not None:
        line = f"accuracy on {s['labelled']} labelled frames: adapted {100 * s['accuracy']:.1f}%"
        if s["accuracy_no_adaptation"] is not None:
            line += f", no adaptation {100 * s['accuracy_no_adaptation']:.1f}%"
        _log(line)
    _log("summary: " + json.dumps(s))
