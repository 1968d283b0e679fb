"""onnxruntime for the device, quiet and torch-free.

onnxruntime-training 1.19's package ``onnxruntime.training`` imports torch in its
``__init__`` (helpers for ORTModule, a host-side feature), and ``import onnxruntime`` itself
tries that import while it checks its build: where torch is installed, a device process would
then hold torch too (about twice the peak RSS, docs/devices.md). Its on-device API
(``onnxruntime.training.api``: Module, CheckpointState, Optimizer) needs only the C bindings,
so edgetta imports onnxruntime with that check answered "no ORTModule", and the API's
subpackage without running the parent's ``__init__``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

from .errors import EngineUnavailable


class _NoTrainingInit(importlib.abc.MetaPathFinder):
    """Refuses ``onnxruntime.training`` while ``onnxruntime`` is being imported: its build check
    (capi/onnxruntime_validation.py) treats the ImportError as "no ORTModule" and goes on."""

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name == "onnxruntime.training":
            raise ImportError("edgetta: onnxruntime.training's __init__ is not run on the device")
        return None


def onnxruntime() -> ModuleType:
    blocker = None
    if "onnxruntime" not in sys.modules:
        blocker = _NoTrainingInit()
        sys.meta_path.insert(0, blocker)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineUnavailable(f"onnxruntime is not installed ({e}): pip install edgetta "
                                "installs the right build for this machine") from None
    finally:
        if blocker is not None:
            sys.meta_path.remove(blocker)
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
