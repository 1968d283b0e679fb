"""Frame-by-frame prediction with batched adaptation, tent-style.

    sa = StreamingAdapter(Adapter.load("bundle/"), batch_size=64)
    for frame in frames:
        p = sa.push(frame)        # predicted at once, then buffered
    sa.flush()                    # adapt on what is left in the buffer

Every frame is predicted as it arrives (one inference, running statistics); adaptation runs on
the buffer each time it holds ``batch_size`` frames, so a frame's latency does not depend on the
batch size. A collapse guard resets the adapter to its warmed-up state when the predictions
collapse onto one class or their entropy onto zero.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prediction:
    index: int
    timestamp: float
    class_index: int
    class_name: str
    confidence: float
    adapted: bool            # the frame went into an adaptation batch (see StreamingAdapter)
    predict_ms: float
    batch: int | None = None  # number of the adaptation batch it belongs to (1-based)
    label: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["label"] is None:
            del d["label"]
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class CollapseGuard:
    """Collapsed when, over the last ``window`` predictions, one class takes at least
    ``max_share`` of them or the mean entropy falls below ``min_entropy`` (a fraction of
    ln C, the entropy of a uniform prediction). ``window=0`` turns the guard off."""
    window: int = 256
    max_share: float = 0.9
    min_entropy: float = 0.05
    _classes: deque = field(default_factory=deque, repr=False)
    _entropy: deque = field(default_factory=deque, repr=False)

    def observe(self, probs: np.ndarray) -> None:
        if self.window <= 0:
            return
        p = np.clip(probs, 1e-12, 1.0)
        h = float(-(p * np.log(p)).sum() / math.log(len(p))) if len(p) > 1 else 0.0
        self._classes.append(int(probs.argmax()))
        self._entropy.append(h)
        while len(self._classes) > self.window:
            self._classes.popleft()
            self._entropy.popleft()

    def collapsed(self) -> str | None:
        """Why the window looks collapsed, or None (also None until the window is full)."""
        if self.window <= 0 or len(self._classes) < self.window:
            return None
        cls, n = Counter(self._classes).most_common(1)[0]
        if n / self.window >= self.max_share:
            return f"class {cls} is {n / self.window:.0%} of the last {self.window} predictions"
        h = sum(self._entropy) / self.window
        if h < self.min_entropy:
            return f"mean entropy {h:.3f} ln C over the last {self.window} predictions"
        return None

    def clear(self) -> None:
        self._classes.clear()
        self._entropy.clear()


class SourceModel:
    """The warmed-up model that never adapts, to measure accuracy without adaptation beside
    the adapted one on a labelled stream (its own inference session: one extra inference)."""

    def __init__(self, adapter: Any):
        from ._ort import onnxruntime
        self._session = onnxruntime().InferenceSession(
            str(adapter.bundle.file("inference.onnx")), providers=["CPUExecutionProvider"])
        self._state = adapter.meta_state()

    def predict_tensor(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(["logits"], {"input": x, **self._state})[0]


class StreamingAdapter:
    """Predict each pushed frame at once; adapt on every ``batch_size`` buffered frames.

    ``Prediction.adapted`` is set when the frame enters the buffer: every buffered frame is
    adapted on, when the buffer fills or at ``flush()``. A reset by the collapse guard happens
    right after an adaptation step, when the buffer is empty, so no buffered frame is lost."""

    def __init__(self, adapter: Any, batch_size: int = 64, adapt: bool = True,
                 guard: CollapseGuard | None = None, baseline: SourceModel | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.adapter = adapter
        self.batch_size = batch_size
        self.adapt = adapt
        self.guard = guard if guard is not None else CollapseGuard()
        self.baseline = baseline
        self._buffer: list[np.ndarray] = []
        self.frames = 0
        self.adapted_batches = 0
        self.adapt_errors = 0
        self.resets = 0
        self.last_reset_reason: str | None = None
        self.predict_ms: deque[float] = deque(maxlen=1000)   # recent, for percentiles
        self.adapt_ms: deque[float] = deque(maxlen=1000)
        self.predict_ms_total = 0.0
        self.adapt_ms_total = 0.0
        self.labelled = 0
        self.correct = 0
        self.correct_baseline = 0

    def push(self, frame: np.ndarray, label: int | None = None, index: int | None = None) -> Prediction:
        """Predict one uint8 HWC RGB frame, buffer it, adapt when the buffer is full. Raises
        ``FrameError`` for a frame that cannot be used (nothing is buffered then). ``index``
        numbers the frame (default: frames pushed so far)."""
        t = time.perf_counter()
        # preprocessed once: the same tensor is predicted now and adapted on later, and frames
        # of different sizes can share a batch
        x = self.adapter.preprocess(frame)
        logits = self.adapter.predict_tensor(x)[0]
        predict_ms = (time.perf_counter() - t) * 1e3
        probs = softmax(logits.astype(np.float64))
        cls = int(probs.argmax())
        self.predict_ms.append(predict_ms)
        self.predict_ms_total += predict_ms
        self.guard.observe(probs)
        if label is not None:
            self.labelled += 1
            self.correct += int(cls == label)
            if self.baseline is not None:
                self.correct_baseline += int(self.baseline.predict_tensor(x)[0].argmax() == label)
        pred = Prediction(
            index=self.frames if index is None else index, timestamp=time.time(),
            class_index=cls, class_name=str(self.adapter.class_names[cls]),
            confidence=float(probs[cls]), adapted=self.adapt, predict_ms=predict_ms,
            batch=self.adapted_batches + 1 if self.adapt else None,
            label=None if label is None else int(label))
        self.frames += 1
        if self.adapt:
            self._buffer.append(x)
            if len(self._buffer) >= self.batch_size:
                self.flush()
        return pred

    @property
    def pending(self) -> int:
        """Frames buffered for the next adaptation step."""
        return len(self._buffer)

    def flush(self) -> bool:
        """Adapt on the buffered frames now (one step); then run the collapse guard. True when
        a step ran."""
        if not self._buffer:
            return False
        x = np.concatenate(self._buffer)
        self._buffer = []
        t = time.perf_counter()
        try:
            self.adapter.adapt(x)  # the frames are preprocessed already
        except FloatingPointError:  # non-finite loss: the adapter left its state unchanged
            self.adapt_errors += 1
            return False
        self.adapt_ms.append((time.perf_counter() - t) * 1e3)
        self.adapt_ms_total += self.adapt_ms[-1]
        self.adapted_batches += 1
        reason = self.guard.collapsed()
        if reason is not None:
            self.adapter.reset()
            self.guard.clear()
            self.resets += 1
            self.last_reset_reason = reason
        return True

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def accuracy_no_adaptation(self) -> float | None:
        return self.correct_baseline / self.labelled if self.labelled and self.baseline else None
