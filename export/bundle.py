"""Export a warmed-up EcoTTA model to a device bundle.

The bundle is a folder that the device side (``edgetta``, no torch) loads:

- ``inference.onnx``: backbone + meta networks, meta BatchNorms on running statistics; every
  meta tensor is an overridable input (its initializer is the warmed-up default), so the
  device feeds the adapted values without rewriting the graph.
- ``training_model.onnx``, ``optimizer_model.onnx``, ``checkpoint``: onnxruntime-training
  artifacts. Only meta-network parameters are trainable; backbone weights are constants of
  the graph and meta running statistics are frozen checkpoint entries.
- ``manifest.json``: what the device needs to preprocess, adapt and verify the files.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from torch import nn

from . import checkpoint as ckpt_io
from edgetta import manifest as contract
from edgetta.bundle import sha256_file

from .ecotta import EcoTTAModel, loss_from_features, replace_batchnorms
from .lean import LeanOptions, make_lean, separate_backward_buffers
from .portable import make_portable
from .models import Backbone
from .errors import ExportError, training_graph_refusal
from .partition import part_ends
from .pruning import sparsity_report, total_density

SCHEMA_VERSION = contract.SUPPORTED_SCHEMA
OPSET = 17
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "wrn16_2_erk80_k4.pt"


class FrozenAffine(nn.Module):
    """An eval-mode BatchNorm as a per-channel affine map.

    Exported as Mul/Add with constants, it stays frozen and keeps its source statistics in
    the training graph (a BatchNormalization node would be switched to batch statistics by
    onnxruntime-training's graph transforms).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        inv = torch.rsqrt(bn.running_var + bn.eps)
        w = bn.weight if bn.affine else torch.ones_like(inv)
        b = bn.bias if bn.affine else torch.zeros_like(inv)
        self.register_buffer("scale", (w * inv).detach().clone().view(1, -1, 1, 1))
        self.register_buffer("shift", (b - bn.running_mean * w * inv).detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def fold_batchnorms_into_convs(model: nn.Module, prefix: str = "backbone.") -> list[tuple[str, str]]:
    """Fold each eval-mode BatchNorm under ``prefix`` whose input is a convolution's only use
    into that convolution (weights scaled per output channel, shift as bias), in place; returns
    the (conv, BatchNorm) pairs. Found by tracing ``model`` with torch.fx, so a conv output that
    anything else reads (a meta network, a shortcut) is left alone.

    Exported unfolded, the BatchNorm is a Mul/Add after the conv: where onnxruntime has no NCHWc
    layout (ARM) it fuses the Mul into a second copy of the conv's weights for the forward pass
    while the backward ConvTranspose reads the original. A model torch.fx cannot trace is
    exported unfolded, with a warning."""
    from torch import fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(model.named_modules())
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # data-dependent control flow and the like
        warnings.warn(f"BatchNorms not folded into convolutions: torch.fx cannot trace the model ({e})")
        return []
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[src.target], nn.Conv2d) and src.target.startswith(prefix)
                and node.target.startswith(prefix)):
            pairs.append((src.target, node.target))
    for conv_name, bn_name in pairs:
        fused = fuse_conv_bn_eval(modules[conv_name].eval(), modules[bn_name].eval()).requires_grad_(False)
        for name, new in ((conv_name, fused), (bn_name, nn.Identity())):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return pairs


def freeze_batchnorms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by its FrozenAffine, in place."""
    return replace_batchnorms(module, FrozenAffine)


def meta_batchnorms(model: EcoTTAModel) -> dict[str, nn.BatchNorm2d]:
    return {f"metas.{i}.{n}": bn for i, m in enumerate(model.metas) for n, bn in m.batchnorms().items()}


class TrainingGraph(nn.Module):
    """loss, logits, each meta BatchNorm's batch mean and (unbiased) variance, then those of
    each batch-statistics backbone BatchNorm (``backbone_norm="batch"``)."""

    def __init__(self, model: EcoTTAModel, lam: float, e0: float):
        super().__init__()
        self.model, self.lam, self.e0 = model, lam, e0

    def forward(self, x: torch.Tensor):
        feats, trace = self.model.features(x)
        loss, logits, _, _ = loss_from_features(self.model, feats, trace, self.lam, self.e0)
        stats = []
        for meta, (x_prev, h, _) in zip(self.model.metas, trace):
            for t in (h, meta.conv(x_prev)):
                stats += [t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3), unbiased=True)]
        for norm in self.model.batch_stat_norms().values():
            stats += list(norm.batch_stats)
        return (loss, logits, *stats)


class InferenceGraph(nn.Module):
    def __init__(self, model: EcoTTAModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def running_stat_layers(model: EcoTTAModel) -> list[str]:
    """Every BatchNorm whose running statistics the device keeps, in the training graph's
    output order: the meta networks', then the batch-statistics backbone's."""
    return [*meta_batchnorms(model), *(f"backbone.{n}" for n in model.batch_stat_norms())]


def _export(module: nn.Module, x: torch.Tensor, output_names: list[str]) -> onnx.ModelProto:
    buf = io.BytesIO()
    dyn = {"input": {0: "batch"}, "logits": {0: "batch"}}
    # tracing runs the module: keep train-mode BatchNorms from moving their running stats
    saved = copy.deepcopy(module.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=OPSET,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          export_params=True, keep_initializers_as_inputs=True,
                          input_names=["input"], output_names=output_names, dynamic_axes=dyn)
    module.load_state_dict(saved)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return proto


def _keep_inputs(proto: onnx.ModelProto, keep: set[str]) -> None:
    inits = {i.name for i in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in inits or i.name in keep]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


def _sparsify(proto: onnx.ModelProto, names: set[str], max_density: float = 0.3) -> int:
    """Store the named initializers as COO sparse initializers when that is smaller: a non-zero
    costs 12 bytes (value + int64 index) against 4 per dense weight, so below density 1/3.
    onnxruntime densifies them at load time; on disk the zeros cost nothing."""
    keep, moved = [], 0
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if init.name in names and arr.size and np.count_nonzero(arr) / arr.size <= max_density:
            flat = arr.ravel()
            idx = np.flatnonzero(flat).astype(np.int64)
            values = numpy_helper.from_array(flat[idx], init.name)
            indices = numpy_helper.from_array(idx, init.name + ".indices")
            proto.graph.sparse_initializer.append(
                onnx.helper.make_sparse_tensor(values, indices, list(arr.shape)))
            moved += 1
        else:
            keep.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return moved


def _fix_ir(proto: onnx.ModelProto) -> None:
    # onnxruntime 1.19 reads IR version <= 10
    proto.ir_version = min(proto.ir_version, 9)


@contextlib.contextmanager
def _native_stderr_to(path: Path):
    """onnxruntime's graph builder logs every transformer to the C-level stderr; keep that
    in a file (shown only if the export fails)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    except ExportError:  # already one line that says what
        os.dup2(saved, 2)
        raise
    except Exception:
        os.dup2(saved, 2)
        sys.stderr.write(path.read_text(errors="replace")[-4000:])
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "onnx", "onnxruntime-training-cpu", "onnxruntime-training", "edgetta"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _profile(bundle_dir: Path, batch: int) -> dict[str, Any]:
    """Memory of one adaptation step at the default batch: static (per target) and measured
    on this machine in a fresh torch-free process. ``serve --memory-budget`` reads it."""
    from edgetta.bundle import Bundle
    from edgetta.profile import MIB, analyse, bundle_facts, measure_step
    from edgetta.targets import TARGETS

    bundle = Bundle.open(bundle_dir, verify=False)
    facts = bundle_facts(bundle)
    train, infer = facts["ort-training"], facts["inference"]
    reports = {name: analyse(bundle, t, batch, train=train, infer=infer) for name, t in TARGETS.items()}
    x86 = reports["x86-64"]
    measured = measure_step(bundle_dir, batch)
    return {
        "machine": measured["machine"], "engine": measured["engine"],
        "batch": batch,
        "adaptation_static_mib": round(x86["adaptation"]["total"] / MIB, 2),
        "activations_kept_mib": round(x86["adaptation"]["activations_kept"] / MIB, 2),
        "inference_static_mib": round(x86["inference"]["total"] / MIB, 2),
        "adaptation_peak_mib": round(measured["peak_after_step"] / MIB, 2),
        "adaptation_step_growth_mib": round(measured["step_peak"] / MIB, 2),
        "step_ms": round(measured["step_ms"], 1),
        "measured_on": sys.platform,
        "fits": {name: r["adaptation"]["total"] <= r["target"]["budget_mib"] * MIB
                 for name, r in reports.items()},
    }


def _add_graph_facts(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Probe the bundle's graphs (edgetta.profile) and list the facts file in ``manifest``."""
    from edgetta.bundle import Bundle
    from edgetta.profile import FACTS_FILE, write_facts

    path = bundle_dir / FACTS_FILE
    write_facts(Bundle.open(bundle_dir, verify=False), path)
    manifest["files"][FACTS_FILE] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["graphs"]["facts"] = FACTS_FILE
    manifest["bundle_bytes"] = int(sum(f["bytes"] for f in manifest["files"].values()))
    contract.write_manifest(bundle_dir, manifest)


def build_model(ckpt: dict[str, Any], variant: str | None = None) -> EcoTTAModel:
    """The warmed-up EcoTTA model held by a host checkpoint; ``variant`` (e.g. "paper"): the
    meta networks of another variant the checkpoint carries (``warmup --paper-variant``)."""
    if variant is not None:
        variants = ckpt.get("variants") or {}
        if variant not in variants:
            raise ValueError(f"checkpoint has no variant {variant!r} (it has: {sorted(variants) or 'none'})")
        ckpt = {**ckpt, **variants[variant]}
    backbone: Backbone = ckpt_io.build_backbone(ckpt)
    if "meta_state_dict" not in ckpt:
        raise ValueError("checkpoint has no meta networks: run 'python -m edgetta_export.warmup' on it first")
    # checkpoints from before the "batch" variant carry no backbone_norm: the paper's
    model = EcoTTAModel(backbone, ckpt["split"], backbone_norm=ckpt.get("backbone_norm", "source"))
    model.metas.load_state_dict(ckpt["meta_state_dict"])
    stats = ckpt.get("backbone_running_stats") or {}
    if model.backbone_norm == "batch" and stats:  # edgetta_export.warmup.calibrate_batch_stat_norms
        unknown = model.backbone.load_state_dict(stats, strict=False).unexpected_keys
        if unknown:
            raise ValueError(f"checkpoint's backbone_running_stats name tensors the backbone lacks: {unknown[:3]}")
    return model


def export_bundle(ckpt: dict[str, Any], out_dir: str | os.PathLike, *, lr: float = 0.005,
                  momentum: float = 0.9, lam: float = 0.5, e0: float | None = None,
                  batch_size: int = 64, bn_momentum: float = 0.7, sparse_storage: bool = True,
                  export_batch: int = 2, profile: bool = True, lean: bool = True,
                  portable: bool = True, fold_batchnorms: bool = True,
                  lean_options: LeanOptions = LeanOptions()) -> dict[str, Any]:
    """Write a device bundle for a warmed-up checkpoint; returns the manifest.
    ``lean``, ``portable`` and ``fold_batchnorms`` are on by default; off, for comparison
    (``lean_options``: the lean graph's speed rewrites, likewise). ``bn_momentum``: how far each
    step moves the running statistics that single frames are predicted with; 0.7 was chosen on
    corrupted training images (python -m benchmarks.running_stats, docs/running_stats.md)."""
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)

    model = build_model(ckpt)
    num_classes = len(ckpt["class_names"])
    e0 = 0.4 * math.log(num_classes) if e0 is None else e0
    sparsity = sparsity_report(model.backbone)
    # batch-statistics BatchNorms normalize a conv's output as it is: nothing to fold
    folded = fold_batchnorms_into_convs(model) if fold_batchnorms and model.backbone_norm == "source" else []
    freeze_batchnorms(model.backbone)
    model.train()
    size = ckpt.get("input_size", 32)
    x = torch.randn(export_batch, 3, size, size)

    meta_params = [f"model.metas.{n}" for n, _ in model.metas.named_parameters()]
    # batch-statistic output -> running statistic, the meta BatchNorms' first; the backbone's are
    # inputs of the inference graph only (the training graph normalizes with the batch's)
    running_of = {contract.stat_output(n, s): f"model.{n}.running_{s}"
                  for n in running_stat_layers(model) for s in ("mean", "var")}
    running = list(running_of.values())
    meta_stats = [n for n in running if n.startswith("model.metas.")]
    backbone_stats = [n for n in running if n.startswith("model.backbone.")]
    meta_tensors = set(meta_params + running)
    backbone_names = {f"model.backbone.{n}" for n, _ in model.backbone.named_parameters()}
    backbone_names |= {f"model.backbone.{n}" for n, _ in model.backbone.named_buffers()}
    backbone_names -= set(backbone_stats)
    stat_outputs = list(running_of)

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        # momentum 0: tracing must not move the running statistics it writes into the graph,
        # and onnxruntime-training's BatchNorm then leaves the frozen checkpoint copies as they are
        momenta = {n: bn.momentum for n, bn in meta_batchnorms(model).items()}
        for bn in meta_batchnorms(model).values():
            bn.momentum = 0.0
        train_proto = _export(TrainingGraph(model, lam, e0), x, ["loss", "logits", *stat_outputs])
        for n, bn in meta_batchnorms(model).items():
            bn.momentum = momenta[n]
        _keep_inputs(train_proto, set())
        names = {i.name for i in train_proto.graph.initializer}
        missing = [n for n in meta_params + meta_stats if n not in names]
        if missing:
            raise RuntimeError(f"exporter merged or dropped meta tensors {missing}; "
                               "they must stay distinct initializers to be trainable")
        _fix_ir(train_proto)
        log = Path(tempfile.mkstemp(prefix="edgetta-export-", suffix=".log")[1])
        with _native_stderr_to(log):
            try:
                artifacts.generate_artifacts(train_proto, requires_grad=meta_params,
                                             frozen_params=meta_stats, loss=None,
                                             optimizer=artifacts.OptimType.SGD, artifact_directory=tmp)
            except RuntimeError as e:
                raise training_graph_refusal(e) from None
        log.unlink(missing_ok=True)
        (tmp / "eval_model.onnx").unlink(missing_ok=True)  # inference.onnx serves instead
        rewrites = {}
        generated = onnx.load(tmp / "training_model.onnx")
        if lean:
            training_model = onnx.ModelProto()
            training_model.CopyFrom(generated)
            rewrites = make_lean(training_model, train_proto, options=lean_options)
            onnx.save(training_model, tmp / "training_model.onnx")
        if portable:
            if lean:  # for ARM, which has no NCHWc layout for NHWC masks to work around
                make_lean(generated, train_proto, nhwc_masks=False, options=lean_options)
            step = make_portable(generated, train_proto, meta_params, options=lean_options)
            if lean and lean_options.separate_backward_buffers:  # the tensors make_portable added too
                separate_backward_buffers(step)
            onnx.checker.check_model(step, full_check=True)
            onnx.save(step, tmp / "portable_step.onnx")

        model.eval()
        model.backbone.eval()
        infer_model = InferenceGraph(model)
        infer_model.training = True  # no value-based initializer merging; BNs stay eval-mode
        infer_proto = _export(infer_model, x, ["logits"])
        _keep_inputs(infer_proto, meta_tensors)
        _fix_ir(infer_proto)
        sparse_count = 0
        if sparse_storage:
            sparse_count = _sparsify(infer_proto, backbone_names)
            for name in ("training_model.onnx", "portable_step.onnx"):
                if (tmp / name).exists():
                    graph = onnx.load(tmp / name)
                    _sparsify(graph, backbone_names | {n + ".flipped" for n in backbone_names})  # make_lean's
                    onnx.save(graph, tmp / name)
        onnx.save(infer_proto, tmp / "inference.onnx")

        initial = {i.name: numpy_helper.to_array(i) for i in infer_proto.graph.initializer if i.name in meta_tensors}
        if set(initial) != meta_tensors:
            raise RuntimeError(f"inference graph lacks meta tensors {sorted(meta_tensors - set(initial))}")
        np.savez(tmp / "meta_init.npz", **initial)  # warmed-up meta state, readable without onnx
        mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
        files = {}
        for path in sorted(p for p in tmp.iterdir() if p.is_file()):
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": "edgetta-bundle",
            "model": {"architecture": ckpt["model"], "dataset": ckpt.get("dataset"),
                      "source_test_accuracy": ckpt.get("test_accuracy"),
                      "meta_warmup": ckpt.get("warmup", {})},
            "input": {"name": "input", "shape": [3, size, size], "layout": "NCHW",
                      "dtype": "float32", "frame_layout": "HWC", "color_order": "RGB",
                      "resize": [size, size], "scale": 1.0 / 255.0, "mean": mean, "std": std},
            "class_names": list(ckpt["class_names"]),
            "ecotta": {"k": model.k, "split": model.split, "lambda": lam, "e0": e0,
                       "backbone_norm": model.backbone_norm,
                       "entropy_average": "batch",
                       "part_ends": ckpt.get("part_ends") or part_ends(model.backbone, model.split)},
            "adaptation": {"optimizer": "sgd", "lr": lr, "momentum": momentum,
                           "batch_size": batch_size, "bn_momentum": bn_momentum,
                           "momentum_note": "onnxruntime-training's SGD has no momentum; the "
                                            "device applies SGD with momentum itself from the "
                                            "gradients the training graph computes"},
            "graphs": {
                "inference": {"file": "inference.onnx", "inputs": ["input", *meta_params, *running],
                              "outputs": ["logits"]},
                "portable_step": ({"file": "portable_step.onnx",
                                   "inputs": ["input", *meta_params,
                                              *[contract.velocity(p) for p in meta_params], contract.LR, contract.MOMENTUM],
                                   "outputs": ["loss", "logits", *stat_outputs,
                                               *[contract.updated(p) for p in meta_params],
                                               *[contract.updated(contract.velocity(p)) for p in meta_params]],
                                   "note": "standard ONNX ops only: runs on plain onnxruntime"}
                                  if portable else None),
                "training": {"file": "training_model.onnx", "checkpoint": "checkpoint",
                             "optimizer": "optimizer_model.onnx",
                             "outputs": ["loss", "logits", *stat_outputs]},
            },
            "training_graph": {"lean": lean, "rewrites": rewrites,
                               # kept meta-network inputs stored as integers of this many bits
                               # (lean.quantize_activation or compress_activation; None: float32)
                               "activation_bits": lean_options.activation_bits if lean else None,
                               "activation_rounding": (lean_options.activation_rounding
                                                       if lean and lean_options.activation_bits else None),
                               "note": "stop-gradient twins of the meta networks merged into the main "
                                       "branch; frozen convs' input gradients via ConvTranspose(dY, W); "
                                       "ReLU gradients from masks packed 8 signs to a byte (frozen convs' outputs in NHWC order, "
                                       "for onnxruntime's x86 NCHWc layout; the portable step keeps NCHW)" if lean else
                                       "as generated by onnxruntime-training"},
            "trainable": meta_params,
            "frozen": {"meta_running_stats": meta_stats, "backbone_running_stats": backbone_stats,
                       "backbone_tensors": len(backbone_names),
                       "backbone_storage": "graph constants",
                       "batchnorms_folded_into_convs": len(folded)},
            "running_stats": running_of,
            "backbone": {"density": total_density(sparsity), "sparsity_report": sparsity,
                         "pruning": ckpt.get("pruning", {}),
                         "sparse_initializers": sparse_count},
            "parameters": {"trainable": int(sum(v.size for k, v in initial.items() if k in meta_params)),
                           "backbone": int(sum(r["params"] for r in sparsity))},
            "files": files,
            "bundle_bytes": int(sum(f["bytes"] for f in files.values())),
            "versions": _versions(),
        }
        contract.write_manifest(tmp, manifest)
        _add_graph_facts(tmp, manifest)  # what 'edgetta profile' reads on a device without onnx
        if profile:
            manifest["profile"] = _profile(tmp, batch_size)
            contract.write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logging.info("bundle written to %s", out)
    return manifest
