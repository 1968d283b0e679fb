"""``edgetta serve`` as a service: output latency and gaps, health after the camera goes away,
a soak, and the collapse guard.

    python -m benchmarks.latency                      # every suite (about 25 minutes)
    python -m benchmarks.latency --suite latency --seconds 40
    python -m benchmarks.latency --suite soak --soak-seconds 600
    python -m benchmarks.latency --suite guard
    python -m benchmarks.latency --suite gil          # does a step block other threads?

latency: ``edgetta serve`` on the built-in default bundle (WRN-16-2) in a subprocess, its
output lines timed where they are read (here). Sources: ffmpeg's MJPEG server on 127.0.0.1 at
25 fps (``-re``) and at the rate ffmpeg can make frames (no ``-re``), both live (the newest
frame is predicted, the rest dropped and counted), and the demo stream as a file source at full
speed (every frame, in order); adaptation on and off, ``--batch 32``. Per-frame latency is from
the frame's capture (the reader thread) to its output line (the record's ``latency_ms``).
health: seconds from killing the camera (ffmpeg) to ``/health`` answering non-200.
soak: the demo stream looped at full speed with adaptation; RSS sampled from ``/metrics``.
guard: in process, deterministic (the worker runs in the loop's thread): resets and accuracy on
the demo stream at the bundle's lr and at lr 0.5 and 1.0, guard on and off, and resets on a
static scene (one frame repeated), reported per hour at 25 fps.
Results: benchmarks/results/latency.json (each suite replaces its own section).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, ROOT, HelpFormatter, export_cached_bundle, merge_json, run_cli

OUT = RESULTS / "latency.json"


def default_bundle() -> Path:
    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT
    return export_cached_bundle(checkpoint.load(DEFAULT_CHECKPOINT), "serve_default", portable=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ffmpeg_camera(port: int, realtime: bool) -> subprocess.Popen:
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error"] + (["-re"] if realtime else []) + [
        "-f", "lavfi", "-i", "testsrc=size=96x96:rate=25", "-f", "mpjpeg", "-listen", "1",
        f"http://127.0.0.1:{port}/cam.mjpg"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class ServeRun:
    """``edgetta serve`` in a subprocess; output lines timed on arrival."""

    def __init__(self, bundle: Path, source: str, *extra: Any):
        self.http = free_port()
        cmd = [sys.executable, "-m", "edgetta", "serve", str(bundle), "--source", source,
               "--http", str(self.http), *map(str, extra)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.arrivals: list[float] = []
        self.records: list[dict[str, Any]] = []
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.arrivals.append(time.monotonic())
            self.records.append(json.loads(line))

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def rss_mib(self) -> float | None:
        code, text = self.get("/metrics")
        m = re.search(r"^edgetta_resident_memory_bytes (\S+)$", text, re.M) if code == 200 else None
        return float(m.group(1)) / 2**20 if m else None

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        time.sleep(0.2)
        lines = [l for l in self.err if l.startswith("summary: ")]
        return json.loads(lines[-1][len("summary: "):]) if lines else {}

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def pct(v: Any, q: float) -> float | None:
    v = np.asarray(v, float)
    return round(float(np.percentile(v, q)), 1) if v.size else None


def latency_run(bundle: Path, source: str, adapt: bool, seconds: float, warmup: float = 5.0) -> dict[str, Any]:
    cam = None
    if source.startswith("ffmpeg"):
        port = free_port()
        cam = ffmpeg_camera(port, realtime=source == "ffmpeg-25fps")
        spec = f"http://127.0.0.1:{port}/cam.mjpg"
    else:
        spec = "demo"
    extra = ["--batch", 32, "--reconnect-delay", 0.2] + ([] if adapt else ["--no-adapt"])
    extra += ["--loop"] if spec == "demo" else []
    run = ServeRun(bundle, spec, *extra)
    try:
        end = time.monotonic() + 120
        while not run.arrivals and time.monotonic() < end and run.proc.poll() is None:
            time.sleep(0.05)
        time.sleep(warmup)  # loading, the first steps
        start_n = len(run.arrivals)
        t0 = time.monotonic()
        time.sleep(seconds)
        n = len(run.arrivals)
        _, metrics_text = run.get("/metrics")
    finally:
        summary = run.stop()
        if cam is not None:
            cam.kill()
            cam.wait()
    arr = np.asarray(run.arrivals[start_n:n])
    recs = run.records[start_n:n]
    gaps = np.diff(arr) * 1e3
    lat = [r["latency_ms"] for r in recs]
    batches = {r["batch"] for r in recs if r["adapted"]}
    return {
        "source": source, "adapt": adapt, "batch": 32, "seconds": seconds,
        "frames": len(recs), "fps": round(len(recs) / seconds, 2),
        "latency_ms_p50": pct(lat, 50), "latency_ms_p99": pct(lat, 99),
        "gap_ms_p50": pct(gaps, 50), "gap_ms_p99": pct(gaps, 99),
        "gap_ms_max": round(float(gaps.max()), 1) if gaps.size else None,
        "frames_dropped_total": summary.get("dropped_frames"),
        "frames_not_adapted_total": summary.get("frames_not_adapted"),
        "frames_not_adapted_in_window": sum(not r["adapted"] for r in recs) if adapt else None,
        "batches_adapted_per_minute": round(len(batches) * 60 / seconds, 1) if adapt else None,
        "adapt_ms_mean": summary.get("adapt_ms_mean"),
        "predict_ms_p95": summary.get("predict_ms_p95"),
        "every_batch_adapted": (summary.get("frames_not_adapted") == 0 and
                                summary.get("adaptation_steps") == summary.get("adapted_batches")) if adapt else None,
        "exceptions": run.stderr.count("Traceback"),
    }


def health_run(bundle: Path, before: float = 15.0) -> dict[str, Any]:
    port = free_port()
    cam = ffmpeg_camera(port, realtime=True)
    run = ServeRun(bundle, f"http://127.0.0.1:{port}/cam.mjpg", "--batch", 32)
    try:
        time.sleep(before)
        ok_before = run.get("/health")[0]
        cam.kill()
        cam.wait()
        t0 = time.monotonic()
        code = 200
        while code == 200 and time.monotonic() - t0 < 60:
            time.sleep(0.25)
            code, body = run.get("/health")
        went = time.monotonic() - t0
        ready_code, ready_body = run.get("/ready")
    finally:
        run.stop()
    return {"health_before": ok_before, "seconds_to_non_200": round(went, 2), "health_after": code,
            "ready_after": ready_code, "reasons": json.loads(ready_body).get("reasons") if ready_code else None,
            "stale_after_s": 10.0}


def soak_run(bundle: Path, seconds: float) -> dict[str, Any]:
    run = ServeRun(bundle, "demo", "--loop", "--batch", 32, "--output", "/dev/null")
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and run.proc.poll() is None:
            time.sleep(5)
            rss = run.rss_mib()
            if rss is not None:
                samples.append((round(time.monotonic() - t0, 1), round(rss, 1)))
    finally:
        summary = run.stop()
    rss = np.array([s[1] for s in samples])
    minute = [float(rss[i:i + 12].min()) for i in range(0, len(rss), 12)]  # floor per minute
    return {"seconds": round(time.monotonic() - t0, 1), "frames": summary.get("frames"),
            "adapted_batches": summary.get("adapted_batches"), "resets": summary.get("resets"),
            "rss_floor_mib_per_minute": [round(m, 1) for m in minute],
            "rss_min_mib": float(rss.min()) if rss.size else None,
            "rss_max_mib": float(rss.max()) if rss.size else None,
            "exceptions": run.stderr.count("Traceback"), "exit_code": run.proc.returncode,
            "samples": samples}


def guard_run(bundle: Path, static_frames: int) -> dict[str, Any]:
    from edgetta import Adapter
    from edgetta.streaming import CollapseGuard, SourceModel, StreamingAdapter
    from edgetta.streams import load_stream
    s = load_stream("demo")
    out: dict[str, Any] = {"stream": s.description, "frames": len(s.images), "batch": 32,
                           "window": CollapseGuard().window}
    cases = []
    for lr in (None, 0.5, 1.0):  # the Adapter refuses lr > 1
        for window in (0, CollapseGuard().window):
            a = Adapter.load(bundle, lr=lr)
            sa = StreamingAdapter(a, batch_size=32, guard=CollapseGuard(window=window),
                                  baseline=SourceModel(a), threaded=False)
            for img, lab in zip(s.images, s.labels):
                sa.push(img, label=int(lab))
            sa.close()
            cases.append({"lr": a.lr, "guard": window > 0, "resets": sa.resets,
                          "accuracy": round(sa.accuracy, 4),
                          "accuracy_no_adaptation": round(sa.accuracy_no_adaptation, 4),
                          "last_reset_reason": sa.last_reset_reason})
            print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    out["collapse_cases"] = cases
    static = []
    for idx in (0, 1000, 2500):  # three scenes, each one frame repeated
        a = Adapter.load(bundle)
        sa = StreamingAdapter(a, batch_size=32, guard=CollapseGuard(), baseline=SourceModel(a),
                              threaded=False)
        for _ in range(static_frames):
            sa.push(s.images[idx])
        sa.close()
        hours = static_frames / 25 / 3600
        static.append({"frame": idx, "frames": static_frames, "resets": sa.resets,
                       "resets_per_hour_at_25fps": round(sa.resets / hours, 2)})
        print(json.dumps(static[-1]), file=sys.stderr, flush=True)
    out["static_scene"] = static
    return out


def gil_run(bundle: Path, steps: int = 4) -> dict[str, Any]:
    """Does an adaptation step let other Python threads run? A thread that wakes every 5 ms
    records its largest gap while the engine steps at batch 32."""
    from edgetta import Adapter
    from edgetta.streams import load_stream
    x_frames = load_stream("demo").images[:32]
    out = {}
    for engine in ("ort-training", "onnx"):
        a = Adapter.load(bundle, engine=engine, threads=1)
        x = a.preprocess(x_frames)
        a.adapt(x)
        ticks: list[float] = []
        stop = threading.Event()

        def tick() -> None:
            while not stop.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.005)
        th = threading.Thread(target=tick)
        th.start()
        t = time.perf_counter()
        for _ in range(steps):
            a.adapt(x)
        step_ms = (time.perf_counter() - t) / steps * 1e3
        stop.set()
        th.join()
        out[engine] = {"step_ms": round(step_ms, 1),
                       "largest_gap_of_a_5ms_thread_ms": round(float(np.diff(ticks).max()) * 1e3, 1)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--suite", choices=["all", "latency", "health", "soak", "guard", "gil"], default="all")
    p.add_argument("--seconds", type=float, default=40.0, help="measured seconds per latency run")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--static-frames", type=int, default=9000, help="frames per static scene")
    a = p.parse_args()
    bundle = default_bundle()
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(),
               "note": "shared 2-core machine, other jobs running"}
    cmd = "python -m benchmarks.latency " + " ".join(sys.argv[1:])
    if a.suite in ("all", "latency"):
        runs = []
        # the done-when case (25 fps, adaptation on) three times: its worst gap is one sample
        cases = [("ffmpeg-25fps", True)] * 3 + [("ffmpeg-25fps", False), ("ffmpeg-max", True),
                                                 ("ffmpeg-max", False), ("file-max", True),
                                                 ("file-max", False)]
        for source, adapt in cases:
            runs.append(latency_run(bundle, source, adapt, a.seconds))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        merge_json(OUT, {"latency": {"command": cmd, **machine, "runs": runs}})
    suites = {"health": lambda: health_run(bundle), "soak": lambda: soak_run(bundle, a.soak_seconds),
              "gil": lambda: gil_run(bundle), "guard": lambda: guard_run(bundle, a.static_frames)}
    for name, run in suites.items():
        if a.suite in ("all", name):
            result = run()
            print(json.dumps({k: v for k, v in result.items() if k != "samples"}), file=sys.stderr,
                  flush=True)
            merge_json(OUT, {name: {"command": cmd, **machine, **result}})
    return 0


if __name__ == "__main__":
    run_cli(main)
