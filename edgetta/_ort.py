"""onnxruntime for the device, quiet and torch-free.

onnxruntime-training 1.19's package ``onnxruntime.training`` imports torch in its
``__init__`` (helpers for ORTModule, a host-side feature). Its on-device API
(``onnxruntime.training.api``: Module, CheckpointState, Optimizer) needs only the C bindings,
so edgetta imports that subpackage without running the parent's ``__init__``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def onnxruntime() -> ModuleType:
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    return ort


def training_api() -> ModuleType:
    onnxruntime()
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime.training")
        if spec is None:
            raise RuntimeError("the installed onnxruntime has no training API; install "
                               "onnxruntime-training-cpu==1.19.2 (see README: devices)")
        sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("onnxruntime.training.api")
