"""The device-side adaptation loop: predict and adapt in one call, tent-style.

    adapter = Adapter.load("bundle/")
    logits = adapter.step(frames)            # predicts the batch, then adapts on it
    logits = adapter.step(frames, adapt=False)

Adaptation runs the bundle's onnxruntime-training graph (loss and gradients of the meta
networks only) and applies SGD with momentum here, since onnxruntime-training's built-in SGD
has none. Single frames are predicted by the inference graph with the meta BatchNorms on
running statistics that this loop keeps from the adaptation batches.
"""
from __future__ import annotations

import ctypes
from collections import deque
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._ort import onnxruntime, training_api
from .bundle import Bundle, BundleError
from .preprocess import preprocess

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _return_freed_memory_to_the_os(threshold: int = 1 << 16) -> None:
    """glibc raises its mmap threshold after large blocks are freed; later activations then come
    from the heap and freed ones stay in RSS. Pinning the threshold keeps big tensors on mmap,
    so memory freed between adaptation steps goes back to the OS (measured: a third less peak)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def session_options(memory_arena: bool = False, prepacking: bool = False) -> Any:
    """onnxruntime session settings for adaptation, each measured (the defaults are edgetta's)."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    # priority-based order runs each gradient node as soon as it can, freeing forward
    # tensors earlier than the default order (measured lower peak, same speed)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # onnxruntime's CPU arena grows in powers of two: measured, it doubles the peak RSS
    # of an adaptation step for no speed gain, so it is off unless asked for
    opts.enable_cpu_mem_arena = memory_arena
    # onnxruntime's memory pattern preallocates one block per planned layout; without it
    # tensors are allocated as they are made (measured, batch 64: 146 vs 157 MiB per step)
    opts.enable_mem_pattern = memory_arena
    if not prepacking:
        # a frozen conv's weights are read by its forward Conv and by the backward ConvTranspose,
        # which pre-packs its own transposed copy; unpacked, it reads the shared one (same GEMM,
        # transposed operand). Measured on aarch64 (benchmarks/load_memory.py): portable step of
        # WRN-28-10 172 vs 310 MiB loaded; on x86-64 no change in memory or step time
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


class Adapter:
    """Predict-and-adapt on one bundle. ``engine`` picks what runs the adaptation step:
    ``"ort-training"`` (onnxruntime-training's Module on the bundle's training graph) or
    ``"onnx"`` (the bundle's portable step graph on plain onnxruntime, for devices that have no
    onnxruntime-training build, such as Linux aarch64)."""

    ENGINES = ("ort-training", "onnx")

    def __init__(self, bundle: Bundle, provider: str = "cpu", lr: float | None = None,
                 momentum: float | None = None, memory_arena: bool = False,
                 engine: str = "ort-training"):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if engine not in self.ENGINES:
            raise ValueError(f"engine must be one of {self.ENGINES}, got {engine!r}")
        ort = onnxruntime()
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise RuntimeError(f"the installed onnxruntime has no {PROVIDERS[provider]}; "
                               f"available: {ort.get_available_providers()}")
        m = bundle.manifest
        if engine == "onnx" and not m["graphs"].get("portable_step"):
            raise BundleError(f"{bundle.path} has no portable step graph; export it again")
        self.bundle = bundle
        self.engine = engine
        hyper = m["adaptation"]
        self.lr = float(hyper["lr"] if lr is None else lr)
        self.momentum = float(hyper["momentum"] if momentum is None else momentum)
        self.bn_momentum = float(hyper["bn_momentum"])
        self.input_spec = m["input"]
        self._trainable: list[str] = list(m["trainable"])
        self._stat_of: dict[str, str] = dict(m["running_stats"])
        self._ort_optimizer = None
        _return_freed_memory_to_the_os()
        opts = session_options(memory_arena)
        providers = [PROVIDERS[provider]]
        try:
            self._session = ort.InferenceSession(str(bundle.file("inference.onnx")), opts,
                                                 providers=providers)
            if engine == "onnx":
                step = m["graphs"]["portable_step"]["file"]
                self._step_session = ort.InferenceSession(str(bundle.file(step)), opts,
                                                          providers=providers)
                self._step_outputs = [o.name for o in self._step_session.get_outputs()]
                with np.load(bundle.file("meta_init.npz"), allow_pickle=False) as init:
                    self._tensors = {n: init[n] for n in self._trainable + list(self._stat_of.values())}
            else:
                self._load_ort_training(opts, provider)
        except BundleError:
            raise
        except Exception as e:  # onnxruntime raises its own types; say which bundle failed
            raise BundleError(f"{bundle.path}: onnxruntime could not load the bundle: {e}") from e
        self._initial = {n: v.copy() for n, v in self._tensors.items()}
        self._velocity = {n: np.zeros_like(self._tensors[n]) for n in self._trainable}
        self.steps = 0
        self.last_loss: float | None = None
        # recent latencies only: a service runs for hours
        self.timings = {"adapt_ms": deque(maxlen=1000), "predict_ms": deque(maxlen=1000)}

    def _load_ort_training(self, opts: Any, provider: str) -> None:
        api = training_api()
        m = self.bundle.manifest
        self._state = api.CheckpointState.load_checkpoint(str(self.bundle.file("checkpoint")))
        self._module = api.Module(str(self.bundle.file("training_model.onnx")), self._state,
                                  device=provider, session_options=opts)
        self._outputs = list(self._module.output_names())
        if self.momentum == 0.0 and "optimizer" in m["graphs"]["training"]:
            # plain SGD: the bundle's own onnxruntime-training optimizer graph does the update
            self._ort_optimizer = api.Optimizer(str(self.bundle.file(m["graphs"]["training"]["optimizer"])),
                                                self._module)
            self._ort_optimizer.set_learning_rate(self.lr)
        self._tensors = {n: self._state.parameters[n].data.copy()
                         for n in self._trainable + list(self._stat_of.values())}

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, provider: str = "cpu", **kwargs: Any) -> "Adapter":
        """Open and verify a bundle (sha256 of every file), then load its graphs."""
        return cls(Bundle.open(bundle_dir), provider=provider, **kwargs)

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

    def predict_tensor(self, x: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        feeds = {"input": x}
        feeds.update(self._tensors)
        logits = self._session.run(["logits"], feeds)[0]
        self.timings["predict_ms"].append((time.perf_counter() - t) * 1e3)
        return logits

    def adapt(self, x: np.ndarray) -> np.ndarray:
        """One adaptation step on a preprocessed NCHW float32 batch; returns the logits the
        batch got before the step (tent's ``forward_and_adapt``)."""
        t = time.perf_counter()
        outs = self._step_portable(x) if self.engine == "onnx" else self._step_ort_training(x)
        m = self.bn_momentum
        for out_name, stat in self._stat_of.items():
            self._tensors[stat] = (1 - m) * self._tensors[stat] + m * outs[out_name]
        self.steps += 1
        self.last_loss = float(outs["loss"])
        self.timings["adapt_ms"].append((time.perf_counter() - t) * 1e3)
        return outs["logits"]

    @staticmethod
    def _check_loss(outs: dict[str, np.ndarray]) -> None:
        loss = float(outs["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"adaptation loss is {loss}; state left unchanged")

    def _step_ort_training(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self._module.train()
        self._module.lazy_reset_grad()
        outs = dict(zip(self._outputs, self._module(x)))
        self._check_loss(outs)
        params = self._state.parameters
        if self._ort_optimizer is not None:
            self._ort_optimizer.step()
            for name in self._trainable:
                self._tensors[name] = params[name].data.copy()
            return outs
        for name in self._trainable:
            v = self._velocity[name]
            v *= self.momentum
            v += params[name].grad
            self._tensors[name] = self._tensors[name] - self.lr * v
            params[name].data = self._tensors[name]
        return outs

    def _step_portable(self, x: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input": x, "lr": np.array(self.lr, np.float32),
                 "momentum": np.array(self.momentum, np.float32)}
        feeds.update({n: self._tensors[n] for n in self._trainable})
        feeds.update({f"{n}.velocity": v for n, v in self._velocity.items()})
        outs = dict(zip(self._step_outputs, self._step_session.run(None, feeds)))
        self._check_loss(outs)
        for name in self._trainable:
            self._tensors[name] = outs[f"{name}.new"]
            self._velocity[name] = outs[f"{name}.velocity.new"]
        return outs

    def meta_state(self) -> dict[str, np.ndarray]:
        """Current meta-network parameters and running statistics (copies)."""
        return {n: v.copy() for n, v in self._tensors.items()}

    def _write_params(self) -> None:
        if self.engine != "ort-training":
            return
        params = self._state.parameters
        for name in self._trainable:
            params[name].data = self._tensors[name]

    def reset(self) -> None:
        """Back to the bundle's warmed-up state."""
        self._tensors = {n: v.copy() for n, v in self._initial.items()}
        self._velocity = {n: np.zeros_like(v) for n, v in self._velocity.items()}
        self._write_params()
        self.steps = 0

    def save(self, path: str | os.PathLike) -> None:
        """Persist the adapted state atomically (write a temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"t/{n}": v for n, v in self._tensors.items()}
        arrays.update({f"v/{n}": v for n, v in self._velocity.items()})
        arrays["steps"] = np.asarray(self.steps)
        arrays["bundle"] = np.asarray(self.bundle.fingerprint)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def resume(self, path: str | os.PathLike) -> None:
        """Load state written by ``save`` for this same bundle."""
        with np.load(path, allow_pickle=False) as data:
            if str(data["bundle"]) != self.bundle.fingerprint:
                raise BundleError(f"state {path} was saved for another bundle")
            tensors = {k[2:]: data[k] for k in data.files if k.startswith("t/")}
            velocity = {k[2:]: data[k] for k in data.files if k.startswith("v/")}
            steps = int(data["steps"])
        if set(tensors) != set(self._tensors) or set(velocity) != set(self._velocity):
            raise BundleError(f"state {path} does not match this bundle's meta networks")
        self._tensors, self._velocity, self.steps = tensors, velocity, steps
        self._write_params()
