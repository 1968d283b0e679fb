"""``edgetta serve`` flags -> ``ServeConfig``, checked before anything starts."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any

from ..errors import EdgettaError
from ..sources import Backoff, Limits


class Refused(EdgettaError):
    """Refused before start: one line on stderr, exit code 2."""


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    source: str
    batch: int = 64
    no_adapt: bool = False
    output: str = "-"
    http: int | None = None
    host: str = "127.0.0.1"
    preview: int | None = None
    state_dir: str | None = None
    checkpoint_every: int = 10
    collapse_window: int = 256
    collapse_diversity: float = 0.5
    collapse_entropy: float = 0.1
    memory_budget: float | None = None
    limit: int | None = None
    loop: bool = False
    fps: float | None = None
    timeout: float = 10.0
    frame_timeout: float = 10.0
    stale_after: float = 10.0
    stuck_after: float = 60.0
    reconnect_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    reconnect_attempts: int = 10
    max_pixels: int = 4096 * 4096
    max_part_mib: float = 16.0
    http_connections: int = 16
    http_timeout: float = 5.0
    preview_clients: int = 4
    progress: bool = False
    no_baseline: bool = False
    lr: float | None = None
    provider: str = "cpu"
    engine: str = "auto"
    threads: int | None = None
    memory_arena: bool = False

    @property
    def adapt_threads(self) -> int:
        """onnxruntime threads of the adaptation step: all cores but one by default, which
        stays with capture and prediction."""
        return self.threads if self.threads else max(1, (os.cpu_count() or 2) - 1)

    def check(self) -> "ServeConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise Refused(msg)
        need(self.batch >= 1, f"--batch must be at least 1, got {self.batch}")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        need(self.collapse_window >= 0, f"--collapse-window must be 0 or more, got {self.collapse_window}")
        need(0 < self.collapse_diversity <= 1,
             f"--collapse-diversity must be in (0, 1], got {self.collapse_diversity}")
        need(0 <= self.collapse_entropy <= 1,
             f"--collapse-entropy must be in [0, 1], got {self.collapse_entropy}")
        need(self.fps is None or self.fps > 0, f"--fps must be positive, got {self.fps}")
        for name in ("timeout", "frame_timeout", "stale_after", "stuck_after", "http_timeout",
                     "max_part_mib"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        need(self.max_pixels >= 1, "--max-pixels must be positive")
        need(self.http_connections >= 1, "--http-connections must be at least 1")
        need(self.preview_clients >= 1, "--preview-clients must be at least 1")
        need(self.limit is None or self.limit >= 0, "--limit must be 0 or more")
        need(self.threads is None or self.threads >= 1, "--threads must be at least 1")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(max_pixels=self.max_pixels, max_part_bytes=int(self.max_part_mib * 1024 * 1024),
                      frame_timeout=self.frame_timeout)

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.reconnect_delay, self.reconnect_max_delay, self.reconnect_attempts)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "ServeConfig":
        return cls(**{f.name: getattr(a, f.name) for f in fields(cls)}).check()


def add_parser(subparsers: Any, description: str, run: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve", help="predict and adapt on a live source (camera, video, folder, stream)",
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ServeConfig  # defaults shown from one place
    s.add_argument("bundle", help="bundle folder written by 'edgetta export'")
    s.add_argument("--source", required=True,
                   help="camera index (0), /dev/videoN, video file, image folder, .npy/.npz, "
                        "'demo', rtsp://... or http://... (MJPEG)")
    s.add_argument("--batch", type=int, default=d.batch, help="adaptation batch size (>= 1)")
    s.add_argument("--no-adapt", action="store_true", help="predict only")
    s.add_argument("--output", default=d.output, help="JSON lines to this file (appended) instead of stdout")
    s.add_argument("--http", type=int, default=None, metavar="PORT",
                   help="serve /predictions, /health, /ready and /metrics on this port (0: any free port)")
    s.add_argument("--host", default=d.host, help="address for --http and --preview")
    s.add_argument("--preview", type=int, default=None, metavar="PORT",
                   help="MJPEG preview with the predicted class drawn on each frame")
    s.add_argument("--state-dir", default=None,
                   help="checkpoint the adapted state here, and resume it on restart")
    s.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                   help="checkpoint every N adaptation batches (and on SIGTERM/SIGINT)")
    s.add_argument("--collapse-window", type=int, default=d.collapse_window, metavar="FRAMES",
                   help="collapse guard window in adapted frames (0: no guard)")
    s.add_argument("--collapse-diversity", type=float, default=d.collapse_diversity,
                   help="reset when the adapted predictions use fewer than this fraction of the "
                        "effective classes the warmed-up model sees in the same frames")
    s.add_argument("--collapse-entropy", type=float, default=d.collapse_entropy,
                   help="reset when their mean entropy falls below this fraction of the "
                        "warmed-up model's on the same frames")
    s.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                   help="refuse to start if one adaptation step needs more memory (peak RSS)")
    s.add_argument("--limit", type=int, default=None, help="stop after N predicted frames")
    s.add_argument("--loop", action="store_true", help="replay a file, folder or array source")
    s.add_argument("--fps", type=float, default=None, help="pace the source to this frame rate")
    s.add_argument("--timeout", type=float, default=d.timeout, help="network connect/read timeout (s)")
    s.add_argument("--frame-timeout", type=float, default=d.frame_timeout,
                   help="reconnect a stream that delivers no complete frame for this long (s)")
    s.add_argument("--stale-after", type=float, default=d.stale_after,
                   help="/ready and /health answer 503 when no frame arrived for this long (s)")
    s.add_argument("--stuck-after", type=float, default=d.stuck_after,
                   help="/ready answers 503 when one adaptation step runs longer than this (s)")
    s.add_argument("--reconnect-delay", type=float, default=d.reconnect_delay,
                   help="first reconnect delay (s); doubles on each failure")
    s.add_argument("--reconnect-max-delay", type=float, default=d.reconnect_max_delay)
    s.add_argument("--reconnect-attempts", type=int, default=d.reconnect_attempts,
                   help="give up after this many failed reconnects in a row (0: never)")
    s.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="skip images larger than this many pixels (checked before decoding)")
    s.add_argument("--max-part-mib", type=float, default=d.max_part_mib,
                   help="largest image file or MJPEG part accepted (MiB)")
    s.add_argument("--http-connections", type=int, default=d.http_connections,
                   help="open connections served at once per HTTP port; more are refused")
    s.add_argument("--http-timeout", type=float, default=d.http_timeout,
                   help="drop an HTTP client that sends nothing for this long (s)")
    s.add_argument("--preview-clients", type=int, default=d.preview_clients,
                   help="preview viewers served at once; more get 503")
    s.add_argument("--progress", action="store_true",
                   help="status line on stderr even when it is not a terminal")
    s.add_argument("--no-baseline", action="store_true",
                   help="on labelled streams, do not measure accuracy without adaptation")
    s.add_argument("--lr", type=float, default=None, help="override the bundle's learning rate")
    s.add_argument("--provider", default=d.provider, choices=["cpu", "cuda", "auto"])
    s.add_argument("--engine", default=d.engine, choices=["auto", "ort-training", "onnx"],
                   help="auto: the portable step when the bundle has one (it lets capture and "
                        "prediction run during a step; see docs/serve.md), else onnxruntime-training")
    s.add_argument("--threads", type=int, default=None,
                   help="threads of the adaptation step (default: all cores but one)")
    s.add_argument("--memory-arena", action="store_true",
                   help="keep onnxruntime's memory arena: faster steps (no page faults for each step's tensors), higher peak memory (docs/speed.md)")
    s.set_defaults(func=run)
    return s
