"""Every error edgetta raises on purpose, under one base, each with a one-line message.

The CLI prints ``error: <message>`` and exits 2 for any ``EdgettaError``; a traceback means a bug.
"""
from __future__ import annotations


class EdgettaError(Exception):
    """Base of edgetta's own errors. ``str(e)`` is one line meant for the user."""


class BundleError(EdgettaError):
    """A bundle that cannot be used: missing, incomplete, tampered with, malformed, or too new."""


class EngineUnavailable(EdgettaError):
    """The requested engine or execution provider is not installed on this machine."""


class SourceError(EdgettaError):
    """A source that cannot be opened (or that stayed unreachable)."""


class StateError(EdgettaError):
    """Saved adaptation state that cannot be resumed (other bundle, non-finite, malformed)."""


class FrameError(EdgettaError, ValueError):
    """A frame that cannot be fed to the model. ``kind`` names why, for counting and metrics:
    corrupt, empty, shape, nan, unsupported, too_large."""

    def __init__(self, message: str, kind: str = "shape"):
        super().__init__(message)
        self.kind = kind
