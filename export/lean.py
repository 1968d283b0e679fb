"""Memory-lean training graph: frozen layers keep masks, not activations.

onnxruntime-training's generated graph keeps a full float activation for every frozen ReLU,
read by ``ReluGrad`` and by ``ConvGrad`` (which takes the forward input even when no weight
gradient is wanted). This pass rewrites, in the generated training graph:

- ``ConvGrad(dY, X, W)`` with no weight/bias gradient: the input gradient of a frozen
  convolution needs only its weights. At stride 1 (any group, dilation and padding that leaves
  the Conv's own padding non-negative) -> ``Conv(dY, W')`` with W' the kernels flipped and their
  channel axes swapped group by group, an export-time constant (``flipped_weights``), which
  onnxruntime's CPU kernels run faster than ConvTranspose; otherwise -> ``ConvTranspose(dY, W)``
  with the same strides, pads, dilations and group, and the output padding that restores X's size;
- ``Clip(x, lo, hi)``'s gradient (ReLU6; generated as ``Mul(dY, Cast(x >= lo and x <= hi))``,
  which keeps x) -> ``Mul(dY, mask)`` with ``lo < x < hi`` packed like the ReLU masks;
- ``ReluGrad(dY, Y)`` -> ``Mul(dY, mask)`` with ``mask = Greater(Y, 0)`` computed right after
  the forward ReLU, packed 8 signs to a byte (``MatMulInteger`` of rows of 64 signs by
  block-diagonal weights 1, 2, .., 128: ``packing_weights``) and unpacked
  to 0.0/1.0 right before its use by one ``Gather`` of each byte's row of a 256 x 8 table: 1 bit
  kept instead of a 4-byte float.
  (``Where(mask, dY, 0)`` would do the same, but onnxruntime's CPU ``Where`` allocates two
  scratch tensors of its output's size on every call: figures in docs/memory.md.)
  Masks of frozen convs' outputs are taken in NHWC order and transposed back as bytes when
  unpacked: on x86, onnxruntime computes those convs in a blocked layout, and only an NHWC
  reader gets its layout conversion run right away (``frozen_conv_outputs``).

Once neither reads it, the forward activation is freed during the forward pass. All ops are
standard ONNX. Residual additions, pooling and the classifier are unchanged.

What the meta networks' own gradients read (``BatchNormalizationGrad``'s input, ``ConvGrad``'s
input where a weight gradient is wanted) stays at full width; with ``LeanOptions.activation_bits``
(8, the default) each such tensor is stored as 8-bit integers per (sample, channel), rounded to
nearest (``quantize_activation``) or stochastically (``compress_activation``), right after the
forward pass computes it, and decompressed right before the backward pass reads it
(``decompress_activation``; docs/compressed_activations.md). The regularizer's gradients, computed during the forward pass,
read the exact floats, except its meta conv weight gradients, which ``merge_weight_gradients``
computes with the main term's in the backward pass.

A pass runs first, on the EcoTTA structure of the graph:

- ``merge_stop_gradient_twins``: each regularizer term recomputes its meta network on
  stop-gradient copies of the inputs, so that its gradient reaches that meta network only.
  The recomputation has the same values as the main branch, so its backward nodes are pointed
  at the main branch's tensors and the twin forward nodes are dropped: the gradients stay
  exactly those of the stop-gradient loss, and the twin's activations are no longer kept.
- ``regularizer_backward_early``: the regularizer's gradient needs no upstream gradient (d loss /
  d loss is 1), so each term is differentiated during the forward pass, right after its meta
  network has run, and nothing of it is held through the backward pass.

onnxruntime runs a node as soon as its inputs exist, so every node added for the backward pass
(the mask unpacking) reads the gradient it serves, or it would run in the forward pass and hold
its output through the backward pass.

Three passes bound the step's workspace (docs/workspace.md), all on by default:

- ``separate_backward_buffers``: the main backward pass's tensors are declared with a batch
  symbol of their own, so onnxruntime's allocation planner hands them none of the forward
  pass's buffers (which then stayed allocated through the whole step);
- ``l1_gradient_in_place``: the regularizer's L1 gradients multiply ``Sign(d)`` by their scalar
  instead of a full-size ``Expand`` of it, and the forward mean follows ``|d|`` at once;
- ``memory_order`` (on the final nodes, after every other rewrite): ``meta_branches_late``
  makes each meta network's conv branch wait for the end of its frozen part (a no-op Reshape
  that depends on it), not run at its start, and ``regularizer_backward_early(freeing_first=True)``
  orders the regularizer's reductions and meta BatchNorm gradient before its conv branch's
  gradients.

And four for speed (docs/speed.md), on by default: ``fast_elementwise`` (``cheaper_elementwise``,
``affines_as_batchnorm``, ``stats_from_batchnorms``: elementwise work and reductions in faster
kernels that compute the same), ``declared_unpack_shapes`` and ``declared_restored_rows``
(shapes onnxruntime cannot infer, declared so that its planner reuses freed buffers instead of
allocating, and page-faulting in, new ones) and ``merged_weight_gradients``
(``merge_weight_gradients``: one weight gradient per meta conv for both loss terms).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Callable

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np

from edgetta.profile import BACKWARD_BATCH, topological_order


def spatial_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return declared_spatial_dims(onnx.shape_inference.infer_shapes(model).graph)


def declared_spatial_dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """(H, W) of every 4-D tensor whose value info ``graph`` declares with both known."""
    return _spatial(inferred_dims(graph))


def inferred_dims(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    """Every declared tensor's dimensions in a shape-inferred ``graph``, None where unknown."""
    return {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
            if vi.type.tensor_type.HasField("shape")}


def _spatial(dims: dict[str, list[int | None]]) -> dict[str, list[int]]:
    return {n: d[2:] for n, d in dims.items() if len(d) == 4 and None not in d[2:]}  # type: ignore[misc]


def _per_sample(dims: dict[str, list[int | None]]) -> dict[str, list[int]]:
    """The dimensions past the batch of every tensor of rank >= 2 with all of them known."""
    return {n: d[1:] for n, d in dims.items() if len(d) >= 2 and None not in d[1:]}  # type: ignore[misc]


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _small_constants(graph: onnx.GraphProto) -> dict[str, tuple]:
    """A value key for every small initializer, so that equal constants compare equal."""
    keys = {}
    for init in graph.initializer:
        if np.prod(init.dims, dtype=np.int64) <= 64:
            arr = numpy_helper.to_array(init)
            keys[init.name] = ("const", arr.dtype.str, arr.shape, arr.tobytes())
    return keys


def _scalar(consts: dict[str, tuple], name: str) -> float | None:
    key = consts.get(name)
    if key is None or key[2] != ():
        return None
    return float(np.frombuffer(key[3], dtype=np.dtype(key[1]))[0])


def _backward(nodes: list[onnx.NodeProto], seed: str = "loss_grad") -> set[int]:
    reached, back = {seed}, set()
    for i, node in enumerate(nodes):
        if any(x in reached for x in node.input):
            back.add(i)
            reached.update(o for o in node.output if o)
    return back


def _is_float_cast(node: onnx.NodeProto | None, to: int) -> bool:
    return node is not None and node.op_type == "Cast" and node_attrs(node).get("to") == to


def drop_unread(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (repeatedly); onnxruntime-training's
    in-place accumulators stay."""
    while True:
        used = {x for n in nodes for x in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output if o) or n.op_type.startswith("InPlace")]
        if len(live) == len(nodes):
            return nodes
        nodes = live


def merge_stop_gradient_twins(training: onnx.ModelProto) -> int:
    """Point every forward node that recomputes an earlier node's value (the same op on the same
    inputs, a stop-gradient copy counting as its source) at that earlier node's outputs, and
    drop it. Gradient edges are already explicit, so only which forward tensors the backward
    reads changes, not which gradients it computes. Returns the number of forward nodes dropped."""
    g = training.graph
    nodes = list(g.node)
    consts = _small_constants(g)
    producer = {o: n for n in nodes for o in n.output if o}
    back = _backward(nodes)
    outputs = {o.name for o in g.output}
    canon: dict[str, str] = {}
    seen: dict[tuple, onnx.NodeProto] = {}
    dropped: set[int] = set()

    def key_of(name: str):
        name = canon.get(name, name)
        return consts.get(name, name)

    def stop_gradient_source(node: onnx.NodeProto) -> str | None:
        # x * 2**40 -> int64 -> float -> * 2**-40  (edgetta_export.ecotta.stop_gradient)
        if node.op_type != "Mul" or len(node.input) != 2:
            return None
        a, c = node.input
        if _scalar(consts, c) != 2.0 ** -40:
            return None
        to_float = producer.get(a)
        to_int = producer.get(to_float.input[0]) if _is_float_cast(to_float, TensorProto.FLOAT) else None
        scale = producer.get(to_int.input[0]) if _is_float_cast(to_int, TensorProto.INT64) else None
        if scale is None or scale.op_type != "Mul" or _scalar(consts, scale.input[1]) != 2.0 ** 40:
            return None
        return scale.input[0]

    for i, node in enumerate(nodes):
        if i in back:
            continue
        source = stop_gradient_source(node)
        if source is not None:
            canon[node.output[0]] = canon.get(source, source)
            continue
        attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
        key = (node.domain, node.op_type, attrs, tuple(key_of(x) for x in node.input))
        rep = seen.get(key)
        if rep is None:
            seen[key] = node
            continue
        mine = [(j, o) for j, o in enumerate(node.output) if o]
        if any(o in outputs for _, o in mine) or any(j >= len(rep.output) or not rep.output[j] for j, _ in mine):
            continue
        for j, o in mine:
            canon[o] = rep.output[j]
        dropped.add(i)

    kept = []
    for i, node in enumerate(nodes):
        if i in dropped:
            continue
        for j, x in enumerate(node.input):
            if x in canon:
                node.input[j] = canon[x]
        kept.append(node)
    kept = drop_unread(kept, outputs)  # the stop-gradient chains of merged twins
    removed = len(nodes) - len(kept)
    del g.node[:]
    g.node.extend(kept)
    return removed


class _Constants:
    def __init__(self, graph: onnx.GraphProto):
        self.graph, self.names = graph, {}

    def __call__(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.names:
            self.names[key] = f"edgetta.lean.const{len(self.names)}"
            self.graph.initializer.append(numpy_helper.from_array(arr, self.names[key]))
        return self.names[key]


def packing_weights(width: int) -> np.ndarray:
    """(width, width / 8) uint8: column j holds (1, 2, .., 128) at rows 8j .. 8j + 7, so that a row
    of ``width`` booleans times it is their bytes, 8 signs each, in order."""
    w = np.zeros((width, width // 8), np.uint8)
    for j in range(width // 8):
        w[8 * j:8 * j + 8, j] = 1 << np.arange(8)
    return w


def _pack_mask(y: str, zero: str, const: _Constants, nhwc: bool = False,
               band: tuple[str, str] | None = None, tag: str = ".mask", width: int = 8) -> list[onnx.NodeProto]:
    """``y > 0`` packed 8 signs to a byte: rows of ``width`` booleans times ``packing_weights``
    (one MatMulInteger; at width 64 onnxruntime's integer GEMM gets 8 output columns, not 1,
    and runs about 3x faster: docs/speed.md). With ``nhwc`` the signs are taken in NHWC
    order (see ``frozen_conv_outputs``). With ``band`` (lo, hi) the bit is ``lo < y < hi``
    instead (a Clip's input: ReLU6's gradient)."""
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=out + "_node", **kw)
    p = y + tag
    src = [n("Transpose", [y], p + ".nhwc", perm=[0, 2, 3, 1])] if nhwc else []
    x = p + ".nhwc" if nhwc else y
    test = ([n("Greater", [x, zero], p)] if band is None else
            [n("Greater", [x, band[0]], p + ".above"), n("Less", [x, band[1]], p + ".below"),
             n("And", [p + ".above", p + ".below"], p)])
    return src + test + [
        n("Cast", [p], p + "_u8", to=TensorProto.UINT8),
        n("Reshape", [p + "_u8", const([0, -1, width], np.int64)], p + "_rows"),
        n("MatMulInteger", [p + "_rows", const(packing_weights(width), np.uint8)], p + "_i32"),
        n("Cast", [p + "_i32"], p + "_bits", to=TensorProto.UINT8),
    ]


# row b of the table: the 8 bits of the byte b, bit k at column k (as _pack_mask weights them)
_BIT_TABLE = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.uint8)


def _unpack_mask(bits: str, like: str, out: str, const: _Constants, nhwc: bool = False,
                 gather: bool = True) -> list[onnx.NodeProto]:
    """Bit k of each byte as 0.0 or 1.0, shaped like ``like`` (the gradient the mask is applied
    to; with ``nhwc`` the bits are in NHWC order and are transposed back, as bytes). With
    ``gather`` each byte picks its row of a constant 256 x 8 table (one ``Gather``, about 3x
    faster than the two ``BitShift``s it replaces: docs/step_time.md). Every unpacking node
    depends on ``like``: onnxruntime runs a node as soon as its inputs exist, so an unpacking
    that read only the packed bits would run in the forward pass and hold the unpacked mask
    through the backward pass."""
    n = lambda op, ins, o, **kw: helper.make_node(op, ins, [o], name=o + "_node", **kw)
    head = [
        n("Shape", [like], out + ".batch", start=0, end=1),
        n("Concat", [out + ".batch", const([-1, 1] if not gather else [-1], np.int64)], out + ".rows", axis=0),
        n("Reshape", [bits, out + ".rows"], out + ".bits"),
    ]
    if gather:  # Gather's indices are int32 or int64
        table = _BIT_TABLE if nhwc else _BIT_TABLE.astype(np.float32)
        head += [n("Cast", [out + ".bits"], out + ".index", to=TensorProto.INT32),
                 n("Gather", [const(table, table.dtype), out + ".index"], out + (".u8" if nhwc else ".flat"), axis=0)]
    else:
        head += [n("BitShift", [out + ".bits", const((7 - np.arange(8)).reshape(1, 8), np.uint8)], out + ".high",
                   direction="LEFT"),
                 n("BitShift", [out + ".high", const(7, np.uint8)], out + ".u8", direction="RIGHT")]
        if not nhwc:
            head.append(n("Cast", [out + ".u8"], out + ".flat", to=TensorProto.FLOAT))
    head.append(n("Shape", [like], out + ".shape"))
    if not nhwc:
        return head + [n("Reshape", [out + ".flat", out + ".shape"], out)]
    return head + [
        n("Gather", [out + ".shape", const([0, 2, 3, 1], np.int64)], out + ".shape_nhwc", axis=0),
        n("Reshape", [out + ".u8", out + ".shape_nhwc"], out + ".u8_nhwc"),
        n("Transpose", [out + ".u8_nhwc"], out + ".u8_nchw", perm=[0, 3, 1, 2]),
        n("Cast", [out + ".u8_nchw"], out, to=TensorProto.FLOAT),
    ]


# a group whose values are all equal gets this range instead of 0: its step stays finite and
# every value is stored exactly as the group's minimum
_MIN_RANGE = 1e-20
_LEVELS = 254.99  # see compress_activation


@dataclass(frozen=True)
class CompressedActivation:
    """The tensors that stand for a compressed forward tensor ``source`` in the backward pass:
    ``data`` (N, C*H*W) uint8 and, one per group, ``step`` (N*C,) float and either ``zero``
    (N*C,) uint8, the zero point (rounding to nearest), or ``minimum`` (N*C, 1) float (stochastic
    rounding)."""
    source: str
    data: str
    step: str
    zero: str | None = None
    minimum: str | None = None


def compress_activation(x: str, sample_shape: list[int], const: _Constants, seed: int
                        ) -> tuple[list[onnx.NodeProto], CompressedActivation]:
    """Forward nodes storing the 4-D tensor ``x`` as 8-bit integers, one group per (sample,
    channel): ``q = floor((x - min) / step + u)``, ``step = (max - min) / 254.99``, ``u`` uniform in
    [0, 1), so each value is rounded up or down at random with the probability that makes its
    expectation exact (stochastic rounding, as ActNN does). Per-channel groups because
    channels differ in range by orders of magnitude before a BatchNorm (one channel's range
    would coarsen the others), and per sample so that a group is all one frame's values.
    The step is the range over 254.99, not 255: the top level is then at most 254.99 + u < 256
    even where division rounds up or ``u`` comes out as 1, so no clipping is needed.
    The noise ``u`` is drawn for one sample, (1, *sample_shape), and shared by the batch: each
    value is still rounded up with the probability that makes it exact, but drawing a value per
    element (``RandomUniformLike(x)``) cost more than half the overhead of compression
    (docs/compressed_activations.md). ``RandomUniform`` gets a fixed ``seed``: a session's
    steps draw different noise, two sessions (or engines) draw the same sequence."""
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=out + "_node", **kw)
    p = x + ".q8"
    c = CompressedActivation(x, p + ".bytes", p + ".step", minimum=p + ".min")
    nodes = [
        n("ReduceMin", [x], p + ".lo", axes=[2, 3], keepdims=1),
        n("ReduceMax", [x], p + ".hi", axes=[2, 3], keepdims=1),
        n("Sub", [p + ".hi", p + ".lo"], p + ".range"),
        n("Max", [p + ".range", const(_MIN_RANGE, np.float32)], p + ".range_safe"),
        n("Div", [p + ".range_safe", const(_LEVELS, np.float32)], p + ".step4"),
        n("RandomUniform", [], p + ".noise", dtype=TensorProto.FLOAT, low=0.0, high=1.0, seed=float(seed),
          shape=[1, *sample_shape]),
        n("Sub", [x, p + ".lo"], p + ".shifted"),
        n("Div", [p + ".shifted", p + ".step4"], p + ".levels"),
        n("Add", [p + ".levels", p + ".noise"], p + ".dithered"),
        n("Floor", [p + ".dithered"], p + ".floor"),
        n("Cast", [p + ".floor"], p + ".u8", to=TensorProto.UINT8),
        # kept flat: the backward's Reshape of it is then a real reshape that reads the
        # gradient (see decompress_activation)
        n("Reshape", [p + ".u8", const([0, -1], np.int64)], c.data),
        # per group, as DequantizeLinear (per axis) and the Add after it read them
        n("Reshape", [p + ".step4", const([-1], np.int64)], c.step),
        n("Reshape", [p + ".lo", const([-1, 1], np.int64)], c.minimum),
    ]
    return nodes, c


def quantize_activation(x: str, sample_shape: list[int], const: _Constants
                        ) -> tuple[list[onnx.NodeProto], CompressedActivation]:
    """Forward nodes storing the 4-D tensor ``x`` as 8-bit integers, one group per (sample,
    channel), rounded to nearest by one ``QuantizeLinear`` per axis: ``q = round(x / step) +
    zero``, ``step = (max(hi, 0) - min(lo, 0)) / 255``, ``zero = round(-min(lo, 0) / step)``: ONNX's
    asymmetric uint8 scheme (its range holds 0, so that the zero point is an integer), with
    groups as ``compress_activation`` explains. One pass over ``x`` (and the two reductions), where
    stochastic rounding takes five, and ``DequantizeLinear`` restores it in one, where stochastic
    rounding's minimum takes a second: docs/compressed_activations.md. Per element the restored
    value is within half a step of the original."""
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=out + "_node", **kw)
    p = x + ".q8"
    channels, rest = sample_shape[0], int(np.prod(sample_shape[1:]))
    c = CompressedActivation(x, p + ".bytes", p + ".step", zero=p + ".zero")
    zero = const(0.0, np.float32)
    nodes = [
        n("ReduceMin", [x], p + ".lo", axes=[2, 3], keepdims=1),
        n("ReduceMax", [x], p + ".hi", axes=[2, 3], keepdims=1),
        n("Min", [p + ".lo", zero], p + ".lo0"),
        n("Max", [p + ".hi", zero], p + ".hi0"),
        n("Sub", [p + ".hi0", p + ".lo0"], p + ".range"),
        n("Max", [p + ".range", const(_MIN_RANGE, np.float32)], p + ".range_safe"),
        n("Div", [p + ".range_safe", const(255.0, np.float32)], p + ".step4"),
        n("Div", [p + ".lo0", p + ".step4"], p + ".lo_levels"),
        n("Neg", [p + ".lo_levels"], p + ".zero_levels"),
        n("Round", [p + ".zero_levels"], p + ".zero_round"),
        n("Clip", [p + ".zero_round", zero, const(255.0, np.float32)], p + ".zero_clip"),
        n("Cast", [p + ".zero_clip"], p + ".zero4", to=TensorProto.UINT8),
        n("Reshape", [p + ".step4", const([-1], np.int64)], c.step),
        n("Reshape", [p + ".zero4", const([-1], np.int64)], c.zero),
        n("Reshape", [x, const([-1, rest], np.int64)], p + ".rows"),
        n("QuantizeLinear", [p + ".rows", c.step, c.zero], p + ".u8", axis=0),
        # kept flat, as compress_activation's
        n("Reshape", [p + ".u8", const([-1, channels * rest], np.int64)], c.data),
    ]
    return nodes, c


def decompress_activation(c: CompressedActivation, sample_shape: list[int], like: str, out: str,
                          const: _Constants) -> list[onnx.NodeProto]:
    """``q * step + min`` shaped (N, *sample_shape): within one ``step`` of the original per
    element (``DequantizeLinear`` per group, then the minimum added: two passes over the
    tensor). Its first node reads ``like``, the gradient of the node that will read ``out``:
    onnxruntime runs a node as soon as its inputs exist, so a decompression that read only
    the stored bytes would run in the forward pass and hold the float copy through the
    backward pass (as the mask unpacking, ``_unpack_mask``). A dependency on the gradient's
    shape alone does not hold: onnxruntime's optimizer infers the Reshape's output shape, sees
    a single unknown dimension, and replaces the target by a constant with -1 there, whatever
    computed it (seen in its optimized graph: every decompression ran in the forward pass). So
    the batch size is ``max(Shape(like)[0], isnan(like[0]))``, which equals ``Shape(like)[0]``
    but reads one value of the gradient, which no optimizer can know in advance."""
    n = lambda op, ins, o, **kw: helper.make_node(op, ins, [o], name=o + "_node", **kw)
    channels, rest = sample_shape[0], int(np.prod(sample_shape[1:]))
    return [
        n("Shape", [like], out + ".batch_dim", start=0, end=1),
        n("Reshape", [like, const([-1], np.int64)], out + ".grad_flat"),
        n("Slice", [out + ".grad_flat", const([0], np.int64), const([1], np.int64)], out + ".grad_first"),
        n("IsNaN", [out + ".grad_first"], out + ".grad_nan"),
        # 1 or 0 as int64 (Where, not a Cast to int64: that is the stop-gradient's pattern)
        n("Where", [out + ".grad_nan", const([1], np.int64), const([0], np.int64)], out + ".grad_dep"),
        n("Max", [out + ".batch_dim", out + ".grad_dep"], out + ".batch"),
        n("Mul", [out + ".batch", const([channels], np.int64)], out + ".groups"),
        n("Concat", [out + ".groups", const([rest], np.int64)], out + ".shape", axis=0),
        n("Reshape", [c.data, out + ".shape"], out + ".u8"),  # (N*C, H*W)
    ] + ([n("DequantizeLinear", [out + ".u8", c.step, c.zero], out + ".rows", axis=0)] if c.zero else [
        n("DequantizeLinear", [out + ".u8", c.step], out + ".scaled", axis=0),
        n("Add", [out + ".scaled", c.minimum], out + ".rows")]) + [
        n("Reshape", [out + ".rows", const([-1, *sample_shape], np.int64)], out),
    ]


def restored_rows(c: CompressedActivation, out: str) -> list[str]:
    """The float (N*C, H*W) tensors ``decompress_activation`` computes before its last Reshape
    to ``out``, whose first dimension onnxruntime cannot infer."""
    return [out + ".rows"] if c.zero else [out + ".rows", out + ".scaled"]


def frozen_conv_outputs(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from frozen convolutions by ops that onnxruntime's x86 NCHWc layout
    pass keeps in its blocked layout (their folded BatchNorms and ReLUs, residual additions
    of two such tensors, pooling).

    A node that reads such a tensor in plain NCHW gets a ``ReorderOutput``, which that pass
    creates last: onnxruntime runs the lowest-numbered ready node first, so the reorder waits
    for the rest of the forward pass, holding the blocked tensor (on ResNet-50: docs/memory.md,
    'ResNet-50 and onnxruntime's NCHWc layout'). A ``Transpose`` to NHWC is fused into a
    reorder created in place, which runs right after its conv. So masks of these tensors are
    taken in NHWC order."""
    const = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for x in set(node.input):
            readers[x] = readers.get(x, 0) + 1
    frozen: set[str] = set()
    convs: set[str] = set()  # frozen conv outputs that a per-channel Mul or Add can fuse into
    for node in graph.node:  # in topological order, as ONNX requires
        outs = [o for o in node.output if o]
        ins = [x for x in node.input if x and x not in const]
        if not ins:  # constant folding makes these initializers
            const.update(outs)
        elif node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in const:
            frozen.update(outs)
            convs.update(outs)
        elif node.op_type in ("Mul", "Add") and len(ins) == 1 and len(node.input) == 2:
            if ins[0] in convs and readers[ins[0]] == 1:  # a frozen BatchNorm the export could not fold
                frozen.update(outs)
                convs.update(outs)
        elif node.op_type in ("Relu", "Add", "Sum", "MaxPool", "AveragePool", "BatchNormalization"):
            if all(x in frozen for x in ins):
                frozen.update(outs)
    return frozen


def merge_weight_gradients(training: onnx.ModelProto) -> int:
    """One weight gradient per trainable conv, from the sum of its gradients. A meta conv has two
    ConvGrads after ``merge_stop_gradient_twins``: the main backward pass's (dX and dW) and the
    regularizer term's (dW only, of its stop-gradient copy), on the same input and weights, and
    a Sum adds their dWs. dW is linear in dY, so one ConvGrad of the summed dYs gives that Sum's
    value, and the main ConvGrad keeps only dX (make_lean then writes it as a Conv of the
    flipped weights at stride 1, else a ConvTranspose: neither reads a kept input). One dW pass
    fewer per meta conv; the regularizer's dY is held from the forward pass to the backward, and
    its share of dW reads the kept input as the main term's does (docs/speed.md).
    Returns the number of weight gradients merged."""
    g = training.graph
    nodes = list(g.node)
    main = _backward(nodes, "logits_grad")
    graph_inputs = {i.name for i in g.input}
    grads: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op_type == "ConvGrad" and n.domain == "com.microsoft" and len(n.output) == 2 and n.output[1]:
            grads.setdefault(n.input[2], []).append(i)
    readers = _readers(nodes)
    replace: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for w, pair in grads.items():
        if len(pair) != 2:
            continue
        a, b = sorted(pair, key=lambda i: i in main)  # b: the main backward pass's
        ga, gb = nodes[a], nodes[b]
        if b not in main or a in main or ga.input[1] != gb.input[1] or ga.output[0] or node_attrs(ga) != node_attrs(gb):
            continue
        if gb.input[1] in graph_inputs:
            # the first meta conv reads the image: its dW is cheap (3 input channels), and its
            # regularizer dY, the largest, would be held through the whole backward pass
            # (the profiler's estimate of the step's peak, ResNet-50 at 224: +196 MiB with it merged)
            continue
        sums = [j for j in readers.get(ga.output[1], []) if nodes[j].op_type == "Sum"]
        if len(sums) != 1 or sorted(nodes[sums[0]].input) != sorted([ga.output[1], gb.output[1]]) \
                or len(readers.get(gb.output[1], [])) != 1:
            continue
        total = nodes[sums[0]].output[0]
        dy = f"{gb.input[0]}.with_regularizer_grad"
        merged = helper.make_node("ConvGrad", [dy, gb.input[1], w], ["", total], name=f"{gb.name}_merged_weight",
                                  domain="com.microsoft")
        merged.attribute.extend(gb.attribute)
        replace[b] = [helper.make_node("Add", [gb.input[0], ga.input[0]], [dy], name=f"{gb.name}_with_regularizer"),
                      merged]
        if gb.output[0]:
            input_grad = helper.make_node("ConvGrad", list(gb.input), [gb.output[0], ""], name=gb.name,
                                          domain="com.microsoft")
            input_grad.attribute.extend(gb.attribute)
            replace[b].insert(0, input_grad)
        dropped |= {a, sums[0]}
    if not replace:
        return 0
    out: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        if i not in dropped:
            out.extend(replace.get(i, [n]))
    del g.node[:]
    g.node.extend(out)
    return len(replace)


def _readers(nodes: list[onnx.NodeProto]) -> dict[str, list[int]]:
    """The indices of the nodes that read each tensor."""
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            readers.setdefault(x, []).append(i)
    return readers


def _ancestors(nodes: list[onnx.NodeProto], outputs: list[str]) -> set[int]:
    """The nodes that ``outputs`` depend on."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    stack = [producer[o] for o in outputs if o in producer]
    needed: set[int] = set()
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(producer[x] for x in nodes[i].input if x in producer)
    return needed


def regularizer_backward_early(training: onnx.ModelProto, main_seed: str = "logits_grad",
                               chain: str = "logits", freeing_first: bool = False) -> int:
    """Place every node that is neither on the way to the logits nor reached by the entropy
    term's gradient right after the last node it depends on: the regularizer's terms and their
    backward (whose upstream gradient is the constant d loss / d loss), the BatchNorm statistics
    outputs, the loss sum. Each regularizer term is then computed and differentiated during the
    forward pass, as soon as its meta network has run: what only it reads (the L1 term's
    difference and sign) is freed at once, and no regularizer gradient is held through the
    backward pass. onnxruntime runs ready nodes early anyway; placing them there makes the
    graph's order say so, which the profiler's liveness pass follows. Returns the number of
    nodes placed early.

    With ``freeing_first``, among the early nodes ready at once those that end the life of a
    full-size tensor go first: reductions (the L1 term's mean frees |d|), and the chain to each
    BatchNorm gradient whose input gradient nothing reads (the regularizer's gradient of a meta
    network's BatchNorm on the frozen output h_k: the stop-gradient input takes none). That
    BatchNorm gradient is the last reader of h_k and of the L1 term's gradient, so running it
    before the conv branch's gradients frees both before the branch's temporaries exist."""
    g = training.graph
    nodes = list(g.node)
    forward = _ancestors(nodes, [chain])
    main = _backward(nodes, main_seed)
    early = set(range(len(nodes))) - forward - main
    first: set[int] = set()
    if freeing_first:
        read = {x for n in nodes for x in n.input} | {o.name for o in g.output}
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        stack = [i for i in early if nodes[i].op_type == "BatchNormalizationGrad" and nodes[i].output[0] not in read]
        while stack:
            i = stack.pop()
            if i not in first:
                first.add(i)
                stack.extend(producer[x] for x in nodes[i].input if producer.get(x) in early)
        first.update(i for i in early if nodes[i].op_type.startswith("Reduce"))
    key = lambda i: (i not in first, i)
    avail = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    waiting_on: dict[str, list[int]] = {}
    missing: dict[int, int] = {}
    ready: list[int] = []
    for i in early:
        need = {x for x in nodes[i].input if x not in avail}
        missing[i] = len(need)
        for x in need:
            waiting_on.setdefault(x, []).append(i)
        if not need:
            ready.append(key(i))
    heapq.heapify(ready)
    order: list[onnx.NodeProto] = []

    def place(i: int) -> None:
        order.append(nodes[i])
        for o in nodes[i].output:
            if o and o not in avail:
                avail.add(o)
                for j in waiting_on.pop(o, []):
                    missing[j] -= 1
                    if missing[j] == 0:
                        heapq.heappush(ready, key(j))

    def flush() -> None:
        while ready:
            place(heapq.heappop(ready)[1])

    flush()
    for i in [i for i in range(len(nodes)) if i in forward] + sorted(main):
        place(i)
        flush()
    if len(order) != len(nodes):
        raise ValueError("regularizer_backward_early: could not place every node")
    del g.node[:]
    g.node.extend(order)
    return len(early)


def meta_branches_late(training: onnx.ModelProto, sample: dict[str, list[int]],
                       const: Callable[[Any, Any], str], chain: str = "logits") -> int:
    """Run each meta network's conv (a forward Conv whose weights are a graph input) after its
    frozen part: its input x_{k-1} goes through ``Reshape(x_{k-1}, Shape(b) * 0)``, with b the
    other input of the Add that joins the branch (the meta BatchNorm of the part's output h_k).
    A shape of zeros copies every dimension, so the Reshape changes nothing and copies nothing
    (onnxruntime aliases it), but the conv now depends on the frozen part: ONNX has no control
    edges, and the node order alone does not hold on x86-64, where onnxruntime's NCHWc pass
    re-creates every frozen conv with a later node index and its priority-based order then runs
    any older ready node, such as this conv, first.

    Unmoved, ``ReLU(BN(Conv(x_{k-1})))`` ran as soon as x_{k-1} existed, and its conv output
    (kept float for the regularizer's BatchNorm gradient) and its output (waiting for the Add)
    were held through the whole frozen part. What is held instead is x_{k-1} (for the first meta
    network, the network's input, held anyway). The conv is also placed right before the Add.
    ``sample``: per-sample dimensions by tensor name, for the reshaped input's declared shape;
    ``const(value, dtype)`` names a constant of the graph. Returns the number of convs made late."""
    g = training.graph
    nodes = list(g.node)
    forward = _ancestors(nodes, [chain])
    inputs = {i.name for i in g.input}
    batch = next((i.type.tensor_type.shape.dim[0] for i in g.input if i.name == "input"), None)
    readers = _readers(nodes)
    late: dict[int, tuple[int, str]] = {}  # meta conv -> (the Add it goes before, that Add's other input)
    for i, n in enumerate(nodes):
        if i not in forward or n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inputs:
            continue
        derived, stack, joins = {n.output[0]}, [i], []
        while stack:
            for o in nodes[stack.pop()].output:
                for j in readers.get(o, []):
                    if j in forward and j not in joins:
                        if nodes[j].op_type == "Add":
                            joins.append(j)
                        elif not set(nodes[j].output) <= derived:
                            derived.update(x for x in nodes[j].output if x)
                            stack.append(j)
        joins = [j for j in joins if j > i and sum(x in derived for x in nodes[j].input) == 1]
        if joins:
            join = min(joins)
            late[i] = (join, next(x for x in nodes[join].input if x not in derived))
    if not late:
        return 0
    zeros = const(0, np.int64)
    goes_before: dict[int, list[onnx.NodeProto]] = {}
    for conv, (join, other) in late.items():
        node = nodes[conv]
        x = node.input[0]
        tag = f"{x}.after_part{conv}"
        goes_before.setdefault(join, []).extend([
            helper.make_node("Shape", [other], [tag + ".shape"], name=tag + ".shape_node"),
            helper.make_node("Mul", [tag + ".shape", zeros], [tag + ".keep"], name=tag + ".keep_node"),
            helper.make_node("Reshape", [x, tag + ".keep"], [tag], name=tag + "_node"),
            node])
        node.input[0] = tag
        if x in sample and batch is not None:  # the same shape, so that the planner knows it
            vi = helper.make_tensor_value_info(tag, TensorProto.FLOAT, [None, *sample[x]])
            vi.type.tensor_type.shape.dim[0].CopyFrom(batch)
            g.value_info.append(vi)
    placed = []
    for i, n in enumerate(nodes):
        placed.extend(goes_before.get(i, []))
        if i not in late:
            placed.append(n)
    del g.node[:]
    g.node.extend(topological_order(placed))  # the branch's other nodes follow their conv
    return len(late)


def _constant_value(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], name: str) -> float | None:
    for init in graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in nodes:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(node_attrs(node)["value"]).reshape(-1)[0])
    return None


def clip_gradient_masks(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]
                        ) -> dict[int, tuple[str, str, float, float]]:
    """onnxruntime-training differentiates ``Clip(x, lo, hi)`` (ReLU6) as
    ``Mul(dY, Cast(And(x >= lo, x <= hi)))``, which keeps ``x`` (4 bytes) until the backward
    pass. Returns, per such Mul (by index): (dY, x, lo, hi)."""
    producer = {o: n for n in nodes for o in n.output if o}
    clips = {n.input[0] for n in nodes if n.op_type == "Clip"}
    found = {}
    for i, node in enumerate(nodes):
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for dy, m in (node.input, node.input[::-1]):
            cast = producer.get(m)
            both = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
            if both is None or both.op_type != "And":
                continue
            ge, le = (producer.get(x) for x in both.input)
            if (ge is None or le is None or ge.op_type != "GreaterOrEqual" or le.op_type != "LessOrEqual"
                    or ge.input[0] != le.input[0] or ge.input[0] not in clips):
                continue
            lo, hi = (_constant_value(graph, nodes, c.input[1]) for c in (ge, le))
            if lo is not None and hi is not None:
                found[i] = (dy, ge.input[0], lo, hi)
                break
    return found


def l1_gradient_in_place(nodes: list[onnx.NodeProto], outputs: set[str]) -> tuple[list[onnx.NodeProto], int]:
    """The regularizer's terms ``mean |d|`` are differentiated as ``Mul(Expand(g, Shape(|d|)),
    Sign(d))``: a full-size tensor of one repeated value, at the widest meta network's size, at the
    step's peak (docs/workspace.md). ``Mul(Sign(d), g)`` broadcasts the same scalar: the same
    products, one tensor fewer. And the forward ``ReduceMean`` of ``|d|`` is placed right after
    the ``Abs``, so that ``|d|`` is freed at once rather than after the term's whole gradient
    (onnxruntime runs ready nodes in the graph's order). Returns the nodes and how many terms."""
    producer = {o: n for n in nodes for o in n.output if o}
    readers: dict[str, int] = {}
    for n in nodes:
        for x in set(n.input):
            readers[x] = readers.get(x, 0) + 1
    moved: dict[int, onnx.NodeProto] = {}  # id of an Abs -> the ReduceMean to place after it
    count = 0
    for node in nodes:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for a, b in (node.input, node.input[::-1]):
            expand, sign = producer.get(a), producer.get(b)
            if (expand is None or sign is None or expand.op_type != "Expand" or sign.op_type != "Sign"
                    or readers.get(a) != 1):
                continue
            shape = producer.get(expand.input[1])
            absolute = producer.get(shape.input[0]) if shape is not None and shape.op_type == "Shape" else None
            if absolute is None or absolute.op_type != "Abs" or absolute.input[0] != sign.input[0]:
                continue
            del node.input[:]
            node.input.extend([b, expand.input[0]])
            count += 1
            means = [n for n in nodes if n.op_type == "ReduceMean" and list(n.input) == [absolute.output[0]]]
            if len(means) == 1:
                moved[id(absolute)] = means[0]
            break
    if not count:
        return nodes, 0
    placed = {id(n) for n in moved.values()}
    out = []
    for n in nodes:
        if id(n) in placed:
            continue
        out.append(n)
        if id(n) in moved:
            out.append(moved[id(n)])
    return drop_unread(out, outputs), count


def stats_from_batchnorms(nodes: list[onnx.NodeProto], const: "_Constants") -> int:
    """The meta BatchNorms' batch statistics that the graph outputs for the device's running
    statistics (export/ecotta.py: a mean and a biased variance by ReduceMeans, passes of their
    own over the BatchNorm's full-size input) taken from what the training-mode BatchNorm
    computes anyway: its saved mean, and ``1 / inv_std**2 - epsilon`` for the variance (clipped
    at 0). The same values up to float rounding, relative to var + epsilon. In place; returns how
    many statistics."""
    def axes(n: onnx.NodeProto) -> tuple[list[int], int]:
        a = node_attrs(n)
        return sorted(a.get("axes", [])), a.get("keepdims", 1)

    producer = {o: n for n in nodes for o in n.output if o}
    norms = {n.input[0]: n for n in nodes if n.op_type == "BatchNormInternal" and len(n.output) >= 5
             and n.output[3] and n.output[4]}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(nodes):
        if node.op_type != "ReduceMean" or len(node.input) != 1 or axes(node) != ([0, 2, 3], 0):
            continue
        x = node.input[0]
        if x in norms:  # the mean
            replaced[i] = [helper.make_node("Identity", [norms[x].output[3]], list(node.output), name=node.name)]
            continue
        sq = producer.get(x)  # the variance: mean((x - mean(x))**2)
        if sq is None or sq.op_type != "Mul" or sq.input[0] != sq.input[1]:
            continue
        d = producer.get(sq.input[0])
        m = producer.get(d.input[1]) if d is not None and d.op_type == "Sub" else None
        if (m is None or m.op_type != "ReduceMean" or axes(m)[0] != [0, 2, 3] or m.input[0] != d.input[0]
                or d.input[0] not in norms):
            continue
        bn = norms[d.input[0]]
        eps = float(node_attrs(bn).get("epsilon", 1e-5))
        p = node.output[0] + ".from_inv_std"
        replaced[i] = [
            helper.make_node("Mul", [bn.output[4], bn.output[4]], [p + ".inv_var"], name=p + ".inv_var_node"),
            helper.make_node("Reciprocal", [p + ".inv_var"], [p + ".var_eps"], name=p + ".var_eps_node"),
            helper.make_node("Sub", [p + ".var_eps", const(eps, np.float32)], [p + ".var"], name=p + ".var_node"),
            helper.make_node("Max", [p + ".var", const(0.0, np.float32)], list(node.output), name=node.name),
        ]
    nodes[:] = topological_order([m for i, n in enumerate(nodes) for m in replaced.get(i, [n])])
    return len(replaced)


# 2**126: any normal float32 times it is at least 1 in magnitude (exactly, a power of two)
_SIGN_GAIN = float(2.0 ** 126)


def cheaper_elementwise(nodes: list[onnx.NodeProto], consts: dict[str, tuple], const: "_Constants") -> dict[str, int]:
    """Elementwise ops and reductions that onnxruntime's CPU kernels run far slower than the ops
    they equal (measured: docs/speed.md), rewritten in place. ``Pow(d, 2)``, the batch-statistics
    BatchNorms' variances (export/ecotta.py), as ``Mul(d, d)``: its Pow calls the general power
    function per element. ``Sign(d)``, the regularizer's L1 gradient, as
    ``Clip(d * 2**126, -1, 1)``: the same value for every normal float and zero (a subnormal
    gives a magnitude below 1; none reach it from a meta network's output). ``ReduceMean`` over
    (N, H, W), the BatchNorms' batch statistics, as one over (H, W) and then one over N: the same
    mean up to float rounding, and onnxruntime's reduction over the contiguous (H, W) first is
    about twice as fast at 32 x 32. Returns how many of each."""
    count = {"squares_as_mul": 0, "signs_as_clip": 0, "batch_means_in_two": 0}
    out: list[onnx.NodeProto] = []
    for node in nodes:
        name = node.name or node.output[0] + "_node"
        if node.domain not in ("", "ai.onnx"):
            out.append(node)
        elif node.op_type == "Pow" and _scalar(consts, node.input[1]) == 2.0:
            out.append(helper.make_node("Mul", [node.input[0], node.input[0]], list(node.output), name=name))
            count["squares_as_mul"] += 1
        elif (node.op_type == "ReduceMean" and len(node.input) == 1
              and sorted(node_attrs(node).get("axes", [])) == [0, 2, 3]):
            spatial = node.output[0] + ".spatial"
            out += [helper.make_node("ReduceMean", [node.input[0]], [spatial], name=spatial + "_node",
                                     axes=[2, 3], keepdims=1),
                    helper.make_node("ReduceMean", [spatial], list(node.output), name=name, axes=[0, 2, 3],
                                     keepdims=node_attrs(node).get("keepdims", 1))]
            count["batch_means_in_two"] += 1
        elif node.op_type == "Sign":
            scaled = node.output[0] + ".scaled"
            out += [helper.make_node("Mul", [node.input[0], const(_SIGN_GAIN, np.float32)], [scaled],
                                     name=scaled + "_node"),
                    helper.make_node("Clip", [scaled, const(-1.0, np.float32), const(1.0, np.float32)],
                                     list(node.output), name=name)]
            count["signs_as_clip"] += 1
        else:
            out.append(node)
    nodes[:] = out
    return count


def affines_as_batchnorm(nodes: list[onnx.NodeProto], dims: dict[str, list[int | None]],
                         consts: dict[str, tuple], const: "_Constants", outputs: set[str]) -> int:
    """``x * Reshape(s, [1, -1, 1, 1]) + Reshape(b, [1, -1, 1, 1])`` with ``s`` and ``b`` (C,)
    vectors, where nothing else reads the product, as one inference-mode
    ``BatchNormalization(x, s, b, mean 0, var 1, epsilon 0)``, in place: the batch-statistics
    BatchNorms of the frozen backbone (export/ecotta.py's ``BatchStatNorm`` computes its scale
    and shift from the batch and applies them so). One pass over x where the Mul and the Add
    made two, and the same values: the kernel's scale is s / sqrt(1 + 0) = s and its shift
    b - 0 * s = b. Whatever else reads s or b (the backward pass's Mul gradient reads the
    reshaped s) keeps reading them. ``dims`` gives tensors' inferred dimensions (None where
    unknown)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict[str, int] = {}
    for n in nodes:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1

    def channel_vector(name: str, channels: int) -> str | None:
        r = nodes[producer[name]] if name in producer else None
        if r is None or r.op_type != "Reshape" or len(r.input) != 2 or r.input[1] not in consts:
            return None
        _, dtype, _, raw = consts[r.input[1]]
        if np.frombuffer(raw, dtype=np.dtype(dtype)).tolist() not in ([1, -1, 1, 1], [1, channels, 1, 1]):
            return None
        return r.input[0] if dims.get(r.input[0]) == [channels] else None

    def affine(add: onnx.NodeProto) -> tuple[int, onnx.NodeProto] | None:
        for j in (0, 1):
            m_at = producer.get(add.input[j])
            m = nodes[m_at] if m_at is not None else None
            if (m is None or m.op_type != "Mul" or m.domain not in ("", "ai.onnx")
                    or readers.get(m.output[0]) != 1 or m.output[0] in outputs):
                continue
            for k in (0, 1):
                x = m.input[k]
                shape = dims.get(x)
                if shape is None or len(shape) != 4 or shape[1] is None:
                    continue
                c = shape[1]
                scale, shift = channel_vector(m.input[1 - k], c), channel_vector(add.input[1 - j], c)
                if scale is not None and shift is not None:
                    zeros, ones = const(np.zeros(c), np.float32), const(np.ones(c), np.float32)
                    return m_at, helper.make_node("BatchNormalization", [x, scale, shift, zeros, ones],
                                                  list(add.output), name=(add.name or add.output[0]) + "_affine",
                                                  epsilon=0.0)
        return None

    dropped: set[int] = set()
    for i, node in enumerate(nodes):
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            found = affine(node)
            if found is not None:
                dropped.add(found[0])
                nodes[i] = found[1]
    nodes[:] = [n for i, n in enumerate(nodes) if i not in dropped]
    return len(dropped)


def ort_inferred_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, list[int | str | None]]]:
    """The element type and shape onnxruntime infers for the tensors ``names`` of ``model`` (its
    own shape inference, which knows its training ops): an int per known dimension, the
    symbol's name per symbolic one, None per unknown one. Made by exposing the tensors as
    outputs of an unoptimized session, which is created but never run."""
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model)
    listed = {o.name for o in m.graph.output}
    for name in names:
        if name not in listed:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
            listed.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    types = {f"tensor({TensorProto.DataType.Name(t).lower()})": t for t in
             (TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.INT64,
              TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.FLOAT16)}
    wanted = set(names)
    return {o.name: (types[o.type], list(o.shape)) for o in sess.get_outputs()
            if o.name in wanted and o.type in types and o.shape is not None}


def separate_backward_buffers(training: onnx.ModelProto, seed: str = "logits_grad",
                              batch_input: str = "input") -> int:
    """Declare the batch dimension of every tensor of the main backward pass (the nodes reached
    from ``seed``) as a symbol of its own, ``edgetta_backward_batch``, where onnxruntime infers
    it as the input's batch symbol (or already as that symbol, from tensors declared so). Returns
    how many tensors were declared.

    onnxruntime's allocation planner hands a freed buffer on to a later tensor of the same
    static shape, symbol for symbol, and keeps that buffer allocated from its first tensor to
    its last, the gap between included. The backward pass ends at the widest meta network, whose
    tensors have the shapes of the high-resolution forward pass: they took the forward pass's
    buffers of those shapes, which then stayed allocated through the whole step, unused
    (docs/workspace.md). With a symbol of its own the backward pass's tensors share buffers only
    with each other, and a forward buffer is freed after its last forward reader. The declared
    shapes are true (every such dimension is the batch size): only what the planner can prove
    equal changes."""
    g = training.graph
    nodes = list(g.node)
    back = _backward(nodes, seed)
    names = list(dict.fromkeys(o for i in sorted(back) for o in nodes[i].output if o))
    batch_dims = [d for i in g.input if i.name == batch_input for d in i.type.tensor_type.shape.dim[:1]]
    if not names or not batch_dims or not batch_dims[0].dim_param:
        return 0
    batch = batch_dims[0].dim_param
    shapes = ort_inferred_shapes(training, names)
    declared = {vi.name: vi for vi in g.value_info}
    count = 0
    for name in names:
        elem, shape = shapes.get(name, (None, None))
        if not shape or not {batch, BACKWARD_BATCH} & set(shape):  # not batched, or no symbol known
            continue
        dims = [BACKWARD_BATCH if d == batch else d for d in shape]
        vi = declared.get(name)
        new = helper.make_tensor_value_info(name, elem, dims)
        if vi is None:
            g.value_info.append(new)
        else:
            vi.CopyFrom(new)
        count += 1
    return count


@dataclass(frozen=True)
class LeanOptions:
    """The speed and memory rewrites of the lean graph and the portable step, on by default; off
    reproduces the graphs before them (for measuring against them: benchmarks/step_profile.py,
    benchmarks/step_memory.py). Without the lean graph (``export_bundle(lean=False)``) none
    applies."""
    # frozen convs' input gradients at stride 1 as a Conv of dY with flipped, channel-swapped
    # kernels (an export-time copy of the weights) instead of ConvTranspose; off, only
    # depthwise ones at stride 1 are (as before)
    conv_input_gradients: bool = True
    # bit-packed masks unpacked by one Gather from a 256 x 8 table instead of two BitShifts
    gather_unpack: bool = True
    # the portable step (export/portable.py): meta conv weight gradients as one MatMul per kernel
    # offset, stride-1 meta input gradients as a Conv of flipped kernels, BatchNorm gradients
    # with one full-size pass fewer; off, as before (a Conv of transposed tensors, ConvTranspose)
    portable_gradients: bool = True
    # the meta networks' kept inputs (what the backward pass's BatchNorm and conv weight
    # gradients read) stored as integers of this many bits per (sample, channel) with stochastic
    # rounding, decompressed where the gradient reads them (``compress_activation``); None keeps
    # them float32 (exact gradients: compare against torch with it off). Only 8 is implemented.
    # On by default: accuracy unchanged within 0.3 points (docs/compressed_activations.md).
    activation_bits: int | None = 8
    # how they are rounded: "nearest" (``quantize_activation``: one QuantizeLinear, one
    # DequantizeLinear) or "stochastic" (``compress_activation``, ActNN's unbiased rounding:
    # five passes to store, two to restore)
    activation_rounding: str = "nearest"
    # ReLU masks packed from rows of 64 signs (8 bytes) per MatMulInteger rather than 8, where a
    # sample's size allows (``_pack_mask``); the same bytes
    wide_mask_packing: bool = True
    # the shapes of the main backward pass's unpacked masks declared with the backward batch
    # symbol (onnxruntime cannot infer them through the Reshape to the gradient's batch), so that
    # its planner hands them buffers freed earlier in the step instead of fresh allocations;
    # without an arena each fresh allocation is page-faulted in (docs/speed.md)
    declared_unpack_shapes: bool = True
    # and the float rows each kept input is restored into, with a symbol per channel count and
    # meta network, so that the restored inputs of one meta network share a buffer (docs/speed.md)
    declared_restored_rows: bool = True
    # the main backward pass's tensors get a batch symbol of their own, so that onnxruntime's
    # allocation planner does not hand them the forward pass's buffers, which then stay allocated
    # through the whole step (``separate_backward_buffers``). On by default: the same gradients,
    # the step's memory -29% on ResNet-50 at 224 for +5% CPU time (docs/workspace.md).
    separate_backward_buffers: bool = True
    # the regularizer's L1 gradients without a full-size Expand of their scalar, and its forward
    # mean right after |d| (``l1_gradient_in_place``); on by default, the same gradients
    l1_gradient_in_place: bool = True
    # elementwise work in cheaper kernels: Pow(d, 2) as Mul(d, d), Sign as a Mul and a Clip
    # (``cheaper_elementwise``), the frozen backbone's batch-statistics scale-and-shift as one
    # BatchNormalization (``affines_as_batchnorm``); on by default, the same values
    fast_elementwise: bool = True
    # one weight gradient per meta conv from the sum of the main pass's and the regularizer's
    # output gradients (``merge_weight_gradients``), instead of one per term added afterwards:
    # one dW pass fewer per meta conv, its dX apart (at stride 1 a Conv of flipped kernels). With
    # float32 kept inputs the same gradient to float rounding; with compressed ones the
    # regularizer's share reads the 8-bit kept input too, as the main term's does. On by
    # default: accuracy unchanged within 0.3 points (docs/speed.md)
    merged_weight_gradients: bool = True
    # an order that frees full-size tensors sooner: each meta network's conv branch waits for
    # the end of its frozen part (``meta_branches_late``: a no-op Reshape that depends on it),
    # and the regularizer's reductions and meta BatchNorm gradient come before its conv branch's
    # gradients (``regularizer_backward_early(freeing_first=True)``). Bit-identical results
    memory_order: bool = True

    def __post_init__(self) -> None:
        if self.activation_bits not in (None, 8):
            raise ValueError(f"activation_bits must be 8 or None, got {self.activation_bits!r}")
        if self.activation_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"activation_rounding must be 'nearest' or 'stochastic', got {self.activation_rounding!r}")


def flipped_weights(w: np.ndarray, group: int) -> np.ndarray:
    """The kernels of the Conv that computes a stride-1 conv's input gradient: for each group,
    its (C_out/g, C_in/g) channel axes swapped, and every spatial axis reversed."""
    c_out, c_in_g, *k = w.shape
    w = w.reshape(group, c_out // group, c_in_g, *k).swapaxes(1, 2).reshape(group * c_in_g, c_out // group, *k)
    return np.ascontiguousarray(np.flip(w, axis=tuple(range(2, w.ndim))))


def runtime_flipped_conv(dy: str, w: str, out: str, name: str, kernel: list[int], pads: list[int],
                         dilations: list[int], const: Callable[[Any, Any], str]) -> list[onnx.NodeProto]:
    """dX of a stride-1, ungrouped conv whose weights ``w`` are a graph input (a meta network's,
    which change every step): a Conv of dY with the kernels flipped and their channel axes
    swapped inside the graph, by a Slice and a Transpose of the small weight tensor. ``pads``:
    the Conv's, what the forward conv's leave of the dilated kernel; ``const(value, dtype)``
    names a constant of the graph."""
    nd = len(kernel)
    axes = list(range(2, 2 + nd))
    flipped, swapped = f"{name}.flipped", f"{name}.swapped"
    i64 = np.int64
    return [helper.make_node("Slice", [w, const([-1] * nd, i64), const([-(2 ** 63)] * nd, i64), const(axes, i64),
                                       const([-1] * nd, i64)], [flipped], name=flipped + "_node"),
            helper.make_node("Transpose", [flipped], [swapped], name=swapped + "_node", perm=[1, 0, *axes]),
            helper.make_node("Conv", [dy, swapped], [out], name=name, kernel_shape=kernel, pads=pads,
                             dilations=dilations)]


def frozen_weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Conv-shaped (3-D or more) initializers by name, and by the outputs of ``Identity`` nodes
    that read them (the TorchScript exporter ties equal initializers that way)."""
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) >= 3}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
    return found


def make_lean(training: onnx.ModelProto, forward: onnx.ModelProto, bit_masks: bool = True,
              nhwc_masks: bool = True, options: LeanOptions = LeanOptions()) -> dict[str, int]:
    """Rewrite ``training`` in place; ``forward`` (the graph before artifacts were generated)
    gives the sizes of forward tensors. ``bit_masks`` packs each ReLU mask 8 signs to a byte
    (where a sample's size is a multiple of 8; else one byte per sign, applied with ``Where``).
    ``nhwc_masks`` takes the packed masks of frozen convs' outputs in NHWC order, for
    onnxruntime's x86 NCHWc layout (``frozen_conv_outputs``); where that layout does not exist
    (ARM) it only adds two transposes. Returns how many nodes were rewritten."""
    twins = merge_stop_gradient_twins(training)
    merged = merge_weight_gradients(training) if options.merged_weight_gradients else 0
    moved = regularizer_backward_early(training)
    # the forward graph's shapes, inferred once for every size map below
    dims = inferred_dims(onnx.shape_inference.infer_shapes(forward).graph)
    spatial = _spatial(dims)
    sample = _per_sample(dims)
    per_sample = {name: int(np.prod(d)) for name, d in sample.items()}
    consts = _Constants(training.graph)
    before: dict[int, list[onnx.NodeProto]] = {}
    bits = 0
    nodes = list(training.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    zero = "edgetta.lean.zero"
    training.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
    after: dict[int, list[onnx.NodeProto]] = {}
    masks: dict[str, str] = {}
    nhwc = frozen_conv_outputs(training.graph) if nhwc_masks else set()
    clip_muls = clip_gradient_masks(training.graph, nodes)
    weights = frozen_weights(training.graph)
    added: set[str] = set()
    # the meta networks' kept inputs: what the main backward pass's BatchNorm gradients (X) and
    # conv weight gradients (X) read. Early readers (the regularizer's gradients, placed in the
    # forward pass) keep the exact float; the network's input is the caller's, held anyway.
    main_backward = _backward(nodes, "logits_grad")
    main = main_backward if options.activation_bits else set()
    shapes = {name: d for name, d in sample.items() if len(d) == 3}  # (C, H, W) of 4-D tensors
    compressed: dict[str, CompressedActivation] = {}
    compressed_bytes = 0

    def compress(i: int, node: onnx.NodeProto) -> None:
        nonlocal compressed_bytes
        x, dy = node.input[1], node.input[0]
        if i not in main or x not in producer or x not in shapes:
            return
        if x not in compressed:
            fwd, compressed[x] = (quantize_activation(x, shapes[x], consts) if options.activation_rounding == "nearest"
                                  else compress_activation(x, shapes[x], consts, seed=len(compressed) + 1))
            after.setdefault(producer[x], []).extend(fwd)
            compressed_bytes += int(np.prod(shapes[x]))
        out = f"{x}.q8.restored{i}"
        before.setdefault(i, []).extend(decompress_activation(compressed[x], shapes[x], dy, out, consts))
        node.input[1] = out
        # its shape, for the portable step's rewrite of the gradient node (make_portable); with the
        # backward batch symbol, onnxruntime knows the shapes computed from it, and its planner
        # reuses freed buffers for them rather than allocating afresh (declared_unpack_shapes)
        batch = BACKWARD_BATCH if options.declared_unpack_shapes and options.separate_backward_buffers else None
        training.graph.value_info.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, *shapes[x]]))
        if batch is not None and options.declared_restored_rows and len(node.input) > 2:
            # the float rows (N*C, H*W) that ``out`` reshapes in place: inferred as (?, H*W),
            # each was a fresh allocation. Declared with a symbol per channel count and meta
            # network (the owner of the weight the gradient node reads), a restored input takes
            # the buffer of an earlier one of its size in the same network's backward pass;
            # across networks the buffer would stay allocated through the frozen parts' backward
            # between them, at the step's peak on ResNet-50 (docs/speed.md)
            owner = node.input[2].rsplit(".", 2)[0]
            rows = [f"{batch}_x{shapes[x][0]}_{owner}", int(np.prod(shapes[x][1:]))]
            training.graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, rows)
                                             for name in restored_rows(compressed[x], out))

    def pack_width(x: str) -> int:
        return 64 if options.wide_mask_packing and per_sample.get(x, 1) % 64 == 0 else 8

    convs = relus = transposed = clipped = depthwise = to_conv = flipped_bytes = meta_inputs = 0
    graph_inputs = {i.name for i in training.graph.input}  # a conv weight among them is a meta network's
    for i, node in enumerate(nodes):
        if i in clip_muls:  # ReLU6: one bit, lo < x < hi (torch's hardtanh gradient is strict too)
            dy, x, lo, hi = clip_muls[i]
            packed = bit_masks and per_sample.get(x, 1) % 8 == 0
            in_nhwc = packed and x in nhwc and x in spatial
            key = x + ".band"
            if key not in masks:
                band = (consts(lo, np.float32), consts(hi, np.float32))
                masks[key] = x + ".band" + ("_bits" if packed else "")
                after.setdefault(producer.get(x, -1), []).extend(
                    _pack_mask(x, zero, consts, in_nhwc, band, ".band", width=pack_width(x)) if packed else
                    _pack_mask(x, zero, consts, False, band, ".band")[:3])
                bits += packed
                transposed += in_nhwc
            mask = masks[key]
            name = (node.name or f"clipgrad{i}") + "_lean"
            if packed:
                mask = f"{x}.band.unpacked{i}"
                before.setdefault(i, []).extend(_unpack_mask(masks[key], dy, mask, consts, in_nhwc,
                                                             options.gather_unpack))
                nodes[i] = helper.make_node("Mul", [dy, mask], [node.output[0]], name=name)
            else:
                nodes[i] = helper.make_node("Where", [mask, dy, zero], [node.output[0]], name=name)
            clipped += 1
            continue
        if node.op_type == "ConvGrad" and node.domain == "com.microsoft":
            wants_weight = len(node.output) > 1 and node.output[1] != ""
            wants_bias = len(node.output) > 2 and node.output[2] != ""
            x = node.input[1]
            if wants_weight or wants_bias:
                compress(i, node)
                continue
            a = node_attrs(node)
            k = list(a["kernel_shape"])
            nd = len(k)
            strides = list(a.get("strides", [1] * nd))
            pads = list(a.get("pads", [0] * 2 * nd))
            dil = list(a.get("dilations", [1] * nd))
            group, w = a.get("group", 1), weights.get(node.input[2])
            name = (node.name or f"convgrad{i}") + "_lean"
            # at stride 1, dX is dY correlated with the flipped kernels, channels swapped group
            # by group: a Conv, which onnxruntime's CPU kernels run faster than ConvTranspose
            # (measured: docs/step_time.md); its padding is what the forward conv's leaves of
            # the dilated kernel, so it must not be negative
            conv_pads = [dil[d % nd] * (k[d % nd] - 1) - pads[d] for d in range(2 * nd)]
            if node.input[2] in graph_inputs and x in spatial:
                # a meta conv's dX, apart from its weight gradient (merge_weight_gradients)
                name = (node.name or f"convgrad{i}") + "_input_gradient"
                if options.conv_input_gradients and group == 1 and set(strides) == {1} and min(conv_pads) >= 0:
                    *prepare, nodes[i] = runtime_flipped_conv(node.input[0], node.input[2], node.output[0], name,
                                                              k, conv_pads, dil, consts)
                    before.setdefault(i, []).extend(prepare)
                    meta_inputs += 1
                    continue
            depthwise_form = group > 1 and w is not None and w.shape[1] == 1 and set(dil) == {1}
            if (w is not None and set(strides) == {1} and min(conv_pads) >= 0
                    and (options.conv_input_gradients or depthwise_form)):
                flipped = node.input[2] + ".flipped"
                if flipped not in added:
                    training.graph.initializer.append(numpy_helper.from_array(flipped_weights(w, group), flipped))
                    added.add(flipped)
                    flipped_bytes += w.nbytes
                nodes[i] = helper.make_node("Conv", [node.input[0], flipped], [node.output[0]], name=name,
                                            kernel_shape=k, group=group, pads=conv_pads, dilations=dil)
                if group > 1:
                    depthwise += 1
                else:
                    to_conv += 1
                continue
            if x not in spatial:
                continue
            dy_dims = [(spatial[x][d] + pads[d] + pads[d + nd] - dil[d] * (k[d] - 1) - 1) // strides[d] + 1
                       for d in range(nd)]
            out_pad = [spatial[x][d] - ((dy_dims[d] - 1) * strides[d] - pads[d] - pads[d + nd]
                                        + dil[d] * (k[d] - 1) + 1) for d in range(nd)]
            nodes[i] = helper.make_node(
                "ConvTranspose", [node.input[0], node.input[2]], [node.output[0]], name=name,
                kernel_shape=k, strides=strides, pads=pads, dilations=dil, group=group, output_padding=out_pad)
            convs += node.input[2] not in graph_inputs
            meta_inputs += node.input[2] in graph_inputs
        elif node.op_type == "BatchNormalizationGrad" and node.domain == "com.microsoft":
            compress(i, node)
        elif node.op_type == "ReluGrad" and node.domain == "com.microsoft":
            y, dy = node.input[1], node.input[0]
            packed = bit_masks and per_sample.get(y, 1) % 8 == 0
            in_nhwc = packed and y in nhwc and y in spatial
            if y not in masks:
                masks[y] = y + (".mask_bits" if packed else ".mask")
                after.setdefault(producer.get(y, -1), []).extend(
                    _pack_mask(y, zero, consts, in_nhwc, width=pack_width(y)) if packed else
                    [helper.make_node("Greater", [y, zero], [masks[y]], name=y + ".mask_node")])
                bits += packed
                transposed += in_nhwc
            mask = masks[y]
            if packed:
                mask = f"{y}.mask.unpacked{i}"
                before.setdefault(i, []).extend(_unpack_mask(masks[y], dy, mask, consts, in_nhwc,
                                                             options.gather_unpack))
                if (options.declared_unpack_shapes and options.gather_unpack and not in_nhwc
                        and options.separate_backward_buffers and i in main_backward):
                    size = per_sample[y] // 8
                    training.graph.value_info.extend([
                        helper.make_tensor_value_info(mask + ".index", TensorProto.INT32, [BACKWARD_BATCH, size]),
                        helper.make_tensor_value_info(mask + ".flat", TensorProto.FLOAT, [BACKWARD_BATCH, size, 8])])
            name = (node.name or f"relugrad{i}") + "_lean"
            nodes[i] = (helper.make_node("Mul", [dy, mask], [node.output[0]], name=name) if packed else
                        helper.make_node("Where", [mask, dy, zero], [node.output[0]], name=name))
            relus += 1
    ordered = list(after.get(-1, []))
    for i, node in enumerate(nodes):
        ordered.extend(before.get(i, []))
        ordered.append(node)
        ordered.extend(after.get(i, []))
    if clipped:  # the generated >=, <=, And, Cast chains nothing reads any more
        ordered = drop_unread(ordered, {o.name for o in training.graph.output})
    l1_terms = 0
    if options.l1_gradient_in_place:
        ordered, l1_terms = l1_gradient_in_place(ordered, {o.name for o in training.graph.output})
    cheaper, affines, stats = {}, 0, 0
    if options.fast_elementwise:  # after l1_gradient_in_place, which finds its terms by their Sign
        stats = stats_from_batchnorms(ordered, consts)  # before the batch means are split in two
        ordered[:] = drop_unread(ordered, {o.name for o in training.graph.output})
        small = _small_constants(training.graph)
        cheaper = cheaper_elementwise(ordered, small, consts)
        affines = affines_as_batchnorm(ordered, dims, small, consts,
                                       {o.name for o in training.graph.output})
    del training.graph.node[:]
    training.graph.node.extend(ordered)
    late = 0
    if options.memory_order:  # on the final nodes, after every other rewrite
        late = meta_branches_late(training, sample, consts)
        regularizer_backward_early(training, freeing_first=True)
    separated = separate_backward_buffers(training) if options.separate_backward_buffers else 0
    return {"stop_gradient_twin_nodes_dropped": twins, "conv_grad_to_conv_transpose": convs,
            "relu_grad_to_mask": relus, "relu_masks_bit_packed": bits, "relu_masks_nhwc": transposed,
            "clip_grad_to_mask": clipped, "depthwise_grad_to_conv": depthwise, "conv_grad_to_conv": to_conv,
            "flipped_weight_bytes": flipped_bytes, "weight_gradients_merged": merged,
            "meta_input_gradients": meta_inputs,
            "activations_compressed": len(compressed),
            "activation_elements_compressed_per_sample": compressed_bytes,
            "regularizer_nodes_placed_early": moved, "meta_branches_placed_late": late,
            "backward_tensors_separated": separated, "l1_gradients_in_place": l1_terms,
            **cheaper, "affines_as_batchnorm": affines,
            "statistics_from_batchnorms": stats}
