"""``edgetta serve BUNDLE --source SOURCE``: predict every frame of a live source, adapt on
batches of them in the background, for hours.

Out: one JSON line per frame (stdout or ``--output``); optionally a local HTTP endpoint
(``/predictions``, ``/health``, ``/ready``, ``/metrics`` in the Prometheus text format) and an
MJPEG preview. The adapted state is checkpointed atomically into ``--state-dir`` every
``--checkpoint-every`` batches and on SIGTERM/SIGINT, and a restart resumes it. Depth:
docs/serve.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..errors import EdgettaError
from .config import Refused, ServeConfig
from .config import add_parser as _add_config_parser
from .loop import STATE_FILE, Service, adaptation_peak_mib
from .telemetry import Summary, summary_lines

__all__ = ["Refused", "STATE_FILE", "ServeConfig", "Service", "Summary", "adaptation_peak_mib",
           "add_parser", "run"]


class _StderrFormatter(logging.Formatter):
    """Warnings as ``warning: ...``, information as is: the lines a user reads."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def configure_logging() -> None:
    root = logging.getLogger("edgetta")
    if not any(getattr(h, "_edgetta_serve", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(_StderrFormatter())
        h._edgetta_serve = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.INFO)
    # importing onnxruntime puts a handler on the root logger: without this, every line twice
    root.propagate = False


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return _add_config_parser(subparsers, __doc__, run)


def run(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        service = Service(ServeConfig.from_args(args))
        summary = service.run()
    except EdgettaError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for line in summary_lines(summary):
        print(line, file=sys.stderr, flush=True)
    return service.code
