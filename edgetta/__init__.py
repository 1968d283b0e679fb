"""edgetta: on-device test-time adaptation (EcoTTA meta networks on onnxruntime-training)."""
from .adapter import Adapter
from .bundle import Bundle, BundleError
from .preprocess import FrameError

__version__ = "0.1.0"
__all__ = ["Adapter", "Bundle", "BundleError", "FrameError", "__version__"]
