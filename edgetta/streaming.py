"""Frame-by-frame prediction with adaptation in a background worker, tent-style.

    sa = StreamingAdapter(Adapter.load("bundle/"), batch_size=32)
    for frame in frames:
        p = sa.push(frame)        # predicted at once on the current state, then buffered
    sa.close()                    # adapt on what is left, wait for the worker

Every frame is predicted as it arrives, on a snapshot of the adapted state (one inference,
running statistics). Full buffers go to an ``AdaptationWorker`` thread, the only code that
touches the Adapter (onnxruntime-training's Module is not thread-safe); after each step it
publishes a new snapshot, swapped in with one reference assignment, so frames predicted while
a step runs use the previous state and a frame's latency does not depend on the batch size.

Back-pressure: a frame is buffered only when the worker has room for its batch (a slot is
reserved when a batch starts). ``blocking=True`` (files, folders) waits for room, so every
frame is adapted on; ``blocking=False`` (live sources) predicts the frame without buffering it
(``Prediction.adapted`` is False) rather than fall behind. ``adapted=True`` is a promise kept.

The collapse guard compares the adapted model with the warmed-up one on the same frames (see
``CollapseGuard``) and resets the adapter when the adapted predictions collapse.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from .errors import EdgettaError

log = logging.getLogger("edgetta.streaming")


@dataclass
class Prediction:
    index: int
    timestamp: float
    class_index: int
    class_name: str
    confidence: float        # NaN when the logits were not finite (see ``finite``)
    adapted: bool            # the frame is in a batch the worker will adapt on
    predict_ms: float
    batch: int | None = None  # number of the adaptation batch it belongs to (1-based)
    label: int | None = None
    finite: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["label"] is None:
            del d["label"]
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def state_is_finite(state: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(v).all()) for v in state.values())


@dataclass(frozen=True)
class Snapshot:
    """One published adapted state: predictions read it while the worker makes the next."""
    tensors: Mapping[str, np.ndarray]
    steps: int
    version: int
    finite: bool


class AdapterLike(Protocol):
    """What streaming needs of ``edgetta.Adapter`` (tests may pass a stand-in)."""
    steps: int

    @property
    def class_names(self) -> Sequence[str]: ...
    def preprocess(self, frames: Any) -> np.ndarray: ...
    def adapt(self, x: np.ndarray) -> np.ndarray: ...
    def reset(self) -> None: ...
    def meta_state(self) -> dict[str, np.ndarray]: ...
    def save(self, path: Any) -> None: ...


class Predictor(Protocol):
    def logits(self, x: np.ndarray, state: Mapping[str, np.ndarray]) -> np.ndarray: ...


class AdapterPredictor:
    """Predicts with the adapter's own inference session, fed a given meta state (no second
    copy of the graph)."""

    def __init__(self, adapter: Any):
        self._adapter = adapter

    def logits(self, x: np.ndarray, state: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._adapter.predict_tensor(x, state)


class SourceModel:
    """The warmed-up model that never adapts (accuracy without adaptation; the guard's
    reference)."""

    def __init__(self, adapter: Any, predictor: Predictor | None = None):
        self.predictor = predictor or AdapterPredictor(adapter)
        self.state = adapter.meta_state()

    def predict_tensor(self, x: np.ndarray) -> np.ndarray:
        return self.predictor.logits(x, self.state)


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of each row, as a fraction of ln C."""
    q = np.clip(p, 1e-12, 1.0)
    return -(q * np.log(q)).sum(-1) / math.log(p.shape[-1]) if p.shape[-1] > 1 else np.zeros(len(p))


def effective_classes(classes: np.ndarray, n_classes: int) -> float:
    """exp of the entropy of the class histogram: 1 when every frame gets one class, C when
    all classes are equally frequent."""
    share = np.bincount(classes, minlength=n_classes) / max(1, len(classes))
    share = share[share > 0]
    return float(np.exp(-(share * np.log(share)).sum()))


@dataclass
class CollapseGuard:
    """Collapse is judged against the warmed-up model on the same frames, not in absolute
    terms: a static scene gives one class to both (no reset), while a collapsing adaptation
    gives fewer classes or much lower entropy than the warmed-up model sees in the same frames.

    Over the last ``window`` adapted frames: collapsed when the adapted predictions' effective
    number of classes falls below ``diversity_ratio`` times the warmed-up model's, or their mean
    entropy below ``entropy_ratio`` times its mean entropy. ``window=0`` turns the guard off."""
    window: int = 256
    diversity_ratio: float = 0.5
    entropy_ratio: float = 0.1
    _adapted: deque = field(default_factory=deque, repr=False)
    _source: deque = field(default_factory=deque, repr=False)
    n_classes: int = 0

    def observe(self, adapted_probs: np.ndarray, source_probs: np.ndarray) -> None:
        """Probabilities (N x C) the adapted and the warmed-up model gave the same N frames."""
        if self.window <= 0:
            return
        self.n_classes = adapted_probs.shape[-1]
        for p, h in zip(adapted_probs.argmax(-1), _entropy(adapted_probs)):
            self._adapted.append((int(p), float(h)))
        for p, h in zip(source_probs.argmax(-1), _entropy(source_probs)):
            self._source.append((int(p), float(h)))
        while len(self._adapted) > self.window:
            self._adapted.popleft()
            self._source.popleft()

    def measures(self) -> tuple[float, float, float, float] | None:
        """(adapted, warmed-up) effective classes and mean entropies over the window, or None
        until the window is full."""
        if self.window <= 0 or len(self._adapted) < self.window:
            return None
        a = np.array(self._adapted)
        s = np.array(self._source)
        return (effective_classes(a[:, 0].astype(int), self.n_classes),
                effective_classes(s[:, 0].astype(int), self.n_classes),
                float(a[:, 1].mean()), float(s[:, 1].mean()))

    def collapsed(self) -> str | None:
        """Why the window looks collapsed, or None."""
        m = self.measures()
        if m is None:
            return None
        div_a, div_s, h_a, h_s = m
        if div_a < self.diversity_ratio * div_s:
            return (f"{div_a:.2f} effective classes in the last {self.window} predictions, the "
                    f"warmed-up model sees {div_s:.2f} in the same frames")
        if h_a < self.entropy_ratio * h_s:
            return (f"mean entropy {h_a:.3f} ln C over the last {self.window} predictions, the "
                    f"warmed-up model's is {h_s:.3f}")
        return None

    def clear(self) -> None:
        self._adapted.clear()
        self._source.clear()


@dataclass
class Batch:
    x: np.ndarray                 # preprocessed NCHW
    probs: np.ndarray             # what the loop predicted for these frames (N x C)
    labels: list[int | None]
    number: int                   # 1-based


@dataclass(frozen=True)
class _Checkpoint:
    path: Path
    done: threading.Event | None = None


@dataclass
class WorkerStats:
    """Counters of the worker; written by the worker thread only."""
    adapted_batches: int = 0
    adapt_errors: int = 0
    resets: int = 0
    nonfinite_resets: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    last_reset_reason: str | None = None
    guard_refires: int = 0          # resets in a row, each within two windows of the last
    labelled: int = 0
    correct: int = 0                # adapted predictions, on the frames of adapted batches
    correct_baseline: int = 0
    adapt_s: deque = field(default_factory=lambda: deque(maxlen=1000))
    adapt_s_total: float = 0.0


class AdaptationWorker:
    """Owns the Adapter: adapts queued batches, runs the guard, checkpoints, and publishes each
    new state as a ``Snapshot``. With ``threaded=False`` the work runs in the caller's thread
    (deterministic, for tests and benchmarks)."""

    def __init__(self, adapter: AdapterLike, guard: CollapseGuard, baseline: SourceModel | None,
                 capacity: int = 3, threaded: bool = True, state_path: Path | None = None,
                 checkpoint_every: int = 0,
                 on_adapted: Callable[[float], None] | None = None):
        self.adapter = adapter
        self.guard = guard
        self.baseline = baseline
        self.stats = WorkerStats()
        self.state_path = state_path
        self.checkpoint_every = checkpoint_every
        self.on_adapted = on_adapted or (lambda s: None)
        self.slots = threading.Semaphore(capacity)   # batches filling, queued or running
        self.busy_since: float | None = None
        self.failure: BaseException | None = None
        self._version = 0
        self._last_reset_batch = -10**9
        self.snapshot = self._snapshot()
        self._queue: queue.Queue[Any] = queue.Queue()  # bounded by ``slots``
        self._threaded = threaded
        self._thread = threading.Thread(target=self._run, name="edgetta-adapt", daemon=True)
        if threaded:
            self._thread.start()

    def _snapshot(self) -> Snapshot:
        state = self.adapter.meta_state()
        self._version += 1
        return Snapshot(state, int(self.adapter.steps), self._version, state_is_finite(state))

    def publish(self) -> None:
        """Take the adapter's current state as the one predictions use (worker thread only)."""
        snap = self._snapshot()
        if not snap.finite:
            self.adapter.reset()
            self.stats.nonfinite_resets += 1
            log.warning("the adapted state became non-finite; reset to the warmed-up state")
            snap = self._snapshot()
        self.snapshot = snap  # one reference assignment: readers see the old or the new state

    def submit(self, item: Any) -> None:
        if self._threaded:
            self._queue.put(item)
        else:
            self._handle(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._handle(item)
            except BaseException as e:  # noqa: BLE001  (recorded: /health reports it)
                self.failure = e
                log.error("adaptation worker failed: %s: %s", type(e).__name__, e)
                return

    def _handle(self, item: Any) -> None:
        if isinstance(item, Batch):
            try:
                self._adapt(item)
            finally:
                self.slots.release()
        elif isinstance(item, _Checkpoint):
            self.checkpoint(item.path)
            if item.done is not None:
                item.done.set()
        elif isinstance(item, threading.Event):
            item.set()

    def _adapt(self, b: Batch) -> None:
        st = self.stats
        self.busy_since = time.monotonic()
        try:
            source_probs = None
            if self.baseline is not None:
                source_probs = softmax(self.baseline.predict_tensor(b.x).astype(np.float64))
                for lab, p, s in zip(b.labels, b.probs, source_probs):
                    if lab is not None:
                        st.labelled += 1
                        st.correct += int(p.argmax() == lab)
                        st.correct_baseline += int(s.argmax() == lab)
            t = time.perf_counter()
            try:
                self.adapter.adapt(b.x)
            except FloatingPointError:  # non-finite loss: the adapter left its state unchanged
                st.adapt_errors += 1
                return
            dt = time.perf_counter() - t
            st.adapt_s.append(dt)
            st.adapt_s_total += dt
            st.adapted_batches += 1
            self.on_adapted(dt)
            if source_probs is not None:
                self.guard.observe(b.probs, source_probs)
            reason = self.guard.collapsed()
            if reason is not None:
                self.adapter.reset()
                self.guard.clear()
                st.resets += 1
                st.last_reset_reason = reason
                quick = st.adapted_batches - self._last_reset_batch <= 2 * self._window_batches(len(b.x))
                st.guard_refires = st.guard_refires + 1 if quick else 1
                self._last_reset_batch = st.adapted_batches
                log.warning("collapse guard: %s; reset to the warmed-up state", reason)
            elif st.adapted_batches - self._last_reset_batch > 2 * self._window_batches(len(b.x)):
                st.guard_refires = 0
            self.publish()
            if (self.state_path is not None and self.checkpoint_every
                    and st.adapted_batches % self.checkpoint_every == 0):
                self.checkpoint(self.state_path)
        finally:
            self.busy_since = None

    def _window_batches(self, batch: int) -> int:
        return max(1, -(-self.guard.window // max(1, batch)))

    def checkpoint(self, path: Path) -> bool:
        """Save the adapted state; a failure (full disk, non-finite state) is logged and
        counted, and serving goes on."""
        try:
            self.adapter.save(path)
        except (OSError, EdgettaError) as e:
            self.stats.checkpoint_failures += 1
            why = getattr(e, "strerror", None) or str(e)
            log.warning("checkpoint to %s failed (%s); serving goes on", path, why)
            return False
        self.stats.checkpoints += 1
        return True

    def request_checkpoint(self, path: Path, wait: float | None = None) -> None:
        done = threading.Event()
        self.submit(_Checkpoint(path, done))
        if wait is not None:
            done.wait(wait)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is done."""
        if not self._threaded or self.failure is not None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        if self._threaded and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return (not self._threaded or self._thread.is_alive()) and self.failure is None

    @property
    def queued(self) -> int:
        return self._queue.qsize()


class StreamingAdapter:
    """Predict each pushed frame at once on the published state; adapt on every
    ``batch_size`` buffered frames in the worker (see the module docstring)."""

    def __init__(self, adapter: AdapterLike, batch_size: int = 64, adapt: bool = True,
                 guard: CollapseGuard | None = None, baseline: SourceModel | None = None,
                 predictor: Predictor | None = None, threaded: bool = True,
                 blocking: bool = True, capacity: int = 3, state_path: Path | None = None,
                 checkpoint_every: int = 0,
                 on_adapted: Callable[[float], None] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.adapter = adapter
        self.batch_size = batch_size
        self.adapt = adapt
        self.blocking = blocking
        self.guard = guard if guard is not None else CollapseGuard()
        self.predictor = predictor or (baseline.predictor if baseline is not None
                                       else AdapterPredictor(adapter))
        if baseline is None and adapt and self.guard.window > 0:
            baseline = SourceModel(adapter, self.predictor)  # the guard's reference
        self.baseline = baseline
        self.worker = AdaptationWorker(adapter, self.guard, baseline, capacity=capacity,
                                       threaded=threaded and adapt, state_path=state_path,
                                       checkpoint_every=checkpoint_every, on_adapted=on_adapted)
        self._x: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._labels: list[int | None] = []
        self._have_slot = False
        self.batches_started = 0
        self.frames = 0
        self.not_adapted = 0               # frames predicted but not buffered (worker behind)
        self.nonfinite_predictions = 0
        self.predict_ms: deque[float] = deque(maxlen=1000)   # recent, for percentiles
        self.predict_ms_total = 0.0
        self.labelled = 0
        self.correct = 0

    def push(self, frame: np.ndarray, label: int | None = None, index: int | None = None) -> Prediction:
        """Predict one uint8 HWC RGB frame, buffer it, hand a full buffer to the worker.
        Raises ``FrameError`` for a frame that cannot be used (nothing is buffered then)."""
        t = time.perf_counter()
        # preprocessed once: the same tensor is predicted now and adapted on later, and frames
        # of different sizes can share a batch
        x = self.adapter.preprocess(frame)
        snap = self.worker.snapshot
        logits = self.predictor.logits(x, snap.tensors)[0]
        predict_ms = (time.perf_counter() - t) * 1e3
        probs = softmax(logits.astype(np.float64))
        finite = bool(np.isfinite(probs).all())
        if not finite:
            self.nonfinite_predictions += 1
        cls = int(np.nan_to_num(probs, nan=-1.0).argmax())
        self.predict_ms.append(predict_ms)
        self.predict_ms_total += predict_ms
        if label is not None:
            self.labelled += 1
            self.correct += int(cls == label)
        buffered = self.adapt and self._reserve()
        if buffered:
            self._x.append(x)
            self._probs.append(probs)
            self._labels.append(label)
        else:
            self.not_adapted += int(self.adapt)
        pred = Prediction(
            index=self.frames if index is None else index, timestamp=time.time(),
            class_index=cls, class_name=str(self.adapter.class_names[cls]),
            confidence=float(probs[cls]) if finite else float("nan"), adapted=buffered,
            predict_ms=predict_ms, batch=self.batches_started if buffered else None,
            label=None if label is None else int(label), finite=finite)
        self.frames += 1
        if buffered and len(self._x) >= self.batch_size:
            self.flush()
        return pred

    def _reserve(self) -> bool:
        """A slot for the batch this frame starts, if it starts one; False when the worker has
        no room and the source must not wait (or the worker is gone)."""
        if self._have_slot:
            return True
        slots = self.worker.slots
        while self.worker.alive:
            if slots.acquire(timeout=0.5) if self.blocking else slots.acquire(blocking=False):
                self._have_slot = True
                self.batches_started += 1
                return True
            if not self.blocking:
                break
        return False

    @property
    def pending(self) -> int:
        """Frames buffered for the next adaptation batch."""
        return len(self._x)

    def flush(self) -> bool:
        """Hand the buffered frames to the worker now (as one batch). True when there were any."""
        if not self._x:
            return False
        batch = Batch(np.concatenate(self._x), np.stack(self._probs), self._labels,
                      self.batches_started)
        self._x, self._probs, self._labels = [], [], []
        self._have_slot = False
        self.worker.submit(batch)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Adapt on what is buffered and wait for the worker to finish."""
        self.flush()
        self.worker.drain(timeout)

    # -- figures -------------------------------------------------------------------------
    @property
    def adapted_batches(self) -> int:
        return self.worker.stats.adapted_batches

    @property
    def resets(self) -> int:
        return self.worker.stats.resets

    @property
    def adapt_errors(self) -> int:
        return self.worker.stats.adapt_errors

    @property
    def last_reset_reason(self) -> str | None:
        return self.worker.stats.last_reset_reason

    @property
    def adapt_ms(self) -> list[float]:
        return [s * 1e3 for s in list(self.worker.stats.adapt_s)]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def accuracy_no_adaptation(self) -> float | None:
        """The warmed-up model's accuracy on the labelled frames of adapted batches."""
        st = self.worker.stats
        return st.correct_baseline / st.labelled if st.labelled else None
