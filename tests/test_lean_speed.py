"""The lean graph's speed rewrites (issue 16): stride-1 frozen input gradients as a Conv with
flipped, channel-swapped kernels, and mask unpacking as one Gather, on both engines; the
gradients they compute are those of the graph before them."""
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetta.adapter import Adapter
from edgetta_export.bundle import export_bundle
from edgetta_export.lean import LeanOptions, flipped_weights

GRAPHS = ("training_model.onnx", "portable_step.onnx")


@pytest.fixture(scope="module")
def before_bundle(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with every rewrite off: the graphs as they were before them."""
    out = tmp_path_factory.mktemp("lean_speed") / "before"
    export_bundle(tiny_ckpt, out, profile=False, lean_options=LeanOptions(
        conv_input_gradients=False, gather_unpack=False, portable_gradients=False, fast_elementwise=False,
        wide_mask_packing=False, declared_unpack_shapes=False))
    return out


def _frozen_input_gradients(path) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in onnx.load(str(path)).graph.node if n.name.endswith("ConvGrad_0_lean")}


def _strides(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])


@pytest.mark.parametrize("graph", GRAPHS)
def test_stride1_input_gradients_are_convs_of_flipped_kernels(tiny_bundle, before_bundle, graph):
    before, after = _frozen_input_gradients(before_bundle / graph), _frozen_input_gradients(tiny_bundle / graph)
    assert set(before) == set(after) and after
    stride1 = {n for n, node in before.items() if node.op_type == "ConvTranspose" and set(_strides(node)) == {1}}
    assert stride1, "the tiny WRN has stride-1 frozen convs"
    for name, node in after.items():
        if name in stride1:
            assert node.op_type == "Conv" and node.input[1].endswith(".flipped"), name
        else:  # stride 2 stays a ConvTranspose
            assert node.op_type == before[name].op_type == "ConvTranspose" and set(_strides(node)) != {1}, name
    assert len(after) > len(stride1)
    m = json.loads((tiny_bundle / "manifest.json").read_text())["training_graph"]["rewrites"]
    assert m["conv_grad_to_conv"] == len(stride1) and m["conv_grad_to_conv_transpose"] == len(after) - len(stride1)
    assert m["flipped_weight_bytes"] > 0


@pytest.mark.parametrize("graph", GRAPHS)
def test_masks_are_unpacked_by_one_gather_without_bitshift(tiny_bundle, before_bundle, graph):
    ops_before = [n.op_type for n in onnx.load(str(before_bundle / graph)).graph.node]
    g = onnx.load(str(tiny_bundle / graph)).graph
    assert "BitShift" in ops_before and "BitShift" not in [n.op_type for n in g.node]
    tables = {t.name: numpy_helper.to_array(t) for t in g.initializer if tuple(t.dims) == (256, 8)}
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in tables]
    assert len(gathers) == ops_before.count("BitShift") // 2  # one per unpacking
    for n in gathers:
        table = tables[n.input[0]]
        byte = np.arange(256)
        np.testing.assert_array_equal(table, ((byte[:, None] >> np.arange(8)) & 1).astype(table.dtype))


@pytest.mark.parametrize("graph", GRAPHS)
def test_masks_are_packed_from_rows_of_64_signs(tiny_bundle, before_bundle, graph):
    """Where a sample's size is a multiple of 64, each MatMulInteger that packs a mask reads rows
    of 64 signs against the block-diagonal weights (8 bytes per row), the others rows of 8."""
    def packers(path):
        g = onnx.load(str(path)).graph
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        return [consts[n.input[1]] for n in g.node if n.op_type == "MatMulInteger"]
    before, after = packers(before_bundle / graph), packers(tiny_bundle / graph)
    assert len(before) == len(after) > 0 and all(w.shape == (8, 1) for w in before)
    wide = [w for w in after if w.shape == (64, 8)]
    assert wide and all(w.shape in ((8, 1), (64, 8)) for w in after)
    bits = (np.random.default_rng(0).random((5, 64)) > 0.5).astype(np.int64)
    np.testing.assert_array_equal(bits @ wide[0].astype(np.int64),
                                  (bits.reshape(5, 8, 8) @ before[0].astype(np.int64)).reshape(5, 8))


@pytest.mark.parametrize("graph", GRAPHS)
def test_unpacked_masks_have_shapes_onnxruntime_can_plan(tiny_bundle, before_bundle, graph):
    """The main backward pass's unpacked masks are declared (backward batch, bytes per sample, 8):
    onnxruntime's own shape inference then knows them (without the declaration it does not)."""
    from edgetta.profile import BACKWARD_BATCH
    from edgetta_export.lean import ort_inferred_shapes
    model = onnx.load(str(tiny_bundle / graph))
    declared = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
                for vi in model.graph.value_info if vi.name.endswith(".flat") and ".mask.unpacked" in vi.name}
    assert declared and all(d[0] == BACKWARD_BATCH and d[2] == 8 for d in declared.values())
    inferred = ort_inferred_shapes(model, list(declared))
    assert {n: s for n, (_, s) in inferred.items()} == declared
    before = onnx.load(str(before_bundle / graph))
    known = ort_inferred_shapes(before, list(declared))
    assert all(None in s or not s for _, s in known.values())


@pytest.mark.parametrize("graph", GRAPHS)
def test_restored_inputs_share_buffers_only_within_their_meta_network(tiny_bundle, before_bundle, graph):
    """The float rows (N*C, H*W) each kept input is restored into are declared with a symbol per
    channel count and meta network, which onnxruntime's shape inference keeps (without the
    declaration it knows no first dimension): its planner may hand one restored input's buffer to
    another of the same size only within one meta network's backward pass."""
    from edgetta.profile import BACKWARD_BATCH
    from edgetta_export.lean import ort_inferred_shapes
    model = onnx.load(str(tiny_bundle / graph))
    declared = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
                for vi in model.graph.value_info if re.search(r"\.q8\.restored\d+\.rows$", vi.name)}
    training = onnx.load(str(tiny_bundle / GRAPHS[0]))  # the portable step rewrites its gradient nodes
    readers = {n.input[1]: n.input[2] for n in training.graph.node if len(n.input) > 2 and ".q8.restored" in n.input[1]}
    assert len(declared) == len(readers) > 2
    for name, (rows, cols) in declared.items():
        owner = readers[name[:-len(".rows")]]  # the weight the gradient node reads: model.metas.K.*
        symbol = re.fullmatch(rf"{BACKWARD_BATCH}_x(\d+)_(model\.metas\.\d+)", rows)
        assert symbol and symbol[2] == owner.rsplit(".", 2)[0] and int(symbol[1]) > 0 and cols > 0, (name, rows)
    assert len({d[0] for d in declared.values()}) > 1
    inferred = ort_inferred_shapes(model, list(declared))
    assert {n: s for n, (_, s) in inferred.items()} == declared
    known = ort_inferred_shapes(onnx.load(str(before_bundle / graph)), list(declared))
    assert known and all(not s or s[0] is None for _, s in known.values())


@pytest.mark.parametrize("graph", GRAPHS)
def test_elementwise_work_runs_in_cheaper_kernels(tiny_bundle, before_bundle, graph):
    """No Pow and no Sign left; each batch mean over (N, H, W) is two ReduceMeans; each
    batch-statistics scale-and-shift of the frozen backbone (a Mul and an Add) is one
    inference-mode BatchNormalization with mean 0, var 1, epsilon 0."""
    def ops(path):
        return [n.op_type for n in onnx.load(str(path)).graph.node]
    before, after = ops(before_bundle / graph), ops(tiny_bundle / graph)
    m = json.loads((tiny_bundle / "manifest.json").read_text())["training_graph"]["rewrites"]
    assert before.count("Pow") == m["squares_as_mul"] > 0 and "Pow" not in after
    assert before.count("Sign") == m["signs_as_clip"] > 0 and "Sign" not in after
    # each statistic from a BatchNorm drops its ReduceMeans (2 for a variance); each split adds one
    assert m["statistics_from_batchnorms"] > 0 and m["batch_means_in_two"] > 0
    assert "Reciprocal" in after
    assert after.count("BatchNormalization") - before.count("BatchNormalization") == m["affines_as_batchnorm"] > 0
    assert before.count("Mul") - after.count("Mul") == m["affines_as_batchnorm"] - m["squares_as_mul"] - m["signs_as_clip"]
    g = onnx.load(str(tiny_bundle / graph)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in (n for n in g.node if n.op_type == "BatchNormalization" and n.name.endswith("_affine")):
        assert helper.get_attribute_value(next(a for a in n.attribute if a.name == "epsilon")) == 0.0
        assert not consts[n.input[3]].any() and (consts[n.input[4]] == 1).all()


def test_statistics_from_batchnorms_equal_their_reductions(tiny_bundle, before_bundle, corrupted_frames):
    """The meta BatchNorms' batch statistics the graphs output, taken from the BatchNorms' own
    mean and inverse standard deviation, against the ReduceMeans they replace: equal to float
    rounding (relative to var + epsilon), on both engines."""
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    x = Adapter.load(tiny_bundle, engine="onnx").preprocess(corrupted_frames[0][:16])
    for engine in ("ort-training", "onnx"):
        a, b = (select_engine(engine, Bundle.open(p)).step(x).batch_stats for p in (before_bundle, tiny_bundle))
        assert set(a) == set(b) and a
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=2e-6, atol=2e-6 * (np.abs(a[name]).max() + 1e-5),
                                       err_msg=f"{engine} {name}")


def test_both_engines_adapt_as_before(tiny_bundle, before_bundle, corrupted_frames):
    """Losses, logits and the adapted state after four steps: the rewritten graphs against the
    graphs before the rewrites, on each engine, and the two engines against each other."""
    images, _ = corrupted_frames
    runs = {}
    for key, bundle in (("before", before_bundle), ("after", tiny_bundle)):
        for engine in ("ort-training", "onnx"):
            a = Adapter.load(bundle, engine=engine)
            losses, logits = [], []
            for i in range(4):
                logits.append(a.step(images[i * 16:(i + 1) * 16]))
                losses.append(a.last_loss)
            runs[key, engine] = (np.array(losses), np.concatenate(logits), a.meta_state())
    for ref, other in ((("before", "ort-training"), ("after", "ort-training")),
                       (("before", "onnx"), ("after", "onnx")),
                       (("after", "ort-training"), ("after", "onnx"))):
        (la, ya, sa), (lb, yb, sb) = runs[ref], runs[other]
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6, err_msg=f"{ref} {other}")
        np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-4, err_msg=f"{ref} {other}")
        for n in sa:
            assert np.abs(sa[n] - sb[n]).max() <= 1e-4 * (np.abs(sa[n]).max() + 1e-6), (ref, other, n)


@pytest.mark.parametrize("group,dilation,pad", [(1, 1, 1), (2, 2, 2), (4, 1, 0), (8, 1, 1)])
def test_flipped_kernels_give_torch_input_gradient(group, dilation, pad):
    """Conv(dY, flipped_weights(W)) equals torch's input gradient of a stride-1 conv, grouped
    (group 8 here is depthwise), dilated, padded or not."""
    from edgetta.ort import onnxruntime
    rng = np.random.default_rng(group)
    c_in, c_out, k = 8, 16, 3
    w = rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32)
    x_shape = (2, c_in, 9, 9)
    h = 9 + 2 * pad - dilation * (k - 1)
    dy = rng.standard_normal((2, c_out, h, h)).astype(np.float32)
    want = torch.nn.grad.conv2d_input(x_shape, torch.from_numpy(w), torch.from_numpy(dy), padding=pad,
                                      dilation=dilation, groups=group).numpy()
    p = dilation * (k - 1) - pad
    node = helper.make_node("Conv", ["dy", "w"], ["dx"], kernel_shape=[k, k], group=group,
                            dilations=[dilation] * 2, pads=[p] * 4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("dy", TensorProto.FLOAT, list(dy.shape))],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(flipped_weights(w, group), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"dy": dy})[0]
    assert got.shape == x_shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride,pad,k,dilation", [(1, 1, 3, 1), (2, 1, 3, 1), (2, 0, 1, 1), (1, 2, 3, 2), (1, 0, 1, 1)])
def test_portable_conv_gradient_equals_torch(stride, pad, k, dilation):
    """The portable step's ConvGrad (dX by a Conv of flipped kernels at stride 1, else
    ConvTranspose; dW by one MatMul per kernel offset, in a Loop) against torch, meta-network style
    (the weights a graph input)."""
    from edgetta.ort import onnxruntime
    from edgetta_export.portable import conv_grad_standard_ops
    rng = np.random.default_rng(stride * 10 + k)
    x = rng.standard_normal((3, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, k, k)).astype(np.float32)
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad,
                                   dilation=dilation)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    kw = dict(stride=stride, padding=pad, dilation=dilation)
    want_dx = torch.nn.grad.conv2d_input(x.shape, torch.from_numpy(w), torch.from_numpy(dy), **kw).numpy()
    want_dw = torch.nn.grad.conv2d_weight(torch.from_numpy(x), w.shape, torch.from_numpy(dy), **kw).numpy()
    node = helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx", "dw", ""], domain="com.microsoft",
                            kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4, dilations=[dilation] * 2, group=1)
    nodes, consts = conv_grad_standard_ops(node, {"x": [9, 9]})
    assert {n.op_type for n in nodes}.isdisjoint({"ConvGrad"}) and all(n.domain == "" for n in nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
                                           for n, v in (("dy", dy), ("x", x), ("w", w))],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("dx", "dw")], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    dx, dw = sess.run(None, {"dy": dy, "x": x, "w": w})
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)
    ops = [n.op_type for n in nodes]
    loop = next(n for n in nodes if n.op_type == "Loop")  # one MatMul per kernel offset, in turn
    assert "MatMul" in {n.op_type for n in loop.attribute[0].g.node}
    assert ("ConvTranspose" in ops) == (stride != 1)


@pytest.fixture(scope="module")
def unmerged_pair(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with float32 kept inputs, its meta conv weight gradients merged (the
    default) and not."""
    out = tmp_path_factory.mktemp("merged")
    for name, merged in (("merged", True), ("unmerged", False)):
        export_bundle(tiny_ckpt, out / name, profile=False,
                      lean_options=LeanOptions(activation_bits=None, merged_weight_gradients=merged))
    return out / "merged", out / "unmerged"


def test_one_weight_gradient_per_meta_conv_and_input_gradients_apart(tiny_bundle, tiny_ckpt):
    """Each meta conv's weight gradient but the first's (it reads the image) is one ConvGrad (dW
    only) of its two terms' summed output gradients; its input gradient is a Conv of the weights
    flipped in the graph at stride 1 (else a ConvTranspose), reading no kept input."""
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    k = len(tiny_ckpt["split"])
    assert m["training_graph"]["rewrites"]["weight_gradients_merged"] == k - 1
    for graph in GRAPHS:
        g = onnx.load(str(tiny_bundle / graph)).graph
        trainable = {i.name for i in g.input if i.name.endswith(".conv.weight")}
        assert len(trainable) == k
        producer = {o: n for n in g.node for o in n.output if o}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for x in n.input:
                readers.setdefault(x, []).append(n)
        for w in trainable:
            ops = sorted(n.op_type for n in readers[w])
            if graph == "training_model.onnx":
                grads = [n for n in readers[w] if n.op_type == "ConvGrad"]
                assert all(n.output[0] == "" for n in grads), (w, ops)
                if w == "model.metas.0.conv.weight":  # one per term, on the image
                    assert len(grads) == 2 and {n.input[1] for n in grads} == {"input"}
                    continue
                assert len(grads) == 1, (w, ops)
                assert producer[grads[0].input[0]].op_type == "Add", "the summed output gradients"
            for n in readers[w]:
                if n.op_type == "Slice":  # the flipped kernels of a stride-1 input gradient
                    conv = readers[readers[n.output[0]][0].output[0]][0]
                    assert conv.op_type == "Conv" and conv.name.endswith("_input_gradient")
        assert sum(n.name.endswith("_input_gradient") for n in g.node) == k - 1  # the first reads the image


@pytest.mark.parametrize("engine", ("ort-training", "onnx"))
def test_merged_weight_gradients_equal_the_sum_of_both_terms(unmerged_pair, corrupted_frames, engine):
    """With float32 kept inputs, one step's gradients of every meta parameter: merged against
    one weight gradient per term added afterwards, to float rounding."""
    from edgetta.bundle import Bundle
    from edgetta.engines import select_engine
    merged, unmerged = unmerged_pair
    x = Adapter.load(merged, engine="onnx").preprocess(corrupted_frames[0][:16])
    grads = []
    for bundle in (merged, unmerged):
        e = select_engine(engine, Bundle.open(bundle), momentum=0.9)
        e.step(x)
        grads.append(e.velocity())  # from zero velocity: the gradient
    a, b = grads
    assert set(a) == set(b) and any(".conv.weight" in n for n in a)
    for n in a:
        assert np.abs(a[n] - b[n]).max() <= 1e-5 * (np.abs(b[n]).max() + 1e-8), n


@pytest.fixture(scope="module")
def unordered_bundle(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with every default but the memory order."""
    out = tmp_path_factory.mktemp("lean_speed") / "unordered"
    export_bundle(tiny_ckpt, out, profile=False, lean_options=LeanOptions(memory_order=False))
    return out


@pytest.mark.parametrize("engine", ("ort-training", "onnx"))
def test_memory_order_changes_no_number(tiny_bundle, unordered_bundle, corrupted_frames, engine):
    """The same nodes in another order: losses, logits and state after three steps are
    bit-identical."""
    images, _ = corrupted_frames
    runs = []
    for bundle in (tiny_bundle, unordered_bundle):
        a = Adapter.load(bundle, engine=engine)
        out = [a.step(images[i * 16:(i + 1) * 16]) for i in range(3)] + [np.float32(a.last_loss)]
        runs.append((out, a.meta_state()))
    (out_a, state_a), (out_b, state_b) = runs
    for x, y in zip(out_a, out_b):
        np.testing.assert_array_equal(x, y)
    for n in state_a:
        np.testing.assert_array_equal(state_a[n], state_b[n], err_msg=n)


def _positions(path) -> tuple[list, dict[str, int]]:
    from edgetta.profile import execution_order
    g = onnx.load(str(path)).graph
    order = execution_order(list(g.node))
    return order, {o: i for i, n in enumerate(order) for o in n.output if o}


@pytest.mark.parametrize("graph", GRAPHS)
def test_meta_branches_run_after_their_frozen_part(tiny_bundle, unordered_bundle, graph, tiny_ckpt):
    """Each meta conv depends on the frozen part whose output its branch is added to (through a
    no-op Reshape of its input: the graph's order alone does not hold once onnxruntime's NCHWc
    pass renumbers the frozen convs), so it runs after that part; before the rewrite it ran as
    soon as the part's input existed. And in the execution order edgetta.profile models, the
    regularizer's meta BatchNorm gradient runs before its conv branch's BatchNorm gradient."""
    k = len(tiny_ckpt["split"])
    for bundle, late in ((tiny_bundle, True), (unordered_bundle, False)):
        order, at = _positions(bundle / graph)
        inputs = {i.name for i in onnx.load(str(bundle / graph)).graph.input}
        convs = [n for n in order if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inputs
                 and n.input[1].endswith(".conv.weight")]
        assert len(convs) == k
        after_part, meta_first = [], []
        for conv in convs:
            # the join: the meta network's Add (torch's exporter names it), whose other input is
            # the meta BatchNorm of the frozen part's output h_k
            derived = {conv.output[0]}
            for n in order[at[conv.output[0]] + 1:]:
                if any(x in derived for x in n.input):
                    if n.op_type == "Add" and re.fullmatch(r"/metas\.\d+(_1)?/Add_output_0", n.output[0]):
                        h = next(x for x in n.input if x not in derived)
                        break
                    derived.update(o for o in n.output if o)
            after_part.append(at[conv.output[0]] > at[h])
            if late:  # the dependency: Reshape(x, Shape(b) * 0), b the Add's other input
                reshape = order[at[conv.input[0]]]
                assert reshape.op_type == "Reshape", conv.output[0]
                mul = order[at[reshape.input[1]]]
                assert order[at[mul.input[0]]].op_type == "Shape" and order[at[mul.input[0]]].input[0] == h
            if graph == "training_model.onnx":  # the regularizer's two BatchNorm gradients
                grads = {n.input[1]: at[n.output[0]] for n in order if n.op_type == "BatchNormalizationGrad"}
                frozen_output = order[at[h]].input[0]  # what the meta BatchNorm normalises
                meta_first.append(grads[frozen_output] < grads[conv.output[0]])
        assert all(after_part) if late else not any(after_part), (bundle.name, after_part)
        if graph == "training_model.onnx":
            assert all(meta_first) if late else not all(meta_first), (bundle.name, meta_first)
