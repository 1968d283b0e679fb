"""Memory-lean training graph: frozen layers keep masks, not activations.

onnxruntime-training's generated graph keeps a full float activation for every frozen ReLU,
read by ``ReluGrad`` and by ``ConvGrad`` (which takes the forward input even when no weight
gradient is wanted). This pass rewrites, in the generated training graph:

- ``ConvGrad(dY, X, W)`` with no weight/bias gradient -> ``ConvTranspose(dY, W)`` with the same
  strides, pads, dilations and group, and the output padding that restores X's size: the input
  gradient of a frozen convolution needs only its weights;
- ``ReluGrad(dY, Y)`` -> ``Where(mask, dY, 0)`` with ``mask = Greater(Y, 0)`` computed right
  after the forward ReLU: a boolean (1 byte) instead of a float (4 bytes) is kept.

Once neither reads it, the forward activation is freed during the forward pass. All ops are
standard ONNX. Residual additions, pooling, the classifier and the meta networks are unchanged.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np


def _spatial_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shape = vi.type.tensor_type.shape.dim
        if len(shape) == 4 and all(d.HasField("dim_value") for d in shape[2:]):
            dims[vi.name] = [d.dim_value for d in shape[2:]]
    return dims


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def make_lean(training: onnx.ModelProto, forward: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``training`` in place; ``forward`` (the graph before artifacts were generated)
    gives the spatial sizes of forward tensors. Returns how many nodes were rewritten."""
    spatial = _spatial_dims(forward)
    nodes = list(training.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    zero = "edgetta.lean.zero"
    training.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
    after: dict[int, list[onnx.NodeProto]] = {}
    masks: dict[str, str] = {}
    convs = relus = 0
    for i, node in enumerate(nodes):
        if node.op_type == "ConvGrad" and node.domain == "com.microsoft":
            wants_weight = len(node.output) > 1 and node.output[1] != ""
            wants_bias = len(node.output) > 2 and node.output[2] != ""
            x = node.input[1]
            if wants_weight or wants_bias or x not in spatial:
                continue
            a = _attrs(node)
            k = list(a["kernel_shape"])
            strides = list(a.get("strides", [1] * len(k)))
            pads = list(a.get("pads", [0] * 2 * len(k)))
            dil = list(a.get("dilations", [1] * len(k)))
            dy_dims = [(spatial[x][d] + pads[d] + pads[d + len(k)] - dil[d] * (k[d] - 1) - 1) // strides[d] + 1
                       for d in range(len(k))]
            out_pad = [spatial[x][d] - ((dy_dims[d] - 1) * strides[d] - pads[d] - pads[d + len(k)]
                                        + dil[d] * (k[d] - 1) + 1) for d in range(len(k))]
            nodes[i] = helper.make_node(
                "ConvTranspose", [node.input[0], node.input[2]], [node.output[0]],
                name=(node.name or f"convgrad{i}") + "_lean", kernel_shape=k, strides=strides,
                pads=pads, dilations=dil, group=a.get("group", 1), output_padding=out_pad)
            convs += 1
        elif node.op_type == "ReluGrad" and node.domain == "com.microsoft":
            y = node.input[1]
            if y not in masks:
                masks[y] = y + ".mask"
                after.setdefault(producer.get(y, -1), []).append(
                    helper.make_node("Greater", [y, zero], [masks[y]], name=y + ".mask_node"))
            nodes[i] = helper.make_node("Where", [masks[y], node.input[0], zero], [node.output[0]],
                                        name=(node.name or f"relugrad{i}") + "_lean")
            relus += 1
    ordered = list(after.get(-1, []))
    for i, node in enumerate(nodes):
        ordered.append(node)
        ordered.extend(after.get(i, []))
    del training.graph.node[:]
    training.graph.node.extend(ordered)
    return {"conv_grad_to_conv_transpose": convs, "relu_grad_to_mask": relus}
