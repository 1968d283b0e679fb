"""What runs one adaptation step: one small interface, two implementations.

- ``ort-training``: onnxruntime-training's on-device Module on the bundle's training graph
  (loss and gradients of the meta networks); SGD with momentum is applied here, since
  onnxruntime-training's SGD has none (with momentum 0 the bundle's own optimizer graph runs).
  Wheels exist only for x86-64 Linux/Windows and macOS, Python <= 3.12.
- ``onnx``: the bundle's portable step graph (forward, backward and the SGD update in standard
  ONNX ops) on plain onnxruntime, which has wheels for aarch64 and Python 3.13 too.

``select_engine("auto", ...)`` takes onnxruntime-training where its API imports and the portable
step otherwise. Both engines keep the trainable meta parameters and their velocity; running
statistics of the meta BatchNorms are the caller's (``Adapter``).

``frozen_weights`` reads the frozen weights that the inference graph and an engine's graph hold
alike, once, for ``SessionOptions.add_initializer``: both sessions then read that one copy
(``weight_sharing`` says where that saves memory; docs/memory.md has the measurements).
"""
from __future__ import annotations

import functools
import mmap
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol

import numpy as np

from . import manifest as names
from .ort import has_training_api, onnxruntime, training_api
from .bundle import Bundle
from .errors import BundleError, EngineUnavailable

ENGINES = ("ort-training", "onnx")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class StepResult:
    """What one adaptation step computed on a batch, before its update was applied."""
    loss: float
    logits: np.ndarray
    batch_stats: dict[str, np.ndarray]  # the meta BatchNorms' batch statistics, by output name


class Engine(Protocol):
    """Runs adaptation steps on a batch and owns the trainable parameters and their velocity."""
    name: str
    provider: str
    shared: SharedWeights | None  # frozen weights its session reads in place, if any

    def step(self, x: np.ndarray) -> StepResult:
        """Loss, logits and batch statistics of ``x``; then one SGD-with-momentum update.
        Raises FloatingPointError, with the parameters left unchanged, on a non-finite loss."""

    def params(self) -> dict[str, np.ndarray]:
        """Current trainable parameters (copies)."""

    def velocity(self) -> dict[str, np.ndarray]:
        """Current momentum buffers (copies)."""

    def set_params(self, params: Mapping[str, np.ndarray], velocity: Mapping[str, np.ndarray]) -> None:
        """Replace the trainable parameters and momentum buffers."""


def session_options(memory_arena: bool = False, prepacking: bool = False,
                    threads: int | None = None, blocked_layout: bool = True) -> Any:
    """onnxruntime session settings for adaptation (the defaults are edgetta's; why each one is
    chosen is in docs/memory.md). ``blocked_layout=False`` stops onnxruntime's x86-64 NCHWc
    layout (graph optimization level "extended" instead of "all")."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if not blocked_layout:
        # the NCHWc layout reads every convolution's weights from a reordered copy that each
        # session makes for itself, so shared weights would be held once more, not once
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # priority-based order runs each gradient node as soon as it can, freeing forward tensors
    # earlier than the default order
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # without an arena every tensor of a step is a fresh allocation (mmap'd and page-faulted
    # in, docs/speed.md) and what a step frees goes back to the OS; with one, the steps reuse
    # memory: faster, a higher peak. Off unless asked for; when asked, one arena for the process
    # (the inference session and the engine share it) that grows by what is requested, not in
    # powers of two (shared_cpu_arena)
    opts.enable_cpu_mem_arena = memory_arena
    if memory_arena:
        shared_cpu_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    # memory patterns preallocate one block per planned layout: a higher peak, no faster
    opts.enable_mem_pattern = False
    if not prepacking:
        # a frozen conv's weights are read by the forward Conv and the backward ConvTranspose,
        # which would pre-pack its own transposed copy; unpacked it reads the shared one
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


@functools.cache  # registered once per process
def shared_cpu_arena() -> None:
    """Register, once per process, onnxruntime's CPU arena that sessions created with
    ``session.use_env_allocators`` share, extended by exactly what is requested
    (``kSameAsRequested``): on WRN-16-2 its peak is lower than a per-session arena's, which
    grows in powers of two (docs/speed.md)."""
    ort = onnxruntime()
    same_as_requested = 1
    # a request takes a free chunk whole, unsplit, when what it leaves unused is under this many
    # bytes (128 MiB by default): a step's chunks then carry dead space and the arena grows by
    # it. 16 KiB splits nearly every chunk, at the same speed (measured: docs/speed.md); 0
    # crashes onnxruntime 1.19.2
    max_dead_bytes_per_chunk = 16 << 10
    cfg = ort.OrtArenaCfg(0, same_as_requested, -1, max_dead_bytes_per_chunk)  # no limit; default first chunk
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, cfg)


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def training_wheel_exists(system: str | None = None, machine: str | None = None,
                          python: tuple[int, int] | None = None) -> bool:
    """Whether onnxruntime-training 1.19.2 publishes a wheel for a platform (default: this one):
    x86-64 Linux and Windows, macOS (universal2), CPython 3.8-3.12. pyproject.toml's environment
    markers say the same (tests/test_platforms.py checks both agree)."""
    system = sys.platform if system is None else system
    machine = platform.machine() if machine is None else machine
    python = sys.version_info[:2] if python is None else python
    if python >= (3, 13):
        return False
    return system == "darwin" or (system, machine) in (("linux", "x86_64"), ("win32", "AMD64"))


def training_fix() -> str:
    """How to get onnxruntime-training here, or what to use instead where it has no wheel."""
    if training_wheel_exists():
        return ("install it in place of plain onnxruntime: pip uninstall -y onnxruntime && "
                "pip install onnxruntime-training-cpu==1.19.2; or use --engine onnx")
    return (f"onnxruntime-training publishes no wheel for {platform.machine()} / Python "
            f"{sys.version_info.major}.{sys.version_info.minor}; use --engine onnx (or auto)")


def cuda_fix(engine: str) -> str:
    """How to get a CUDA-enabled onnxruntime for ``engine`` on this machine."""
    if engine == "ort-training":
        if _is_x86() and sys.platform == "linux" and sys.version_info < (3, 13):
            return ("replace the CPU build with the CUDA build: pip uninstall -y "
                    "onnxruntime-training-cpu && pip install --no-deps onnxruntime-training==1.19.2 "
                    "(docs/devices.md)")
        return (f"onnxruntime-training has no CUDA build for {platform.machine()}; use --engine "
                "onnx with a CUDA build of onnxruntime, or --provider cpu")
    if platform.machine().lower() == "aarch64":
        return ("install NVIDIA's onnxruntime-gpu wheel for your JetPack in place of onnxruntime "
                "(docs/devices.md: Jetson), or use --provider cpu")
    return ("pip uninstall -y onnxruntime onnxruntime-training-cpu && pip install onnxruntime-gpu "
            "(portable engine), or use --provider cpu")


def resolve_provider(provider: str, engine: str) -> str:
    """``auto`` is CUDA where this onnxruntime has it, else CPU; ``cuda`` must be available."""
    if provider not in (*PROVIDERS, "auto"):
        raise ValueError(f"provider must be one of {sorted(PROVIDERS) + ['auto']}, got {provider!r}")
    available = onnxruntime().get_available_providers()
    if provider == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if PROVIDERS[provider] not in available:
        fix = cuda_fix(engine) if provider == "cuda" else "reinstall onnxruntime"
        raise EngineUnavailable(f"the installed onnxruntime has no {PROVIDERS[provider]} "
                                f"(it has {', '.join(available)}): {fix}")
    return provider


def choose_engine(engine: str, bundle: Bundle) -> str:
    """The engine name ``engine`` ("auto", "ort-training" or "onnx") stands for here."""
    if engine not in (*ENGINES, "auto"):
        raise ValueError(f"engine must be one of {ENGINES + ('auto',)}, got {engine!r}")
    has_portable = bundle.manifest.graphs.portable_step is not None
    if engine == "auto":
        if has_training_api():
            return "ort-training"
        if not has_portable:
            raise EngineUnavailable(f"{bundle.path} has no portable step graph and this onnxruntime has "
                                    f"no training API: export the bundle again (it adds one), or "
                                    f"{training_fix()}")
        return "onnx"
    if engine == "ort-training" and not has_training_api():
        raise EngineUnavailable(f"engine ort-training needs onnxruntime-training: {training_fix()}")
    if engine == "onnx" and not has_portable:
        raise BundleError(f"{bundle.path} has no portable step graph; export it again")
    return engine


def has_blocked_layout() -> bool:
    """Whether onnxruntime runs convolutions here in its NCHWc layout (x86-64 only), on a
    reordered copy of their weights per session."""
    return _is_x86()


def weight_sharing(requested: bool | None, provider: str) -> bool:
    """Whether an adapter holds the frozen weights once for both of its sessions. ``None``
    (auto): on the CPU where onnxruntime has no NCHWc layout (ARM, for one), where it saves a
    copy without changing a kernel. ``True`` elsewhere on the CPU too: on x86-64 the sessions
    then run without the NCHWc layout, less memory for slower steps (docs/memory.md)."""
    if requested is None:
        return provider == "cpu" and not has_blocked_layout()
    if requested and provider != "cpu":
        raise ValueError(f"shared weights are for the CPU provider; {provider} sessions hold "
                         "their weights in device memory")
    return bool(requested)


@dataclass(frozen=True, eq=False)
class SharedWeights:
    """Frozen weights held once for several sessions. ``add_to`` hands them to a session's
    options; onnxruntime then reads these very arrays instead of loading its own copy, so they
    must outlive every session made with those options: each holder keeps a reference."""
    arrays: Mapping[str, np.ndarray]
    _values: tuple[Any, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> "SharedWeights":
        ort = onnxruntime()
        for a in arrays.values():
            a.flags.writeable = False  # the sessions read them: nothing may change them
        return cls(dict(arrays), tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def add_to(self, opts: Any) -> None:
        for name, value in zip(self.arrays, self._values):
            opts.add_initializer(name, value)


def frozen_weights(bundle: Bundle, engine: str) -> SharedWeights:
    """The float32 initializers that the inference graph and ``engine``'s graph both hold,
    stored byte for byte alike (the frozen backbone; graph inputs are left out), decoded once
    from the inference graph. Read with a small protobuf reader: the device has no onnx package."""
    g = bundle.manifest.graphs
    other = g.training.file if engine == "ort-training" else g.portable_step.file if g.portable_step else None
    if other is None:
        raise BundleError(f"{bundle.path}: no graph for engine {engine}")
    try:
        with _OnnxFile(bundle.file(g.inference.file)) as inf, _OnnxFile(bundle.file(other)) as step:
            overridable = inf.inputs | step.inputs
            arrays = {}
            for name, span in inf.initializers.items():
                if name in overridable or step.initializers.get(name) is None:
                    continue
                if inf.raw(span) == step.raw(step.initializers[name]):
                    value = inf.decode(span)
                    if value is not None:
                        arrays[name] = value
    except (ValueError, IndexError, KeyError, StopIteration) as e:
        raise BundleError(f"{bundle.path}: cannot read the frozen weights: {e}") from None
    return SharedWeights.of(arrays)


# ONNX protobuf field numbers (onnx.proto) of what frozen_weights reads
_MODEL_GRAPH, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_SPARSE = 7, 5, 11, 15
_T_DIMS, _T_TYPE, _T_FLOATS, _T_INT64S, _T_NAME, _T_RAW, _T_EXTERNAL = 1, 2, 4, 7, 8, 9, 14
_SPARSE_VALUES, _SPARSE_INDICES, _SPARSE_DIMS = 1, 2, 3
_FLOAT32, _INT64 = 1, 7


class _OnnxFile:
    """An ONNX model file mapped read-only: where each initializer's message lies, the graph's
    input names, and decoding of float32 tensors (dense or sparse)."""

    def __init__(self, path: Any):
        self._file = open(path, "rb")
        self._buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.initializers: dict[str, tuple[bool, int, int]] = {}  # name: (sparse, start, end)
        self.inputs: set[str] = set()
        graph = next((v for f, _, v in self._fields(0, len(self._buf)) if f == _MODEL_GRAPH), None)
        if graph is None:
            raise ValueError(f"{path} holds no graph")
        for f, _, (start, end) in ((f, w, v) for f, w, v in self._fields(*graph) if w == 2):
            if f == _GRAPH_INPUT:
                self.inputs.add(self._name(start, end, 1))
            elif f == _GRAPH_INITIALIZER:
                self.initializers[self._name(start, end, _T_NAME)] = (False, start, end)
            elif f == _GRAPH_SPARSE:
                values = next(v for g, w, v in self._fields(start, end) if g == _SPARSE_VALUES)
                self.initializers[self._name(*values, _T_NAME)] = (True, start, end)

    def __enter__(self) -> "_OnnxFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._buf.close()
        self._file.close()

    def raw(self, span: tuple[bool, int, int]) -> bytes:
        return self._buf[span[1]:span[2]]

    def decode(self, span: tuple[bool, int, int]) -> np.ndarray | None:
        """The tensor as a dense float32 array; None for another type or external data."""
        sparse, start, end = span
        if not sparse:
            return self._tensor(start, end, _FLOAT32)
        parts = {f: v for f, w, v in self._fields(start, end) if w == 2}
        dims = self._ints(_SPARSE_DIMS, start, end)
        values = self._tensor(*parts[_SPARSE_VALUES], _FLOAT32)
        indices = self._tensor(*parts[_SPARSE_INDICES], _INT64)
        if values is None or indices is None:
            return None
        dense = np.zeros(int(np.prod(dims)), np.float32)
        flat = np.ravel_multi_index(tuple(indices.reshape(len(values.ravel()), -1).T), dims) \
            if indices.ndim == 2 else indices
        dense[flat] = values.ravel()
        return dense.reshape(dims)

    def _tensor(self, start: int, end: int, dtype: int) -> np.ndarray | None:
        fields = list(self._fields(start, end))
        if any(f == _T_EXTERNAL and v == 1 for f, w, v in fields) or \
                next((v for f, w, v in fields if f == _T_TYPE), 0) != dtype:
            return None
        kind = np.dtype("<f4" if dtype == _FLOAT32 else "<i8")  # ONNX stores little-endian
        dims = self._ints(_T_DIMS, start, end)
        data = next((v for f, w, v in fields if f == _T_RAW), None)
        if data is None and dtype == _FLOAT32:
            data = next((v for f, w, v in fields if f == _T_FLOATS and w == 2), None)
        if data is not None:
            count = (data[1] - data[0]) // kind.itemsize
            array = np.frombuffer(self._buf, kind, count, data[0]).copy()
        elif dtype == _INT64:
            array = np.array(self._ints(_T_INT64S, start, end), np.int64)
        else:
            array = np.zeros(0, kind)
        if array.size != int(np.prod(dims)):
            raise ValueError(f"tensor of {array.size} values for shape {dims}")
        return array.reshape(dims)

    def _name(self, start: int, end: int, field_number: int) -> str:
        s, e = next(v for f, w, v in self._fields(start, end) if f == field_number and w == 2)
        return self._buf[s:e].decode()

    def _ints(self, field_number: int, start: int, end: int) -> list[int]:
        """A repeated integer field, packed or not."""
        out: list[int] = []
        for f, w, v in self._fields(start, end):
            if f != field_number:
                continue
            if w == 0:
                out.append(v)
                continue
            i = v[0]
            while i < v[1]:
                n, i = self._varint(i)
                out.append(n)
        return out

    def _varint(self, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = self._buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    def _fields(self, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
        """(field number, wire type, value): an int for varints, (start, end) for the bytes of
        a length-delimited field, None for fixed-size ones."""
        i = start
        while i < end:
            key, i = self._varint(i)
            wire = key & 7
            if wire == 0:
                value, i = self._varint(i)
                yield key >> 3, wire, value
            elif wire == 2:
                n, i = self._varint(i)
                yield key >> 3, wire, (i, i + n)
                i += n
            elif wire in (1, 5):
                yield key >> 3, wire, None
                i += 8 if wire == 1 else 4
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")
        if i != end:
            raise ValueError("truncated protobuf message")


class _Parameters:
    """The trainable parameters and momentum buffers an engine keeps between steps."""
    _trainable: list[str]
    _params: dict[str, np.ndarray]
    _velocity: dict[str, np.ndarray]

    def params(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._params.items()}

    def velocity(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._velocity.items()}

    def set_params(self, params: Mapping[str, np.ndarray], velocity: Mapping[str, np.ndarray]) -> None:
        self._params = {n: np.array(params[n], np.float32) for n in self._trainable}
        self._velocity = {n: np.array(velocity[n], np.float32) for n in self._trainable}


class OrtTrainingEngine(_Parameters):
    """onnxruntime-training's Module computes loss and gradients; the update is applied here."""
    name = "ort-training"

    def __init__(self, bundle: Bundle, opts: Any, provider: str, lr: float, momentum: float,
                 shared: SharedWeights | None = None):
        api = training_api()
        m = bundle.manifest
        self.provider, self.lr, self.momentum = provider, lr, momentum
        self.shared = shared  # read in place by the session: kept as long as the engine
        self._trainable = list(m.trainable)
        self._state = api.CheckpointState.load_checkpoint(str(bundle.file(m.graphs.training.checkpoint)))
        self._module = api.Module(str(bundle.file(m.graphs.training.file)), self._state,
                                  device=provider, session_options=opts)
        self._outputs = list(self._module.output_names())
        self._optimizer = None
        if momentum == 0.0 and m.graphs.training.optimizer:
            # plain SGD: the bundle's own onnxruntime-training optimizer graph does the update
            self._optimizer = api.Optimizer(str(bundle.file(m.graphs.training.optimizer)), self._module)
            self._optimizer.set_learning_rate(lr)
        self._params = {n: self._state.parameters[n].data.copy() for n in self._trainable}
        self._velocity = {n: np.zeros_like(v) for n, v in self._params.items()}

    @property
    def uses_optimizer_graph(self) -> bool:
        """True when the bundle's onnxruntime-training optimizer graph applies the update
        (plain SGD, momentum 0)."""
        return self._optimizer is not None

    @property
    def checkpoint_state(self) -> Any:
        """onnxruntime-training's CheckpointState (its frozen entries must never change)."""
        return self._state

    def loss_of(self, x: np.ndarray) -> float:
        """The loss of ``x`` at the current parameters, without an update."""
        self._module.train()
        self._module.lazy_reset_grad()
        return float(self._module(x)[0])

    def step(self, x: np.ndarray) -> StepResult:
        self._module.train()
        self._module.lazy_reset_grad()
        outs = dict(zip(self._outputs, self._module(x)))
        result = _result(outs)
        params = self._state.parameters
        if self._optimizer is not None:
            self._optimizer.step()
            for name in self._trainable:
                self._params[name] = params[name].data.copy()
            return result
        for name in self._trainable:
            v = self._velocity[name]
            v *= self.momentum
            v += params[name].grad
            self._params[name] = self._params[name] - self.lr * v
            params[name].data = self._params[name]
        return result

    def set_params(self, params: Mapping[str, np.ndarray], velocity: Mapping[str, np.ndarray]) -> None:
        super().set_params(params, velocity)
        for name in self._trainable:
            self._state.parameters[name].data = self._params[name]


class PortableEngine(_Parameters):
    """The bundle's portable step graph: forward, backward and update in one onnxruntime run."""
    name = "onnx"

    def __init__(self, bundle: Bundle, opts: Any, provider: str, lr: float, momentum: float,
                 shared: SharedWeights | None = None):
        m = bundle.manifest
        self.provider = provider
        self.shared = shared  # read in place by the session: kept as long as the engine
        self._trainable = list(m.trainable)
        step = m.graphs.portable_step
        assert step is not None  # choose_engine checked it
        self._session = onnxruntime().InferenceSession(
            str(bundle.file(step.file)), opts, providers=_providers(provider))
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._hyper = {names.LR: np.array(lr, np.float32), names.MOMENTUM: np.array(momentum, np.float32)}
        init = bundle.initial_meta_state()
        self._params = {n: init[n] for n in self._trainable}
        self._velocity = {n: np.zeros_like(v) for n, v in self._params.items()}

    def step(self, x: np.ndarray) -> StepResult:
        feeds = {names.INPUT: x, **self._hyper, **self._params}
        feeds.update({names.velocity(n): v for n, v in self._velocity.items()})
        outs = dict(zip(self._outputs, self._session.run(None, feeds)))
        result = _result(outs)
        for name in self._trainable:
            self._params[name] = outs[names.updated(name)]
            self._velocity[name] = outs[names.updated(names.velocity(name))]
        return result



def _providers(provider: str) -> list[str]:
    # CUDA sessions fall back to the CPU for any node the CUDA provider has no kernel for
    return [PROVIDERS[provider]] + ([PROVIDERS["cpu"]] if provider != "cpu" else [])


def _result(outs: dict[str, np.ndarray]) -> StepResult:
    loss = float(outs[names.LOSS])
    if not np.isfinite(loss):
        raise FloatingPointError(f"adaptation loss is {loss}; state left unchanged")
    stats = {k: v for k, v in outs.items() if k.startswith(names.STAT_PREFIX)}
    return StepResult(loss, outs[names.LOGITS], stats)


def select_engine(engine: str, bundle: Bundle, provider: str = "cpu", lr: float | None = None,
                  momentum: float | None = None, opts: Any = None,
                  shared: SharedWeights | None = None) -> Engine:
    """Load the engine ``engine`` ("auto", "ort-training" or "onnx") stands for, on
    ``provider`` ("cpu", "cuda" or "auto"). ``shared``: weights already added to ``opts``
    (``SharedWeights.add_to``), which the engine keeps alive."""
    name = choose_engine(engine, bundle)
    provider = resolve_provider(provider, name)
    hyper = bundle.manifest.adaptation
    lr = hyper.lr if lr is None else float(lr)
    momentum = hyper.momentum if momentum is None else float(momentum)
    opts = session_options() if opts is None else opts
    cls = OrtTrainingEngine if name == "ort-training" else PortableEngine
    try:
        return cls(bundle, opts, provider, lr, momentum, shared)
    except (BundleError, EngineUnavailable):
        raise
    except Exception as e:  # onnxruntime raises its own types; say which bundle failed
        raise BundleError(f"{bundle.path}: onnxruntime could not load the {name} engine: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def inference_session(bundle: Bundle, opts: Any, provider: str) -> Any:
    """The bundle's inference graph on ``provider``."""
    try:
        return onnxruntime().InferenceSession(str(bundle.file(bundle.manifest.graphs.inference.file)),
                                              opts, providers=_providers(provider))
    except Exception as e:
        raise BundleError(f"{bundle.path}: onnxruntime could not load the inference graph: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
