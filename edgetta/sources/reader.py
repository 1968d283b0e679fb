"""A thread that reads a source, so that capture never waits for prediction or adaptation.

Live sources (cameras, network streams) keep only the newest frame: a frame the consumer has
not taken when the next one arrives is dropped and counted, so latency cannot build up. Files,
folders and arrays keep every frame, in order, through a bounded queue (the reader blocks when
it is full).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import EdgettaError, SourceError
from .openers import SkippedFrame, Source


@dataclass(frozen=True)
class Delivered:
    frame: np.ndarray
    position: int      # index in the source, skipped frames included (labels are looked up by it)
    received: float    # time.monotonic() when the reader got it


_END = object()


class FrameReader:
    def __init__(self, source: Source, stop: threading.Event, queue_size: int = 8,
                 fps: float | None = None,
                 on_skip: Callable[[SkippedFrame], None] | None = None):
        self.source = source
        self.stop = stop
        self.fps = fps
        self.on_skip = on_skip or (lambda s: None)
        self.live = source.live
        self.dropped = 0                     # live: frames replaced before they were taken
        self.read = 0                        # frames read (skipped ones included)
        self.last_frame_at: float | None = None
        self.error: EdgettaError | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._latest: Delivered | None = None
        self._ended = False
        self._end_taken = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edgetta-reader", daemon=True)

    def start(self) -> "FrameReader":
        self._thread.start()
        return self

    def _put(self, item: Any) -> None:
        if self.live:
            with self._cond:
                if item is _END:
                    self._ended = True
                else:
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = item
                self._cond.notify_all()
            return
        while not self.stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            for pos, item in enumerate(self.source):
                if self.stop.is_set():
                    break
                self.read += 1
                if self.fps:
                    delay = t0 + pos / self.fps - time.monotonic()
                    if delay > 0 and self.stop.wait(delay):
                        break
                if isinstance(item, SkippedFrame):
                    self.on_skip(item)
                    continue
                now = time.monotonic()
                self.last_frame_at = now
                self._put(Delivered(item, pos, now))
        except EdgettaError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001  (a reader must never die silently)
            self.error = SourceError(f"{self.source.name}: {type(e).__name__}: {e}")
        finally:
            if self.live:
                self._put(_END)
            else:
                self._put(_END)
                self._ended = True

    def get(self, timeout: float) -> Delivered | None:
        """The next frame, or None when none came within ``timeout`` or the source ended
        (see ``done``)."""
        if self.live:
            with self._cond:
                self._cond.wait_for(lambda: self._latest is not None or self._ended, timeout=timeout)
                item, self._latest = self._latest, None
                return item
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._end_taken = True
            return None
        return item

    @property
    def done(self) -> bool:
        """The source ended (or failed: see ``error``) and every frame was taken."""
        if self.live:
            with self._cond:
                return self._ended and self._latest is None
        return self._end_taken

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
