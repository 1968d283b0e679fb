"""A portable training step: the whole adaptation step as one graph of standard ONNX ops.

onnxruntime-training has no Linux aarch64 wheel; plain ``onnxruntime`` has. This pass turns the
bundle's training graph into ``portable_step.onnx``, which plain onnxruntime runs:

    inputs:  input, every meta parameter, its velocity, lr, momentum
    outputs: loss, logits, meta BatchNorm batch statistics, every parameter and velocity updated
             by SGD with momentum (v = momentum * v + g; p = p - lr * v)

Each onnxruntime-training op of the generated graph is replaced by its standard-op definition:
BatchNormInternal (training-mode BatchNorm), BatchNormalizationGrad, ConvGrad (input gradient by a
Conv of the flipped, channel-swapped kernels at stride 1, else by ConvTranspose, grouped as the
convolution is; weight gradient by one MatMul per kernel offset), ReluGrad, LogSoftmaxGrad, Scale;
gradient accumulators are dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .lean import LeanOptions, declared_spatial_dims, node_attrs, runtime_flipped_conv, spatial_dims

AXES_NCHW = [0, 2, 3]


class _Builder:
    def __init__(self, graph: onnx.GraphProto, fast: bool = True):
        self.fast = fast  # LeanOptions.portable_gradients
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.consts: dict[str, str] = {}

    def name(self, hint: str) -> str:
        self.count += 1
        return f"portable/{hint}/{self.count}"

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = f"{arr.dtype}:{arr.shape}:{arr.tobytes().hex()}"
        if key not in self.consts:
            name = f"portable/const/{len(self.consts)}"
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            self.consts[key] = name
        return self.consts[key]

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type + "_node"), **attrs))
        return out

    def per_channel(self, t: str) -> str:
        return self.op("Reshape", [t, self.const([1, -1, 1, 1])])


def _batchnorm(b: _Builder, node: onnx.NodeProto) -> None:
    x, scale, bias = node.input[:3]
    eps = node_attrs(node).get("epsilon", 1e-5)
    mean4 = b.op("ReduceMean", [x], axes=AXES_NCHW, keepdims=1)
    d = b.op("Sub", [x, mean4])
    var4 = b.op("ReduceMean", [b.op("Mul", [d, d])], axes=AXES_NCHW, keepdims=1)
    inv4 = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var4, b.const(eps, np.float32)])])])
    y = (b.op("Mul", [d, b.op("Mul", [inv4, b.per_channel(scale)])]) if b.fast else  # per-channel first: one pass
         b.op("Mul", [b.op("Mul", [d, inv4]), b.per_channel(scale)]))
    b.op("Add", [y, b.per_channel(bias)], node.output[0])
    outs = list(node.output) + [""] * 5
    if outs[3]:
        b.op("Reshape", [mean4, b.const([-1])], outs[3])
    if outs[4]:
        b.op("Reshape", [inv4, b.const([-1])], outs[4])


def _batchnorm_grad(b: _Builder, node: onnx.NodeProto) -> None:
    dy, x, scale, mean, inv = node.input[:5]
    dx_out, dscale_out, dbias_out = (list(node.output) + ["", "", ""])[:3]
    axes = b.const(AXES_NCHW)
    inv4 = b.per_channel(inv)
    xhat = b.op("Mul", [b.op("Sub", [x, b.per_channel(mean)]), inv4])
    dbias = b.op("ReduceSum", [dy, axes], dbias_out or None, keepdims=0)
    dscale = b.op("ReduceSum", [b.op("Mul", [dy, xhat]), axes], dscale_out or None, keepdims=0)
    if dx_out:
        shape = b.op("Shape", [x])
        count = b.op("Div", [b.op("Cast", [b.op("Size", [x])], to=TensorProto.FLOAT),
                             b.op("Cast", [b.op("Gather", [shape, b.const(1)], axis=0)], to=TensorProto.FLOAT)])
        # the per-channel sums divided by the count before they meet x's size: one pass fewer
        if b.fast:
            centred = b.op("Add", [b.op("Mul", [xhat, b.op("Div", [b.per_channel(dscale), count])]),
                                   b.op("Div", [b.per_channel(dbias), count])])
            inner = b.op("Sub", [dy, centred])
        else:
            centred = b.op("Add", [b.per_channel(dbias), b.op("Mul", [xhat, b.per_channel(dscale)])])
            inner = b.op("Sub", [dy, b.op("Div", [centred, count])])
        b.op("Mul", [b.op("Mul", [b.per_channel(scale), inv4]), inner], dx_out)


def _conv_grad(b: _Builder, node: onnx.NodeProto, spatial: dict[str, list[int]]) -> None:
    dy, x, w = node.input[:3]
    outs = list(node.output) + ["", "", ""]
    a = node_attrs(node)
    k = list(a["kernel_shape"])
    nd = len(k)
    strides = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * 2 * nd))
    dil = list(a.get("dilations", [1] * nd))
    group = a.get("group", 1)
    if group != 1 and (outs[1] or outs[2]):  # meta networks' convs are plain; frozen ones need only dX
        raise ExportError(f"weight gradient of grouped convolution {node.name} has no portable form here")
    xs = spatial[x]
    ys = [(xs[d] + pads[d] + pads[d + nd] - dil[d] * (k[d] - 1) - 1) // strides[d] + 1 for d in range(nd)]
    if outs[0]:
        _input_gradient(b, dy, w, outs[0], k, strides, pads, dil, group, xs, ys)
    if outs[1]:
        _weight_gradient(b, dy, x, outs[1], k, strides, pads, dil, ys)
    if outs[2]:
        b.op("ReduceSum", [dy, b.const(AXES_NCHW)], outs[2], keepdims=0)


def _input_gradient(b: _Builder, dy: str, w: str, out: str, k: list[int], strides: list[int], pads: list[int],
                    dil: list[int], group: int, xs: list[int], ys: list[int]) -> None:
    """dX of a convolution whose weights are a graph input (a meta network's). At stride 1 (plain
    conv, padding within the dilated kernel) a Conv of dY with the kernels flipped and their
    channel axes swapped, both done on the weights in the graph, which onnxruntime's CPU kernels
    run faster than ConvTranspose (as lean.py's frozen ones); otherwise ConvTranspose."""
    nd = len(k)
    conv_pads = [dil[d % nd] * (k[d % nd] - 1) - pads[d] for d in range(2 * nd)]
    if b.fast and group == 1 and set(strides) == {1} and min(conv_pads) >= 0:
        b.nodes.extend(runtime_flipped_conv(dy, w, out, b.name("input_gradient"), k, conv_pads, dil, b.const))
        return
    out_pad = [xs[d] - ((ys[d] - 1) * strides[d] - pads[d] - pads[d + nd] + dil[d] * (k[d] - 1) + 1)
               for d in range(nd)]
    # a grouped conv's weights (Cout, Cin/g, k, k) are ConvTranspose's (Cin', Cout'/g, k, k)
    # for dY -> dX, group for group
    b.op("ConvTranspose", [dy, w], out, kernel_shape=k, strides=strides, pads=pads,
         dilations=dil, output_padding=out_pad, group=group)


def _weight_gradient(b: _Builder, dy: str, x: str, out: str, k: list[int], strides: list[int], pads: list[int],
                     dil: list[int], ys: list[int]) -> None:
    """dW of a plain 2-D convolution as one matrix product per kernel offset (a, b):
    dW[:, :, a, b] = X_ab (Cin, N*Ho*Wo) @ dY (N*Ho*Wo, Cout), X_ab the padded input seen from
    that offset (a strided Slice). About 2x faster than a Conv of the transposed tensors
    (docs/step_time.md). The offsets are the iterations of a ``Loop``: independent nodes let
    onnxruntime make every offset's slice (each the size of X) before the first product."""
    nd = len(k)
    if not b.fast:  # as before issue 16: a Conv of the transposed tensors
        r = b.op("Conv", [b.op("Transpose", [x], perm=[1, 0, 2, 3]), b.op("Transpose", [dy], perm=[1, 0, 2, 3])],
                 pads=pads, strides=dil, dilations=strides)
        r = b.op("Slice", [r, b.const([0, 0]), b.const(k), b.const([2, 3])])
        b.op("Transpose", [r], out, perm=[1, 0, 2, 3])
        return
    if nd != 2:
        raise ExportError(f"weight gradient of a {nd}-D convolution has no portable form here")
    xt = b.op("Transpose", [x], perm=[1, 0, 2, 3])  # (Cin, N, H, W)
    if any(pads):
        xt = b.op("Pad", [xt, b.const([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]])])
    dy_rows = b.op("Reshape", [b.op("Transpose", [dy], perm=[0, 2, 3, 1]),
                               b.op("Concat", [b.const([-1]), b.op("Shape", [dy], start=1, end=2)], axis=0)])
    starts = b.const([[i * dil[0], j * dil[1]] for i in range(k[0]) for j in range(k[1])])
    span = b.const([strides[d] * (ys[d] - 1) + 1 for d in range(2)])
    step, cond_in, cond_out, part = (b.name(h) for h in ("step", "cond", "cond_out", "part"))
    n = lambda op, ins, o, **kw: helper.make_node(op, ins, [o], name=o + "_node", **kw)
    first, last, seen, rows = (b.name(h) for h in ("start", "end", "slice", "rows"))
    body = helper.make_graph(
        [n("Identity", [cond_in], cond_out),
         n("Gather", [starts, step], first, axis=0),
         n("Add", [first, span], last),
         n("Slice", [xt, first, last, b.const([2, 3]), b.const(strides)], seen),
         n("Reshape", [seen, b.const([0, -1])], rows),  # (Cin, N*Ho*Wo)
         n("MatMul", [rows, dy_rows], part)],
        b.name("offset"),
        [helper.make_tensor_value_info(step, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(part, TensorProto.FLOAT, None)])
    parts = b.name("parts")  # (k0*k1, Cin, Cout)
    b.nodes.append(helper.make_node("Loop", [b.const(k[0] * k[1]), b.const(True, np.bool_)], [parts],
                                    name=b.name("Loop_node"), body=body))
    grid = b.op("Reshape", [parts, b.op("Concat", [b.const(k), b.op("Shape", [parts], start=1, end=3)], axis=0)])
    b.op("Transpose", [grid], out, perm=[3, 2, 0, 1])


def conv_grad_standard_ops(node: onnx.NodeProto, spatial: dict[str, list[int]]
                           ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """onnxruntime-training's ``ConvGrad`` node as the portable step writes it in standard ops:
    the nodes and the constants they read (``spatial``: the forward input's spatial size by name)."""
    graph = onnx.GraphProto()
    b = _Builder(graph)
    _conv_grad(b, node, spatial)
    return b.nodes, list(graph.initializer)


def _relu_grad(b: _Builder, node: onnx.NodeProto) -> None:
    dy, y = node.input[:2]
    zero = b.const(0.0, np.float32)
    b.op("Where", [b.op("Greater", [y, zero]), dy, zero], node.output[0])


def _log_softmax_grad(b: _Builder, node: onnx.NodeProto) -> None:
    dy, y = node.input[:2]
    axis = node_attrs(node).get("axis", -1)
    total = b.op("ReduceSum", [dy, b.const([axis])], keepdims=1)
    b.op("Sub", [dy, b.op("Mul", [b.op("Exp", [y]), total])], node.output[0])


def _scale(b: _Builder, node: onnx.NodeProto) -> None:
    op = "Div" if node_attrs(node).get("scale_down", 0) else "Mul"
    factor = b.op("Cast", [node.input[1]], to=TensorProto.FLOAT)  # onnxruntime's Scale takes ints too
    b.op(op, [node.input[0], factor], node.output[0])


def make_portable(training: onnx.ModelProto, forward: onnx.ModelProto, trainable: list[str],
                  options: LeanOptions = LeanOptions()) -> onnx.ModelProto:
    """``portable_step.onnx`` from the bundle's training graph (see the module docstring);
    ``options.portable_gradients`` off writes the gradients as before issue 16 (for measuring)."""
    model = onnx.ModelProto()
    model.CopyFrom(training)
    g = model.graph
    spatial = {**spatial_dims(forward), **declared_spatial_dims(g)}  # the latter: make_lean's decompressed tensors
    b = _Builder(g, options.portable_gradients)
    grads: dict[str, str] = {}
    for node in list(g.node):
        if node.domain != "com.microsoft":
            b.nodes.append(node)
        elif node.op_type == "BatchNormInternal":
            _batchnorm(b, node)
        elif node.op_type == "BatchNormalizationGrad":
            _batchnorm_grad(b, node)
        elif node.op_type == "ConvGrad":
            _conv_grad(b, node, spatial)
        elif node.op_type == "ReluGrad":
            _relu_grad(b, node)
        elif node.op_type.startswith("LogSoftmaxGrad"):
            _log_softmax_grad(b, node)
        elif node.op_type == "Scale":
            _scale(b, node)
        elif node.op_type == "InPlaceAccumulatorV2":
            param = node.input[0].removesuffix("_grad.accumulation.buffer")
            grads[param] = node.input[1]
        else:
            raise ExportError(f"the portable step has no standard-op form for {node.domain}:{node.op_type} "
                              "(export without it: portable=False)")
    missing = [p for p in trainable if p not in grads]
    if missing:
        raise RuntimeError(f"training graph has no gradient for {missing}")
    lr, mom = "lr", "momentum"
    new_outputs = []
    for p in trainable:
        v = f"{p}.velocity"
        v_new = b.op("Add", [b.op("Mul", [v, mom]), grads[p]], f"{v}.new")
        b.op("Sub", [p, b.op("Mul", [v_new, lr])], f"{p}.new")
        new_outputs += [f"{p}.new", f"{v}.new"]
    del g.node[:]
    g.node.extend(b.nodes)
    shapes = {i.name: i.type for i in g.input}
    keep_inputs = [i for i in g.input if not i.name.endswith(".accumulation.buffer") and i.name != "lazy_reset_grad"]
    used = {x for n in g.node for x in n.input}
    keep_inputs = [i for i in keep_inputs if i.name in used]
    del g.input[:]
    g.input.extend(keep_inputs)
    for p in trainable:
        vi = onnx.ValueInfoProto(name=f"{p}.velocity", type=shapes[p])
        g.input.append(vi)
    g.input.extend([helper.make_tensor_value_info(lr, TensorProto.FLOAT, []),
                    helper.make_tensor_value_info(mom, TensorProto.FLOAT, [])])
    kept = [o for o in g.output if not o.name.endswith(".accumulation.out")]
    del g.output[:]
    g.output.extend(kept)
    for p in trainable:
        g.output.extend([onnx.ValueInfoProto(name=f"{p}.new", type=shapes[p]),
                         onnx.ValueInfoProto(name=f"{p}.velocity.new", type=shapes[p])])
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model
