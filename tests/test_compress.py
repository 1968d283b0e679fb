"""Compressed kept activations (``LeanOptions(activation_bits=8)``, issue 16 item 3): the meta
networks' kept BatchNorm and conv inputs stored as 8-bit integers per (sample, channel), rounded
to nearest (the default) or stochastically, and decompressed where the backward pass reads
them, on both engines.

The tiny model is exported with e0 = 10 (above any entropy): with its untrained head every
sample's entropy is above the default threshold, the entropy term would be zero and the
compressed tensors would meet a zero gradient."""
import json
import re

import numpy as np
import onnx
import pytest

from edgetta.bundle import Bundle
from edgetta.engines import select_engine
from edgetta.ort import onnxruntime
from edgetta.profile import analyse, bundle_facts
from edgetta.targets import get_target
from edgetta_export.bundle import export_bundle
from edgetta_export.lean import LeanOptions

ENGINES = ("ort-training", "onnx")
GRAPHS = {"ort-training": "training_model.onnx", "onnx": "portable_step.onnx"}
BATCH = 16


@pytest.fixture(scope="module")
def pair(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with float kept inputs and with 8-bit ones, rounded to
    nearest (``q8``, the default) and stochastically (``q8s``)."""
    root = tmp_path_factory.mktemp("compress")
    out = {}
    for name, bits, rounding in (("float", None, "nearest"), ("q8", 8, "nearest"), ("q8s", 8, "stochastic")):
        out[name] = root / name
        export_bundle(tiny_ckpt, out[name], profile=False, e0=10.0,
                      lean_options=LeanOptions(activation_bits=bits, activation_rounding=rounding))
    return out


@pytest.fixture(scope="module")
def frames(pair, corrupted_frames):
    from edgetta.adapter import Adapter
    return Adapter.load(pair["float"], engine="onnx").preprocess(corrupted_frames[0][:BATCH])


def _meta_networks(bundle) -> int:
    return json.loads((bundle / "manifest.json").read_text())["ecotta"]["k"]


def _sources(graph: onnx.GraphProto) -> set[str]:
    """The forward tensors the graph compresses (the inputs of its quantizing nodes)."""
    return {n.input[0] for n in graph.node if n.name.endswith(".q8.lo_node")}


def _restored(graph: onnx.GraphProto) -> list[str]:
    """The decompressed tensors the backward pass reads (``<source>.q8.restored<node>``)."""
    return [n.output[0] for n in graph.node if re.search(r"\.q8\.restored\d+$", n.output[0])]


def _ancestors(graph: onnx.GraphProto, name: str) -> set[str]:
    producer = {o: n for n in graph.node for o in n.output if o}
    seen, stack = set(), [name]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in producer:
            stack.extend(x for x in producer[t].input if x)
    return seen


def test_on_by_default_eight_bits_only_and_a_lean_graph_rewrite(tiny_bundle, tiny_ckpt, tmp_path):
    assert LeanOptions().activation_bits == 8 and LeanOptions().activation_rounding == "nearest"
    with pytest.raises(ValueError, match="activation_rounding"):
        LeanOptions(activation_rounding="up")
    assert json.loads((tiny_bundle / "manifest.json").read_text())["training_graph"]["rewrites"][
        "activations_compressed"] > 0
    with pytest.raises(ValueError, match="activation_bits"):
        LeanOptions(activation_bits=4)
    export_bundle(tiny_ckpt, tmp_path / "generated", profile=False, lean=False, portable=False)
    assert not _sources(onnx.load(str(tmp_path / "generated" / "training_model.onnx")).graph)


@pytest.mark.parametrize("rounding", ("q8", "q8s"))
@pytest.mark.parametrize("engine", ENGINES)
def test_graphs_quantize_and_decompress_where_the_gradient_reads(pair, engine, rounding):
    """Each meta network's BatchNorm inputs and conv input (but the network's own input, which
    the caller holds) are quantized in the forward pass by standard ops: to nearest by one
    QuantizeLinear per axis with a uint8 zero point, or stochastically (RandomUniform, Floor,
    Cast to uint8); decompressed by DequantizeLinear; every decompression reads the gradient it
    serves."""
    g = onnx.load(str(pair[rounding] / GRAPHS[engine])).graph
    sources = _sources(g)
    k = _meta_networks(pair[rounding])
    # per meta network: its frozen part's output, its conv's output, its conv's input (not the first's)
    assert len(sources) == 3 * k - 1, sorted(sources)
    assert "input" not in sources
    ops = {n.output[0]: n for n in g.node}
    for x in sources:
        u8 = ops[x + ".q8.u8"]
        if rounding == "q8":
            assert u8.op_type == "QuantizeLinear" and u8.input[2] == x + ".q8.zero"
            assert not [n for n in g.node if n.op_type in ("RandomUniform", "Floor")]
        else:
            assert ops[x + ".q8.noise"].op_type == "RandomUniform"
            assert ops[x + ".q8.floor"].op_type == "Floor"
            assert u8.op_type == "Cast" and u8.attribute[0].i == onnx.TensorProto.UINT8
    restored = _restored(g)
    assert len(restored) >= len(sources)
    dequantized = ".rows" if rounding == "q8" else ".scaled"
    assert all(ops[r + dequantized].op_type == "DequantizeLinear" for r in restored)
    for r in restored:  # what the decompression's own nodes read
        own = [n for n in g.node if n.output[0] == r or n.output[0].startswith(r + ".")]
        reads = {x for n in own for x in n.input} - {o for n in own for o in n.output}
        src = r.split(".q8.restored")[0]
        assert src not in reads, f"{r} reads the float original"
        assert {src + ".q8.bytes", src + ".q8.step", src + (".q8.zero" if rounding == "q8" else ".q8.min")} <= reads
        grads = [x for x in reads if x.endswith("_grad")]
        assert grads, f"{r} reads no gradient: it would run in the forward pass"
    if engine == "ort-training":  # the entropy term's BatchNorm gradients (reached from the logits'
        # gradient) read decompressed inputs, the regularizer's (run in the forward pass) the floats
        reached, main = {"logits_grad"}, set()
        for n in g.node:
            if any(x in reached for x in n.input):
                reached.update(n.output)
                main.add(n.name)
        bn_grads = [n for n in g.node if n.op_type == "BatchNormalizationGrad"]
        assert len(bn_grads) == 4 * k and 0 < len([n for n in bn_grads if n.name in main]) < len(bn_grads)
        for n in bn_grads:
            assert (".q8.restored" in n.input[1]) == (n.name in main), n.output[1]


@pytest.mark.parametrize("rounding", ("q8", "q8s"))
@pytest.mark.parametrize("engine", ENGINES)
def test_decompression_waits_for_the_gradient_in_onnxruntimes_optimized_graph(pair, engine, rounding, tmp_path):
    """What onnxruntime runs, not only what the bundle says: in the session's optimized graph
    every decompression still reads its gradient. (With the batch size taken from the
    gradient's shape alone, the optimizer made each Reshape's target a constant and every
    decompression ran in the forward pass, holding its float copy: this fails then.)"""
    from edgetta.engines import session_options
    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    select_engine(engine, Bundle.open(pair[rounding]), opts=opts)
    g = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    restored = _restored(g)
    assert restored
    consts = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    for r in restored:
        target = producer[r + ".u8"].input[1]  # the Reshape of the stored bytes
        assert target not in consts, f"{r}: the optimizer made its shape a constant"
        up = _ancestors(g, target)
        assert any(t.endswith("_grad") for t in up), f"{r} no longer waits for a gradient"


@pytest.mark.parametrize("engine", ENGINES)
def test_no_float_copy_is_kept_for_the_backward_pass(pair, engine):
    """The profiler's liveness over the execution order: with compression on, no compressed
    tensor's float original is alive when the forward pass ends, and what is kept instead is
    a quarter of it plus a float and a byte per (sample, channel)."""
    target = get_target("x86-64")
    off = analyse(Bundle.open(pair["float"]), target, 64, engine=engine)
    on = analyse(Bundle.open(pair["q8"]), target, 64, engine=engine)
    sources = _sources(onnx.load(str(pair["q8"] / GRAPHS[engine])).graph)
    kept_off = {r["name"]: r["bytes"] for r in off["kept_tensors"]}
    kept_on = {r["name"]: r["bytes"] for r in on["kept_tensors"]}
    assert sources <= set(kept_off), "uncompressed, the backward pass keeps these floats"
    assert not sources & set(kept_on)
    float_bytes = sum(kept_off[s] for s in sources)
    stored = sum(b for n, b in kept_on.items() if ".q8." in n)
    facts = bundle_facts(Bundle.open(pair["q8"]))[engine].tensors
    groups = sum(facts[s + ".q8.step"].elems(64) for s in sources)
    assert stored == pytest.approx(float_bytes / 4 + (4 + 1) * groups, rel=0.01)
    assert on["adaptation"]["activations_kept"] == pytest.approx(
        off["adaptation"]["activations_kept"] - float_bytes + stored, rel=0.01)
    # the regularizer's conv output gradients, held for the merged weight gradients
    # (LeanOptions.merged_weight_gradients), are float in both
    held = sum(b for n, b in kept_on.items() if n.endswith("_grad"))
    assert held == sum(b for n, b in kept_off.items() if n.endswith("_grad"))
    assert on["adaptation"]["activations_kept"] - held < 0.45 * (off["adaptation"]["activations_kept"] - held)


def _gradients(bundle, engine: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """One step's gradients: the velocity after a step from zero velocity is the gradient."""
    e = select_engine(engine, Bundle.open(bundle), momentum=0.9)
    e.step(x)
    return e.velocity()


def _probe(path, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Run a graph with ``names`` exposed as outputs."""
    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _portable_feeds(bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    b = Bundle.open(bundle)
    init = b.initial_meta_state()
    feeds = {"input": x, "lr": np.array(0.005, np.float32), "momentum": np.array(0.9, np.float32)}
    for p in b.manifest.trainable:
        feeds[p] = init[p]
        feeds[p + ".velocity"] = np.zeros_like(init[p])
    return feeds


@pytest.mark.parametrize("rounding,bound", (("q8", 0.5), ("q8s", 1.0)))
def test_decompressed_values_within_the_step_bound_and_unbiased(pair, frames, rounding, bound):
    """Per element |restored - original| <= step / 2 rounded to nearest (step: the group's
    range, 0 included, over 255), < step stochastically (the range over 254.99). Errors
    average out (mean error well under a tenth of the mean step) and are not all zero."""
    path = pair[rounding] / GRAPHS["onnx"]
    g = onnx.load(str(path)).graph
    pairs = [(r, r.split(".q8.restored")[0]) for r in _restored(g)]
    assert pairs
    names = [t for r, s in pairs for t in (r, s, s + ".q8.step")]
    out = _probe(path, _portable_feeds(pair[rounding], frames), names)
    for r, s in pairs:
        err = out[r] - out[s]
        step = out[s + ".q8.step"].reshape(*err.shape[:2], 1, 1)  # one per (sample, channel)
        assert err.shape == out[s].shape
        assert np.all(np.abs(err) <= bound * step * (1 + 1e-4) + 1e-6 * np.abs(out[s])), r
        assert np.abs(err).max() > 0.05 * step.max(), f"{r}: not quantized"
        assert abs(err.mean()) < 0.1 * step.mean(), f"{r}: rounding is biased"


@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_within_the_quantization_bound(pair, frames, engine):
    """Gradients with 8-bit kept inputs against float ones, same batch, same engine.

    Exact bound for the last meta network: its upstream gradient dY does not pass through any
    compressed tensor, so its BatchNorm weight gradient sum(dY * (x - mean) * inv_std) moves
    by at most inv_std_c * sum_n step_nc * sum_hw |dY_nchw| per channel. Every earlier meta
    tensor's gradient also carries the errors propagated from later layers: bounded here by 2%
    relative (L2), which the measured error stays far below (about 1e-3 on this model)."""
    g_off, g_on = _gradients(pair["float"], engine, frames), _gradients(pair["q8"], engine, frames)
    moved = 0
    for n in g_off:
        rel = np.linalg.norm(g_on[n] - g_off[n]) / (np.linalg.norm(g_off[n]) + 1e-12)
        assert rel < 0.02, (n, rel)
        moved += rel > 1e-5
    assert moved > 0, "compression changed no gradient"
    train = onnx.load(str(pair["q8"] / GRAPHS["ort-training"])).graph
    k = _meta_networks(pair["q8"]) - 1
    last = [n for n in train.node if n.op_type == "BatchNormalizationGrad" and ".q8.restored" in n.input[1]
            and n.output[1].startswith(f"model.metas.{k}.")]
    assert len(last) == 2  # bn_meta and the conv branch's bn
    names = [t for n in last for t in (n.input[0], n.input[4], n.input[1].split(".q8.restored")[0] + ".q8.step")]
    probe = _probe(pair["q8"] / GRAPHS["onnx"], _portable_feeds(pair["q8"], frames), names)
    for n in last:
        dy, inv = probe[n.input[0]], probe[n.input[4]]
        step = probe[n.input[1].split(".q8.restored")[0] + ".q8.step"].reshape(dy.shape[:2])
        bound = inv * (step * np.abs(dy).sum(axis=(2, 3))).sum(axis=0)
        weight = n.output[1].rsplit("_grad", 1)[0]
        diff = np.abs(g_on[weight] - g_off[weight])
        slack = 1e-5 * np.abs(g_off[weight]) + 1e-7
        assert np.all(diff <= bound + slack), (weight, (diff / bound).max())


@pytest.mark.parametrize("rounding", ("q8", "q8s"))
def test_engines_draw_the_same_rounding(pair, frames, rounding):
    """Both engines compress the same batch to the same bytes (stochastically: RandomUniform has
    a fixed seed per tensor), so their gradients agree as closely as without compression."""
    a, b = (_gradients(pair[rounding], e, frames) for e in ENGINES)
    for n in a:
        assert np.linalg.norm(a[n] - b[n]) <= 1e-4 * (np.linalg.norm(a[n]) + 1e-6), n


def test_export_command_chooses_the_rounding(tiny_ckpt, tmp_path):
    """``edgetta export --activation-rounding`` reaches the graph and the manifest says which."""
    from edgetta.cli import main
    from edgetta_export import checkpoint
    ckpt = tmp_path / "tiny.pt"
    checkpoint.save(ckpt, tiny_ckpt)
    for rounding in ("stochastic", "nearest"):
        out = tmp_path / rounding
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-profile",
                     "--activation-rounding", rounding]) == 0
        graph = json.loads((out / "manifest.json").read_text())["training_graph"]
        assert graph["activation_bits"] == 8 and graph["activation_rounding"] == rounding
        ops = {n.op_type for n in onnx.load(str(out / GRAPHS["ort-training"])).graph.node}
        assert ("RandomUniform" in ops) == (rounding == "stochastic") and ("QuantizeLinear" in ops) == (rounding == "nearest")


def test_export_command_turns_rewrites_off_by_name(tiny_ckpt, tmp_path, capsys):
    """``edgetta export --lean-off NAME``: the rewrite is off in the graph; an unknown name is one
    line and exit 2."""
    from edgetta.cli import main
    from edgetta_export import checkpoint
    ckpt = tmp_path / "tiny.pt"
    checkpoint.save(ckpt, tiny_ckpt)
    out = tmp_path / "off"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-profile",
                 "--lean-off", "fast_elementwise", "wide_mask_packing"]) == 0
    rewrites = json.loads((out / "manifest.json").read_text())["training_graph"]["rewrites"]
    assert "squares_as_mul" not in rewrites and rewrites["activations_compressed"] > 0
    ops = [n.op_type for n in onnx.load(str(out / GRAPHS["ort-training"])).graph.node]
    assert "Pow" in ops and "Sign" in ops
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"), "--no-profile",
                 "--lean-off", "no_such_rewrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_rewrite" in err[0] and "fast_elementwise" in err[0]
