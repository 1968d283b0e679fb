"""onnxruntime for the device, quiet and torch-free.

onnxruntime-training 1.19's package ``onnxruntime.training`` imports torch in its
``__init__`` (helpers for ORTModule, a host-side feature): where torch is installed, a device
process would then hold torch too (about twice the peak RSS, docs/devices.md). Its on-device API
(``onnxruntime.training.api``: Module, CheckpointState, Optimizer) needs only the C bindings,
so edgetta imports that subpackage without running the parent's ``__init__``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from .errors import EngineUnavailable


def onnxruntime() -> ModuleType:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineUnavailable(f"onnxruntime is not installed ({e}): pip install edgetta "
                                "installs the right build for this machine") from None
    ort.set_default_logger_severity(3)
    return ort


def training_api() -> ModuleType:
    """``onnxruntime.training.api``; EngineUnavailable where this onnxruntime has none."""
    onnxruntime()
    try:
        if "onnxruntime.training" not in sys.modules:
            spec = importlib.util.find_spec("onnxruntime.training")
            if spec is None:
                raise ImportError("no module onnxruntime.training")
            sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)
        api = importlib.import_module("onnxruntime.training.api")
        api.Module  # noqa: B018 - the plain build has no training bindings behind the name
    except (ImportError, AttributeError) as e:
        sys.modules.pop("onnxruntime.training", None)
        raise EngineUnavailable(f"the installed onnxruntime has no training API ({e})") from None
    return api


def has_training_api() -> bool:
    try:
        training_api()
    except EngineUnavailable:
        return False
    return True
