"""Frame sources: openers in a registry (``openers``), bounded decoding (``decode``), MJPEG
(``mjpeg``) and the capture thread (``reader``). See ``openers`` for the names users give."""
from ..errors import FrameError, SourceError
from .decode import CAPTURE_HINT, PILLOW_HINT, Limits, decode_image, read_image_file, read_netpbm
from .mjpeg import mjpeg_parts, printable
from .openers import (OPENERS, Backoff, OpenContext, Opener, SkippedFrame, Source, StreamError,
                      open_source)
from .reader import Delivered, FrameReader

__all__ = ["CAPTURE_HINT", "OPENERS", "PILLOW_HINT", "Backoff", "Delivered", "FrameError",
           "FrameReader", "Limits", "OpenContext", "Opener", "SkippedFrame", "Source",
           "SourceError", "StreamError", "decode_image", "mjpeg_parts", "open_source",
           "printable", "read_image_file", "read_netpbm"]
