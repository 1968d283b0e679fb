"""What serve tells the world: /metrics (Prometheus text format, written here), /health
(liveness), /ready (readiness), /predictions, the status line and the final summary.

prometheus_client is not used on the device: importing it costs more memory than this module
(measured in docs/serve.md); the tests parse this exposition with its parser.
"""
from __future__ import annotations

import bisect
import json
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np

from .. import __version__
from ..system import peak_rss_bytes, rss_bytes
from .http import reply

SKIP_KINDS = ("corrupt", "empty", "shape", "nan", "unsupported", "too_large")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics), safe to observe from one thread
    and read from others."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def samples(self) -> list[tuple[str, float]]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        out, acc = [], 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], counts):
            acc += c
            out.append((f'_bucket{{le="{le}"}}', acc))
        return out + [("_sum", total), ("_count", n)]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Summary:
    frames: int
    seconds: float
    adapted_batches: int
    batch_size: int
    adaptation_steps: int
    resumed_steps: int | None
    skipped: dict[str, int]
    dropped_frames: int
    frames_not_adapted: int
    resets: int
    reconnects: int
    adapt_errors: int
    checkpoints: int
    checkpoint_failures: int
    predict_ms_mean: float | None
    predict_ms_p95: float | None
    adapt_ms_mean: float | None
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    max_output_gap_ms: float | None
    labelled: int
    accuracy: float | None
    accuracy_no_adaptation: float | None


class Telemetry:
    """The loop's state as endpoints and the status line see it. The loop thread writes;
    HTTP threads read."""

    def __init__(self, sa: Any, source: Any, reader: Any, resumed_steps: int | None,
                 stale_after: float, stuck_after: float, engine: str, provider: str):
        self.sa, self.source, self.reader = sa, source, reader
        self.resumed_steps = resumed_steps
        self.stale_after, self.stuck_after = stale_after, stuck_after
        self.engine, self.provider = engine, provider
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.skipped: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=100)
        self.arrivals: deque[float] = deque(maxlen=120)
        self.latency_ms: deque[float] = deque(maxlen=10_000)
        self.max_gap_s = 0.0
        self.last_output: float | None = None
        self.predict_hist = Histogram()
        self.adapt_hist = Histogram()
        self.latency_hist = Histogram()
        self.stopping = False
        self.servers: list[Any] = []
        self.preview: Any = None
        self.lock = threading.Lock()

    # -- written by the loop -----------------------------------------------------------
    def frame(self, record: dict[str, Any], latency_s: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.recent.append(record)
            self.arrivals.append(now)
            self.latency_ms.append(latency_s * 1e3)
            if self.last_output is not None:
                self.max_gap_s = max(self.max_gap_s, now - self.last_output)
            self.last_output = now
        self.predict_hist.observe(record["predict_ms"] / 1e3)
        self.latency_hist.observe(latency_s)

    # -- read by anyone ----------------------------------------------------------------
    @property
    def fps(self) -> float:
        with self.lock:
            a = list(self.arrivals)
        if len(a) < 2 or a[-1] == a[0]:
            return 0.0
        return (len(a) - 1) / (a[-1] - a[0])

    def frame_age(self) -> float:
        """Seconds since the reader last got a frame (since start when none yet)."""
        last = self.reader.last_frame_at
        return time.monotonic() - (last if last is not None else self.started_mono)

    def liveness(self) -> Readiness:
        """Alive: the loop and the worker run, and frames arrive."""
        reasons = []
        if self.stopping:
            reasons.append("stopping")
        if not self.sa.worker.alive:
            reasons.append(f"adaptation worker died: {self.sa.worker.failure!r}")
        age = self.frame_age()
        if age > self.stale_after:
            reasons.append(f"no frame for {age:.1f} s (source {self.source.name})")
        return Readiness(not reasons, tuple(reasons))

    def readiness(self) -> Readiness:
        """Ready: alive, and the predictions can be trusted."""
        reasons = list(self.liveness().reasons)
        w = self.sa.worker
        busy = w.busy_since
        if busy is not None and time.monotonic() - busy > self.stuck_after:
            reasons.append(f"adaptation step running for {time.monotonic() - busy:.1f} s")
        if not w.snapshot.finite:
            reasons.append("adapted state is not finite")
        if w.stats.guard_refires >= 3:
            reasons.append(f"collapse guard fired {w.stats.guard_refires} times in a row: "
                           f"{w.stats.last_reset_reason}")
        if self.sa.nonfinite_predictions and self.recent and not self.recent[-1].get("finite", True):
            reasons.append("latest prediction is not finite")
        return Readiness(not reasons, tuple(reasons))

    def health(self) -> dict[str, Any]:
        live = self.liveness()
        ready = self.readiness()
        return {"status": "ok" if live.ready else "failing", "ready": ready.ready,
                "reasons": list(ready.reasons), "source": self.source.name,
                "uptime_s": round(time.time() - self.started, 3),
                "last_frame_age_s": round(self.frame_age(), 3), "frames": self.sa.frames,
                "adaptation_steps": int(self.sa.worker.snapshot.steps),
                "resumed_steps": self.resumed_steps, "pending_frames": self.sa.pending,
                "engine": self.engine, "provider": self.provider}

    def predictions(self) -> dict[str, Any]:
        with self.lock:
            recent = list(self.recent)
        return {"frames": self.sa.frames, "latest": recent[-1] if recent else None,
                "predictions": recent}

    def summary(self) -> Summary:
        sa, st = self.sa, self.sa.worker.stats
        p = np.asarray(sa.predict_ms)
        a = np.asarray(list(st.adapt_s)) * 1e3
        with self.lock:
            lat = np.asarray(self.latency_ms)
        pct = (lambda v, q: round(float(np.percentile(v, q)), 3) if v.size else None)
        return Summary(
            frames=sa.frames, seconds=round(time.time() - self.started, 3),
            adapted_batches=st.adapted_batches, batch_size=sa.batch_size,
            adaptation_steps=int(sa.worker.snapshot.steps), resumed_steps=self.resumed_steps,
            skipped={k: self.skipped[k] for k in sorted(self.skipped)},
            dropped_frames=self.reader.dropped, frames_not_adapted=sa.not_adapted,
            resets=st.resets, reconnects=self.source.reconnects, adapt_errors=st.adapt_errors,
            checkpoints=st.checkpoints, checkpoint_failures=st.checkpoint_failures,
            predict_ms_mean=round(float(p.mean()), 3) if p.size else None,
            predict_ms_p95=pct(p, 95), adapt_ms_mean=round(float(a.mean()), 3) if a.size else None,
            latency_ms_p50=pct(lat, 50), latency_ms_p99=pct(lat, 99),
            max_output_gap_ms=round(self.max_gap_s * 1e3, 3) if sa.frames > 1 else None,
            labelled=sa.labelled, accuracy=sa.accuracy,
            accuracy_no_adaptation=sa.accuracy_no_adaptation)

    def metrics(self) -> str:
        sa, st = self.sa, self.sa.worker.stats
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP edgetta_{name} {help_}")
            out.append(f"# TYPE edgetta_{name} {kind}")
            out.extend(f"edgetta_{name}{suffix} {float(value)!r}" for suffix, value in samples)

        def counter(name: str, help_: str, value: float) -> None:
            # the text format names a counter by its sample, _total included
            family(f"{name}_total", "counter", help_, [("", value)])

        family("build_info", "gauge", "Version, adaptation engine and execution provider.",
               [(f'{{version="{__version__}",engine="{self.engine}",provider="{self.provider}"}}', 1)])
        counter("frames", "Frames predicted.", sa.frames)
        counter("adapted_batches", "Adaptation steps run.", st.adapted_batches)
        counter("frames_not_adapted", "Frames predicted but not adapted on (worker behind).",
                sa.not_adapted)
        counter("dropped_frames", "Live frames replaced by a newer one before prediction.",
                self.reader.dropped)
        kinds = sorted(set(SKIP_KINDS) | set(self.skipped))
        family("skipped_frames_total", "counter", "Frames skipped, by kind.",
               [(f'{{kind="{k}"}}', self.skipped[k]) for k in kinds])
        counter("resets", "Resets to the warmed-up state by the collapse guard.", st.resets)
        counter("nonfinite_resets", "Resets because the adapted state became non-finite.",
                st.nonfinite_resets)
        counter("reconnects", "Reconnects of the source.", self.source.reconnects)
        counter("adapt_errors", "Adaptation steps dropped (non-finite loss).", st.adapt_errors)
        counter("checkpoints", "Adapted state checkpoints written.", st.checkpoints)
        counter("checkpoint_failures", "Checkpoints that could not be written.", st.checkpoint_failures)
        refused = sum(getattr(s, "refused", 0) for s in self.servers)
        counter("http_refused_connections", "HTTP connections refused over the cap.", refused)
        if self.preview is not None:
            counter("preview_refused_clients", "Preview viewers refused over the cap.", self.preview.refused)
        family("predict_seconds", "histogram", "Per-frame prediction time.", self.predict_hist.samples())
        family("adapt_seconds", "histogram", "Per-batch adaptation step time.", self.adapt_hist.samples())
        family("frame_latency_seconds", "histogram", "From the frame's capture to its output line.",
               self.latency_hist.samples())
        family("frames_per_second", "gauge", "Output rate over the last frames.", [("", round(self.fps, 3))])
        family("last_frame_age_seconds", "gauge", "Seconds since the source delivered a frame.",
               [("", round(self.frame_age(), 3))])
        family("ready", "gauge", "1 when /ready answers 200.", [("", int(self.readiness().ready))])
        family("adaptation_steps", "gauge", "Adaptation steps in the current state.",
               [("", sa.worker.snapshot.steps)])
        family("pending_frames", "gauge", "Frames buffered for the next adaptation batch.", [("", sa.pending)])
        family("queued_batches", "gauge", "Batches waiting for the adaptation worker.", [("", sa.worker.queued)])
        family("resident_memory_bytes", "gauge", "Resident set size.", [("", rss_bytes())])
        family("peak_resident_memory_bytes", "gauge", "Peak resident set size.", [("", peak_rss_bytes())])
        if sa.accuracy is not None:
            family("accuracy_ratio", "gauge", "Accuracy so far on labelled frames (adapted).",
                   [("", round(sa.accuracy, 6))])
        if sa.accuracy_no_adaptation is not None:
            family("accuracy_no_adaptation_ratio", "gauge", "Accuracy so far without adaptation.",
                   [("", round(sa.accuracy_no_adaptation, 6))])
        return "\n".join(out) + "\n"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0].rstrip("/") or "/"
        if path == "/metrics":
            reply(h, 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics().encode())
        elif path in ("/health", "/ready"):
            state = self.liveness() if path == "/health" else self.readiness()
            reply(h, 200 if state.ready else 503, "application/json",
                  json.dumps(self.health()).encode())
        elif path == "/predictions":
            reply(h, 200, "application/json", json.dumps(self.predictions()).encode())
        else:
            reply(h, 404, "text/plain", b"endpoints: /predictions /health /ready /metrics\n")


class StatusLine:
    """fps, batches and accuracy on stderr: redrawn in place on a terminal, else one line
    every few seconds (with --progress)."""

    def __init__(self, t: Telemetry, enabled: bool, tty: bool):
        self.t, self.enabled, self.tty = t, enabled, tty
        self.last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 5.0)):
            return
        self.last = now
        sa = self.t.sa
        parts = [f"{sa.frames} frames", f"{self.t.fps:.1f} fps", f"{sa.adapted_batches} adapted batches"]
        if sa.predict_ms:
            parts.append(f"predict {np.mean(sa.predict_ms):.1f} ms")
        if sa.adapt_ms:
            parts.append(f"adapt {np.mean(sa.adapt_ms):.0f} ms/batch")
        if sa.accuracy is not None:
            acc = f"acc {sa.accuracy:.1%}"
            if sa.accuracy_no_adaptation is not None:
                acc += f" (no adaptation {sa.accuracy_no_adaptation:.1%})"
            parts.append(acc)
        for what, n in (("skipped", sum(self.t.skipped.values())), ("dropped", self.t.reader.dropped),
                        ("resets", sa.resets)):
            if n:
                parts.append(f"{n} {what}")
        line = "  ".join(parts)
        sys.stderr.write(f"\r\033[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled and self.tty:
            self.update(force=True)
            sys.stderr.write("\n")


def summary_lines(s: Summary) -> list[str]:
    fps = s.frames / s.seconds if s.seconds else 0.0
    skipped = ", ".join(f"{k} {v}" for k, v in s.skipped.items()) or "none"
    lines = [f"edgetta serve: {s.frames} frames in {s.seconds:.1f} s ({fps:.1f} fps), "
             f"{s.adapted_batches} adapted batches of {s.batch_size}, skipped: {skipped}, "
             f"dropped {s.dropped_frames}, resets {s.resets}, reconnects {s.reconnects}"]
    if s.predict_ms_mean is not None:
        lat = f"latency: predict {s.predict_ms_mean:.2f} ms per frame (p95 {s.predict_ms_p95:.2f})"
        if s.adapt_ms_mean is not None:
            lat += f", adaptation {s.adapt_ms_mean:.1f} ms per batch"
        lines.append(lat)
    if s.accuracy is not None:
        line = f"accuracy on {s.labelled} labelled frames: adapted {100 * s.accuracy:.1f}%"
        if s.accuracy_no_adaptation is not None:
            line += f", no adaptation {100 * s.accuracy_no_adaptation:.1f}%"
        lines.append(line)
    lines.append("summary: " + json.dumps(asdict(s)))
    return lines
