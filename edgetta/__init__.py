"""edgetta: on-device test-time adaptation (EcoTTA meta networks on onnxruntime)."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("edgetta")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.0.0+source"

from .adapter import Adapter  # noqa: E402
from .bundle import Bundle  # noqa: E402
from .errors import BundleError, EdgettaError, EngineUnavailable, StateError  # noqa: E402
from .preprocess import FrameError  # noqa: E402

__all__ = ["Adapter", "Bundle", "BundleError", "EdgettaError", "EngineUnavailable", "FrameError",
           "StateError", "__version__"]
