"""The device-side adaptation loop: predict and adapt in one call, tent-style.

    adapter = Adapter.load("bundle/")        # engine="auto": onnxruntime-training, else portable
    logits = adapter.step(frames)            # predicts the batch, then adapts on it
    logits = adapter.step(frames, adapt=False)

An engine (``edgetta.engines``) runs each adaptation step: loss, gradients and the SGD update of
the meta networks; the step's own forward pass gives the batch's logits. Single frames are
predicted by the inference graph with the meta BatchNorms on running statistics that this loop
keeps from the adaptation batches. That graph is a second session with its own copy of the frozen
weights (on x86-64), so it loads on the first prediction, not before: a process that only adapts
(``edgetta adapt``) never holds it. ``open_predictor()`` loads it ahead of time.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .bundle import Bundle
from .engines import (ENGINES, PROVIDERS, Engine, SharedWeights, choose_engine, frozen_weights,
                      has_blocked_layout, inference_session, resolve_provider, select_engine,
                      session_options, weight_sharing)
from .errors import StateError
from .preprocess import preprocess
from .system import atomic_write, pin_mmap_threshold

__all__ = ["Adapter", "ENGINES", "PROVIDERS", "session_options"]


class Adapter:
    """Predict-and-adapt on one bundle.

    ``engine``: "auto" (onnxruntime-training where it imports, else the portable step),
    "ort-training" or "onnx". ``provider``: "cpu", "cuda" or "auto" (CUDA where available).
    ``threads``: onnxruntime's intra-op threads (None: onnxruntime's default, all cores).
    ``memory_arena`` and ``prepacking``: onnxruntime allocator settings, off by default
    (docs/memory.md). ``share_weights``: the inference session and the engine read one copy of
    the frozen weights (None: where that costs no speed, i.e. on the CPU without onnxruntime's
    x86-64 NCHWc layout; True on x86-64 turns that layout off: less memory, slower steps). ``lr``,
    ``momentum`` and ``bn_momentum`` (how far each step moves the running statistics that single
    frames are predicted with: docs/running_stats.md) override the bundle's. ``anchor`` (rho, off at 0):
    after every step the meta parameters are pulled back toward the warmed-up state,
    theta <- theta0 + (1 - rho) (theta - theta0), which stops their drift over long runs
    (docs/longterm.md); it costs no memory, theta0 is kept for ``reset`` anyway."""

    def __init__(self, bundle: Bundle, provider: str = "cpu", lr: float | None = None,
                 momentum: float | None = None, memory_arena: bool = False, engine: str = "auto",
                 threads: int | None = None, prepacking: bool = False, anchor: float = 0.0,
                 share_weights: bool | None = None, bn_momentum: float | None = None):
        if not (np.isfinite(anchor) and 0 <= anchor < 1):
            raise ValueError(f"anchor must be in [0, 1), got {anchor}")
        if lr is not None and not (np.isfinite(lr) and 0 < lr <= 1):
            raise ValueError(f"lr must be in (0, 1], got {lr}")
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if bn_momentum is not None and not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        self.bundle = bundle
        m = bundle.manifest
        pin_mmap_threshold()
        name = choose_engine(engine, bundle)
        provider = resolve_provider(provider, name)
        share = weight_sharing(share_weights, provider)
        opts = session_options(memory_arena, prepacking, threads,
                               blocked_layout=not (share and has_blocked_layout()))
        # held here as well as by the engine: the inference session reads them too
        self.shared: SharedWeights | None = frozen_weights(bundle, name) if share else None
        if self.shared is not None:
            self.shared.add_to(opts)
        self.runner: Engine = select_engine(name, bundle, provider, lr, momentum, opts, self.shared)
        self.engine: str = self.runner.name
        self.provider: str = self.runner.provider
        self.threads = threads
        self.anchor = float(anchor)
        self.lr = m.adaptation.lr if lr is None else float(lr)
        self.momentum = m.adaptation.momentum if momentum is None else float(momentum)
        self.bn_momentum = m.adaptation.bn_momentum if bn_momentum is None else float(bn_momentum)
        self.input_spec = m.input.as_dict()
        self._opts = opts
        self._session: Any = None
        self._session_lock = threading.Lock()
        self._stat_of: dict[str, str] = dict(m.running_stats)
        init = bundle.initial_meta_state()
        self._stats = {n: init[n] for n in m.kept_running_stats}
        self._initial = (self.runner.params(), dict(self._stats))
        self.steps = 0
        self.last_loss: float | None = None

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, engine: str = "auto", provider: str = "cpu",
             threads: int | None = None, memory_arena: bool = False, prepacking: bool = False,
             lr: float | None = None, momentum: float | None = None, anchor: float = 0.0,
             share_weights: bool | None = None, bn_momentum: float | None = None) -> "Adapter":
        """Open and verify a bundle (its manifest hash and every file's sha256), then load it."""
        return cls(Bundle.open(bundle_dir), provider=provider, lr=lr, momentum=momentum,
                   memory_arena=memory_arena, engine=engine, threads=threads, prepacking=prepacking,
                   anchor=anchor, share_weights=share_weights, bn_momentum=bn_momentum)

    @property
    def class_names(self) -> list[str]:
        return self.bundle.class_names

    def preprocess(self, frames: Any, color_order: str = "RGB") -> np.ndarray:
        return preprocess(frames, self.input_spec, color_order)

    def step(self, frames: Any, adapt: bool = True, color_order: str = "RGB") -> np.ndarray:
        """Logits for ``frames`` (uint8 HWC frame or NHWC batch); with ``adapt`` the meta
        networks then take one SGD step on this batch (the logits come from before it).
        Adapt on batches: the meta BatchNorms use the batch's statistics, which a single frame
        cannot supply (``StreamingAdapter`` predicts frames one by one and adapts on batches)."""
        x = self.preprocess(frames, color_order)
        return self.adapt(x) if adapt else self.predict_tensor(x)

    def predict_tensor(self, x: np.ndarray, state: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits of a preprocessed NCHW float32 batch on the current state (no update), or on
        ``state`` (a ``meta_state()`` snapshot): onnxruntime's ``run`` is thread-safe, so a
        serving loop predicts on a snapshot while another thread adapts, with one session."""
        if state is None:
            state = {**self.runner.params(), **self._stats}
        session = self._session or self.open_predictor()._session
        return session.run(["logits"], {"input": x, **state})[0]

    @property
    def predictor_open(self) -> bool:
        """Whether the inference graph is loaded (by a prediction or ``open_predictor``)."""
        return self._session is not None

    def open_predictor(self) -> "Adapter":
        """Load the inference graph now (BundleError if onnxruntime cannot) instead of on the
        first prediction; a server calls it before its first frame. Safe from any thread."""
        with self._session_lock:
            if self._session is None:
                self._session = inference_session(self.bundle, self._opts, self.provider)
        return self

    def adapt(self, x: np.ndarray) -> np.ndarray:
        """One adaptation step on a preprocessed NCHW float32 batch; returns the logits the
        batch got before the step (tent's ``forward_and_adapt``). A non-finite loss raises
        FloatingPointError and leaves the state unchanged."""
        result = self.runner.step(x)
        m = self.bn_momentum
        for out_name, stat in self._stat_of.items():
            self._stats[stat] = (1 - m) * self._stats[stat] + m * result.batch_stats[out_name]
        if self.anchor:
            start, keep = self._initial[0], 1.0 - self.anchor
            self.runner.set_params({n: start[n] + keep * (p - start[n]) for n, p in self.runner.params().items()},
                                   self.runner.velocity())
        self.steps += 1
        self.last_loss = result.loss
        return result.logits

    def meta_state(self) -> dict[str, np.ndarray]:
        """Current meta-network parameters and running statistics (copies)."""
        return {**self.runner.params(), **{n: v.copy() for n, v in self._stats.items()}}

    def reset(self) -> None:
        """Back to the bundle's warmed-up state."""
        params, stats = self._initial
        self.runner.set_params(params, {n: np.zeros_like(v) for n, v in params.items()})
        self._stats = {n: v.copy() for n, v in stats.items()}
        self.steps = 0

    def save(self, path: str | os.PathLike) -> None:
        """Persist the adapted state atomically (fsync, then rename). Non-finite state is never
        written: StateError instead."""
        arrays = {f"t/{n}": v for n, v in self.meta_state().items()}
        arrays.update({f"v/{n}": v for n, v in self.runner.velocity().items()})
        bad = [k[2:] for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise StateError(f"adapted state holds non-finite values in {bad[0]}; not saved")
        arrays["steps"] = np.asarray(self.steps)
        arrays["bundle"] = np.asarray(self.bundle.fingerprint)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    def resume(self, path: str | os.PathLike) -> None:
        """Load state written by ``save`` for this same bundle. StateError for state of another
        bundle, malformed, of other shapes, or non-finite; the current state is then kept."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                fingerprint = str(data["bundle"])
                tensors = {k[2:]: data[k] for k in data.files if k.startswith("t/")}
                velocity = {k[2:]: data[k] for k in data.files if k.startswith("v/")}
                steps = int(data["steps"])
        except (OSError, ValueError, KeyError, EOFError, TypeError) as e:
            raise StateError(f"state {path} cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        except Exception as e:  # zipfile.BadZipFile and friends
            raise StateError(f"state {path} is not a state file ({type(e).__name__})") from None
        if fingerprint != self.bundle.fingerprint:
            raise StateError(f"state {path} was saved for another bundle")
        current = self.meta_state()
        params = self.runner.params()
        if set(tensors) != set(current) or set(velocity) != set(params):
            raise StateError(f"state {path} does not match this bundle's meta networks")
        for name, value in [*tensors.items(), *velocity.items()]:
            ref = current[name]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise StateError(f"state {path}: {name} has shape {value.shape} {value.dtype}, "
                                 f"the bundle's is {ref.shape} {ref.dtype}")
            if not np.isfinite(value).all():
                raise StateError(f"state {path} holds non-finite values in {name}")
        if steps < 0:
            raise StateError(f"state {path}: negative step count {steps}")
        self.runner.set_params({n: tensors[n] for n in params}, velocity)
        self._stats = {n: tensors[n] for n in self._stats}
        self.steps = steps
