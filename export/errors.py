"""The exporter's refusal: a model, checkpoint or op it cannot turn into a bundle."""
from __future__ import annotations

import re

from edgetta.errors import EdgettaError


class ExportError(EdgettaError):
    """A model or checkpoint the exporter cannot turn into a bundle; the one-line message says
    what (the CLI prints ``error: ...`` and exits 2)."""


def training_graph_refusal(e: BaseException) -> ExportError:
    """onnxruntime-training's failure to build the gradient graph, as one line."""
    text = str(e)
    missing = re.search(r"gradient builder has not been registered: (\S+) for node (\S+)", text)
    if missing:
        return ExportError(f"onnxruntime-training has no gradient for op {missing.group(1)} (node "
                           f"{missing.group(2)}), which the adaptation must pass through; write that "
                           "layer with other ops (hard-swish/-sigmoid are rewritten already)")
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return ExportError(f"onnxruntime-training could not build the training graph: "
                       f"{(lines[-1] if lines else type(e).__name__)[-300:]}")
