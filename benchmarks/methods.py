"""The benchmark's methods, one registry entry each: what the reports call a method, its colour
in the plots, what it trains, and how it is built. compare, run_method and report read this
table; a new method is one entry here (and its class in ``benchmarks.tta``).

    from benchmarks import methods
    m = methods.create("tent", ckpt)          # a benchmarks.tta.Method: m.step(x), m.modules()

Importing this module does not import torch: the PyTorch methods are built by factories that
import ``benchmarks.tta`` when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

Checkpoint = Mapping[str, Any]


@dataclass(frozen=True)
class EcoTTASettings:
    """EcoTTA's adaptation settings as a bundle's manifest records them."""
    lr: float = 0.005
    momentum: float = 0.9
    lam: float = 0.5
    e0: float | None = None
    bn_momentum: float = 0.1  # the running statistics' (single-frame prediction's)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "EcoTTASettings":
        return cls(lr=float(manifest["adaptation"]["lr"]), momentum=float(manifest["adaptation"]["momentum"]),
                   lam=float(manifest["ecotta"]["lambda"]), e0=manifest["ecotta"].get("e0"),
                   bn_momentum=float(manifest["adaptation"].get("bn_momentum", 0.1)))


@dataclass(frozen=True)
class BuildOptions:
    """What ``create`` hands a factory: the learning rate override (None: the method's own), the
    EcoTTA settings of the bundle, the seed, and method-specific keywords (CoTTA's)."""
    lr: float | None = None
    ecotta: EcoTTASettings = EcoTTASettings()
    seed: int = 0
    extra: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str               # long name, in tables
    short: str               # short name, in narrow tables and plot ticks
    colour: str              # matplotlib colour, the same in every plot
    trains: str              # what it updates while adapting
    factory: Callable[[Checkpoint, BuildOptions], Any] | None  # None: not a PyTorch method
    device: bool = False     # runs in a torch-free process on the exported bundle
    runnable: bool = True    # False: a variant the memory suite runs under another name's runner
    meta: bool = False       # uses the checkpoint's warmed-up meta networks (a new warm-up changes it)


def _source(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    from edgetta_export.checkpoint import build_backbone
    return tta.Source(build_backbone(ckpt))


def _source_meta(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    return tta.SourceMeta(dict(ckpt))


def _bn_adapt(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    from edgetta_export.checkpoint import build_backbone
    return tta.BNAdapt(build_backbone(ckpt))


def _tent(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    from edgetta_export.checkpoint import build_backbone
    return tta.Tent(build_backbone(ckpt), lr=o.lr or 1e-3)


def _cotta(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    from edgetta_export.checkpoint import build_backbone
    norm = ckpt["normalization"]
    return tta.CoTTA(build_backbone(ckpt), norm["mean"], norm["std"], lr=o.lr or 1e-3, seed=o.seed,
                     **dict(o.extra or {}))


def _ecotta_torch(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    e = o.ecotta
    return tta.EcoTTATorch(dict(ckpt), lr=o.lr or e.lr, momentum=e.momentum, lam=e.lam, e0=e.e0,
                           bn_momentum=e.bn_momentum)


def _ecotta_paper(ckpt: Checkpoint, o: BuildOptions) -> Any:
    from benchmarks import tta
    from edgetta_export.bundle import build_model
    e = o.ecotta
    # a checkpoint warmed up with --paper-variant carries the paper's meta networks; an untrained
    # one (the memory suite's zoo models: no warm-up record) is the same model on source statistics
    if "paper" in (ckpt.get("variants") or {}):
        model = build_model(dict(ckpt), variant="paper")
    elif "warmup" not in ckpt:
        model = build_model({**ckpt, "backbone_norm": "source"})
    else:
        raise ValueError("ecotta_paper needs the paper's meta networks: warm up with --paper-variant")
    return tta.EcoTTATorch(dict(ckpt), lr=o.lr or e.lr, momentum=e.momentum, lam=e.lam, e0=e.e0, model=model,
                           bn_momentum=e.bn_momentum)


_SPECS = (
    MethodSpec("source", "source (no adaptation)", "source", "#7f7f7f", "nothing", _source),
    MethodSpec("source_meta", "source + warmed-up meta nets", "source+meta", "#bcbd22", "nothing", _source_meta, meta=True),
    MethodSpec("bn_adapt", "BN-adapt", "BN-adapt", "#17becf", "nothing (batch statistics)", _bn_adapt),
    MethodSpec("tent", "TENT", "TENT", "#1f77b4", "BN affine (Adam 1e-3)", _tent),
    MethodSpec("cotta", "CoTTA", "CoTTA", "#d62728", "all weights (Adam 1e-3) + EMA teacher", _cotta),
    MethodSpec("ecotta_paper", "EcoTTA, the paper's variant (PyTorch)", "EcoTTA-paper",
               "#8c564b", "meta networks (SGD 0.9)", _ecotta_paper, meta=True),
    MethodSpec("ecotta_torch", "EcoTTA, edgetta's variant (PyTorch)",
               "EcoTTA-torch", "#9467bd", "meta networks (SGD 0.9)", _ecotta_torch, meta=True),
    MethodSpec("edgetta", "edgetta (EcoTTA, edgetta's variant, onnxruntime)", "edgetta", "#2ca02c",
               "meta networks (SGD 0.9)", None, device=True, meta=True),
    MethodSpec("edgetta_generated", "edgetta, onnxruntime-training's graph as generated (no lean rewrite)",
               "edgetta (generated graph)", "#98df8a", "meta networks (SGD 0.9)", None, device=True,
               runnable=False, meta=True),
    MethodSpec("edgetta_arena", "edgetta with memory_arena=True (onnxruntime's arena: faster steps, higher peak)",
               "edgetta (arena)", "#006d2c", "meta networks (SGD 0.9)", None, device=True,
               runnable=False, meta=True),
)
METHODS: dict[str, MethodSpec] = {s.name: s for s in _SPECS}
RUNNABLE = tuple(s.name for s in _SPECS if s.runnable)
TORCH_METHODS = tuple(s.name for s in _SPECS if s.factory is not None)


def spec(name: str) -> MethodSpec:
    """The entry of ``name``; a name outside the registry (a run variant such as ``cotta_aug2``)
    gets its own name as label and black."""
    return METHODS.get(name) or MethodSpec(name, name, name, "k", "", None, runnable=False)


def ordered(names: Any) -> list[str]:
    """``names`` in registry order, unknown names last in their own order."""
    names = list(names)
    return [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]


def create(name: str, ckpt: Checkpoint, *, lr: float | None = None,
           hyper: EcoTTASettings | Mapping[str, Any] | None = None, seed: int = 0, **kwargs: Any) -> Any:
    """Build PyTorch method ``name`` on the checkpoint's model (a ``benchmarks.tta.Method``).
    ``hyper``: EcoTTA's settings of a bundle (``EcoTTASettings``, or a mapping with lr, momentum,
    lambda, e0); ``lr`` overrides a method's learning rate; ``kwargs`` go to CoTTA."""
    s = METHODS.get(name)
    if s is None or s.factory is None:
        raise ValueError(f"unknown method {name!r}; choose one of {TORCH_METHODS}")
    if isinstance(hyper, Mapping):
        d = EcoTTASettings()
        hyper = EcoTTASettings(lr=hyper.get("lr", d.lr), momentum=hyper.get("momentum", d.momentum),
                               lam=hyper.get("lambda", d.lam), e0=hyper.get("e0", d.e0))
    return s.factory(ckpt, BuildOptions(lr=lr, ecotta=hyper or EcoTTASettings(), seed=seed, extra=kwargs))
