"""The bundle contract: what ``manifest.json`` holds, typed and bounded, and the tensor names.

The exporter (host) builds the manifest and writes it through ``write_manifest``, which
validates it with ``Manifest.from_dict`` and writes ``manifest.sha256`` beside it; the device
reads it through ``Manifest.from_json``. Every number the device uses has bounds; every file
path is relative and normalized (``Bundle.open`` also checks that each one resolves inside the
bundle, without symlinks). A bad manifest raises one ``BundleError`` line naming the field.

The manifest's hash guards against edits by mistake or by tools that do not know the format;
there is no option to skip it. Whoever can rewrite both files can still change the bundle:
pin ``Bundle.open(path, expected_sha256=...)`` to a hash obtained out of band against that.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .errors import BundleError
from .system import atomic_write

SUPPORTED_SCHEMA = 1
FORMAT = "edgetta-bundle"
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 36   # 64 GiB: more than any edge device stores for one model

# tensor names shared by the exported graphs and the device
INPUT = "input"
LOGITS = "logits"
LOSS = "loss"
LR = "lr"
MOMENTUM = "momentum"
STAT_PREFIX = "stat."


def velocity(param: str) -> str:
    """Input of the portable step holding ``param``'s momentum buffer."""
    return f"{param}.velocity"


def updated(name: str) -> str:
    """Output of the portable step holding the new value of input ``name``."""
    return f"{name}.new"


def stat_output(batchnorm: str, stat: str) -> str:
    """Output holding a meta BatchNorm's batch ``stat`` ("mean" or "var")."""
    return f"{STAT_PREFIX}{batchnorm}.{stat}"


_MISSING = object()
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Obj:
    """A JSON object being read, with its path in the manifest for error messages."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise BundleError(f"manifest: {where or 'top level'} must be an object, got {_kind(data)}")
        self.data, self.where = data, where

    def get(self, key: str, default: Any) -> Any:
        """The raw value at ``key``; a missing key is ``default``, or an error where there is none."""
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise BundleError(f"manifest: {self._at(key)} is missing")
        return default

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, what: str, value: Any) -> BundleError:
        return BundleError(f"manifest: {self._at(key)} must be {what}, got {_show(value)}")

    def num(self, key: str, lo: float, hi: float, *, lo_open: bool = False, integer: bool = False,
            default: Any = _MISSING) -> Any:
        v = self.get(key, default)
        if v is default and default is not _MISSING:
            return v
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        what = (f"an integer in [{lo}, {hi}]" if integer else
                f"a number in {'(' if lo_open else '['}{lo}, {hi}]")
        if (not ok_type or isinstance(v, bool) or not math.isfinite(v) or v > hi
                or v < lo or (lo_open and v == lo)):
            raise self.fail(key, what, v)
        return int(v) if integer else float(v)

    def text(self, key: str, choices: tuple[str, ...] | None = None, default: Any = _MISSING,
             max_len: int = 4096) -> Any:
        v = self.get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str) or len(v) > max_len or (choices and v not in choices):
            raise self.fail(key, f"one of {list(choices)}" if choices else "a string", v)
        return v

    def obj(self, key: str, optional: bool = False) -> "_Obj | None":
        v = self.get(key, None if optional else _MISSING)
        return None if v is None else _Obj(v, self._at(key))

    def names(self, key: str, *, min_len: int = 0, max_len: int = 1 << 20,
              default: Any = _MISSING, unique: bool = True) -> tuple[str, ...]:
        v = self.get(key, default)
        if not isinstance(v, list) or not min_len <= len(v) <= max_len or not all(
                isinstance(s, str) and 0 < len(s) <= 4096 for s in v):
            raise self.fail(key, f"a list of {min_len} or more non-empty strings", v)
        if unique and len(set(v)) != len(v):
            raise self.fail(key, "a list without duplicates", v)
        return tuple(v)

    def floats(self, key: str, n: int, lo: float, hi: float, lo_open: bool = False) -> tuple[float, ...]:
        v = self.get(key, _MISSING)
        if not isinstance(v, list) or len(v) != n:
            raise self.fail(key, f"a list of {n} numbers", v)
        item = _Obj({str(i): x for i, x in enumerate(v)}, self._at(key))
        return tuple(item.num(str(i), lo, hi, lo_open=lo_open) for i in range(n))

    def info(self, key: str) -> dict[str, Any]:
        """A free-form object kept for people (the device reads nothing in it)."""
        v = self.get(key, {})
        return dict(_Obj({} if v is None else v, self._at(key)).data)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else _kind(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_relative_path(name: Any, where: str) -> str:
    """A file name from the manifest: relative, normalized POSIX path, no ``..``."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise BundleError(f"manifest: {where} must be a file name, got {_show(name)}")
    p = PurePosixPath(name)
    if (p.is_absolute() or "\\" in name or ":" in name or str(p) != name
            or any(part in ("..", ".") for part in p.parts) or "\x00" in name):
        raise BundleError(f"manifest: {where} {_show(name)} is not a plain relative path "
                          "inside the bundle")
    return name


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, int, int]          # C, H, W of one preprocessed frame
    resize: tuple[int, int]              # H, W frames are resized to
    color_order: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    frame_layout: str = "HWC"
    dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        """The form ``edgetta.preprocess.preprocess`` reads."""
        return {"name": self.name, "shape": list(self.shape), "resize": list(self.resize),
                "color_order": self.color_order, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "layout": self.layout, "frame_layout": self.frame_layout,
                "dtype": self.dtype}


@dataclass(frozen=True)
class Adaptation:
    lr: float
    momentum: float
    batch_size: int
    bn_momentum: float
    optimizer: str = "sgd"


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingGraphSpec:
    file: str
    checkpoint: str
    optimizer: str | None
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Graphs:
    inference: GraphSpec
    training: TrainingGraphSpec
    portable_step: GraphSpec | None
    facts: str | None = None   # static-profile facts of every graph (edgetta.profile), JSON

    def files(self) -> list[tuple[str, str]]:
        """(where, file) of every file a graph entry names."""
        out = [("graphs.inference.file", self.inference.file),
               ("graphs.training.file", self.training.file),
               ("graphs.training.checkpoint", self.training.checkpoint)]
        if self.training.optimizer:
            out.append(("graphs.training.optimizer", self.training.optimizer))
        if self.portable_step:
            out.append(("graphs.portable_step.file", self.portable_step.file))
        if self.facts:
            out.append(("graphs.facts", self.facts))
        return out


@dataclass(frozen=True)
class ExportProfile:
    """Memory of one adaptation step measured at export (on the exporting machine)."""
    batch: int
    adaptation_peak_mib: float
    adaptation_step_growth_mib: float
    adaptation_static_mib: float
    step_ms: float
    machine: str = ""
    engine: str = ""


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    input: InputSpec
    class_names: tuple[str, ...]
    adaptation: Adaptation
    graphs: Graphs
    trainable: tuple[str, ...]
    meta_running_stats: tuple[str, ...]  # the meta BatchNorms' (frozen entries of the checkpoint)
    running_stats: dict[str, str]        # batch-statistic output -> running-statistic tensor
    files: dict[str, FileEntry]
    meta_init: str = "meta_init.npz"
    architecture: str = ""
    profile: ExportProfile | None = None
    # a batch-statistics backbone's BatchNorms (ecotta.backbone_norm "batch"): inputs of the
    # inference graph only, since the training graph normalizes with the batch's statistics
    backbone_running_stats: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, repr=False)  # for people, not read

    @property
    def kept_running_stats(self) -> tuple[str, ...]:
        """Every running statistic the device keeps from the adaptation batches."""
        return self.meta_running_stats + self.backbone_running_stats

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not a JSON number")
        try:
            data = json.loads(text, parse_constant=no_constants)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BundleError(f"manifest.json is not valid JSON: {msg[:200]}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        top = _Obj(data, "")
        schema = top.get("schema_version", None)
        if schema != SUPPORTED_SCHEMA or isinstance(schema, bool):
            raise BundleError(f"manifest schema {_show(schema)} is not supported (this edgetta reads "
                              f"schema {SUPPORTED_SCHEMA}): export the bundle again with this version")
        top.text("format", (FORMAT,))
        files = _files(top.obj("files"))
        inp = _input(top.obj("input"))
        classes = top.names("class_names", min_len=1, max_len=100_000, unique=False)
        ad = top.obj("adaptation")
        adaptation = Adaptation(
            lr=ad.num("lr", 0.0, 1.0, lo_open=True), momentum=ad.num("momentum", 0.0, 0.999),
            batch_size=ad.num("batch_size", 1, 4096, integer=True),
            bn_momentum=ad.num("bn_momentum", 0.0, 1.0), optimizer=ad.text("optimizer", ("sgd",)))
        graphs = _graphs(top.obj("graphs"))
        trainable = top.names("trainable", min_len=1)
        frozen = top.obj("frozen")
        meta_stats = frozen.names("meta_running_stats")
        backbone_stats = frozen.names("backbone_running_stats", default=[])
        stats = meta_stats + backbone_stats
        rs = top.obj("running_stats")
        running = {}
        for out, stat in rs.data.items():
            if not isinstance(out, str) or not out.startswith(STAT_PREFIX) or stat not in stats:
                raise rs.fail(str(out), "a running statistic listed in frozen.meta_running_stats or "
                              "frozen.backbone_running_stats", stat)
            running[out] = stat
        if len(set(running.values())) != len(running) or set(running.values()) != set(stats) \
                or len(set(stats)) != len(stats):
            raise BundleError("manifest: running_stats must map one batch statistic to each of "
                              "frozen.meta_running_stats and frozen.backbone_running_stats")
        meta_init = check_relative_path(top.get("meta_init", "meta_init.npz"), "meta_init")
        named = graphs.files() + [("meta_init", meta_init)]
        for where, name in named:
            if name not in files:
                raise BundleError(f"manifest: {where} {_show(name)} is not a listed, hashed file")
        model = top.obj("model", optional=True)
        arch = model.text("architecture", default="") if model else ""
        prof = top.obj("profile", optional=True)
        profile = None if prof is None else ExportProfile(
            batch=prof.num("batch", 1, 4096, integer=True),
            adaptation_peak_mib=prof.num("adaptation_peak_mib", 0.0, 1e7, lo_open=True),
            adaptation_step_growth_mib=prof.num("adaptation_step_growth_mib", -1e7, 1e7),
            adaptation_static_mib=prof.num("adaptation_static_mib", 0.0, 1e7),
            step_ms=prof.num("step_ms", 0.0, 1e9), machine=prof.text("machine", default=""),
            engine=prof.text("engine", default=""))
        info = {k: v for k, v in data.items() if k not in _TYPED}
        return cls(schema_version=schema, input=inp, class_names=classes, adaptation=adaptation,
                   graphs=graphs, trainable=trainable, meta_running_stats=meta_stats,
                   backbone_running_stats=backbone_stats,
                   running_stats=running, files=files, meta_init=meta_init, architecture=arch,
                   profile=profile, info=info)


_TYPED = {"schema_version", "format", "files", "input", "class_names", "adaptation", "graphs",
          "trainable", "frozen", "running_stats", "meta_init", "profile"}


def _files(obj: _Obj) -> dict[str, FileEntry]:
    if not obj.data:
        raise BundleError("manifest: files lists no file")
    out = {}
    for name, meta in obj.data.items():
        check_relative_path(name, "files")
        if name in (MANIFEST, MANIFEST_HASH):
            raise BundleError(f"manifest: files must not list {name}")
        entry = _Obj(meta, f"files[{_show(name)}]")
        sha = entry.text("sha256")
        if not _SHA256.match(sha):
            raise entry.fail("sha256", "64 lowercase hex digits", sha)
        out[name] = FileEntry(sha, entry.num("bytes", 0, MAX_FILE_BYTES, integer=True))
    return out


def _input(obj: _Obj) -> InputSpec:
    shape = obj.data.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3 or shape[0] != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 8192 for s in shape)):
        raise obj.fail("shape", "[3, H, W] with H and W in 1..8192", shape)
    resize = obj.data.get("resize")
    if resize != shape[1:]:
        raise obj.fail("resize", f"the input's [H, W] {shape[1:]}", resize)
    return InputSpec(
        name=obj.text("name", (INPUT,)), shape=(shape[0], shape[1], shape[2]), resize=(shape[1], shape[2]),
        color_order=obj.text("color_order", ("RGB", "BGR"), default="RGB"),
        scale=obj.num("scale", 0.0, 1.0, lo_open=True, default=1.0 / 255.0),
        mean=obj.floats("mean", 3, -1e3, 1e3), std=obj.floats("std", 3, 0.0, 1e3, lo_open=True),
        layout=obj.text("layout", ("NCHW",), default="NCHW"),
        frame_layout=obj.text("frame_layout", ("HWC",), default="HWC"),
        dtype=obj.text("dtype", ("float32",), default="float32"))


def _graphs(obj: _Obj) -> Graphs:
    def spec(o: _Obj) -> GraphSpec:
        return GraphSpec(check_relative_path(o.text("file"), f"{o.where}.file"),
                         o.names("inputs", default=[]), o.names("outputs", default=[]))
    inf = spec(obj.obj("inference"))
    tr = obj.obj("training")
    opt = tr.get("optimizer", None)
    training = TrainingGraphSpec(
        check_relative_path(tr.text("file"), "graphs.training.file"),
        check_relative_path(tr.text("checkpoint"), "graphs.training.checkpoint"),
        None if opt is None else check_relative_path(opt, "graphs.training.optimizer"),
        tr.names("outputs", default=[]))
    ps = obj.obj("portable_step", optional=True)
    facts = obj.get("facts", None)
    return Graphs(inf, training, None if ps is None else spec(ps),
                  None if facts is None else check_relative_path(facts, "graphs.facts"))


def manifest_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(bundle_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Manifest:
    """Validate ``manifest`` and write it with its hash file (export's only way to write one)."""
    text = json.dumps(manifest, indent=2, allow_nan=False).encode()
    typed = Manifest.from_json(text)
    root = Path(bundle_dir)
    with atomic_write(root / MANIFEST) as f:
        f.write(text)
    with atomic_write(root / MANIFEST_HASH, "w") as f:
        f.write(f"{manifest_hash(text)}  {MANIFEST}\n")
    return typed


def read_manifest_hash(path: Path) -> str:
    """The hash recorded in ``manifest.sha256`` (``sha256sum`` format)."""
    try:
        if path.is_symlink() or path.stat().st_size > 1024:
            raise BundleError(f"{path} is not a manifest hash file")
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise BundleError(f"{path.parent}: {MANIFEST_HASH} is missing: the bundle's manifest is not "
                          "protected; export it again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot read the manifest hash ({e})") from None
    parts = text.split()
    if len(parts) != 2 or parts[1] != MANIFEST or not _SHA256.match(parts[0]):
        raise BundleError(f"{path}: expected '<sha256>  {MANIFEST}'")
    return parts[0]
