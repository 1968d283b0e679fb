"""Bounded workspace (issue 16 item 4, docs/workspace.md):

- ``LeanOptions.separate_backward_buffers``: the main backward pass's tensors get a batch symbol
  of their own, so that onnxruntime's allocation planner, which hands a freed buffer on only to
  a tensor of the same static shape, gives them none of the forward pass's buffers;
- ``LeanOptions.l1_gradient_in_place``: the regularizer's L1 gradients without a full-size
  ``Expand`` of their scalar, and its forward mean right after ``|d|``.

The tiny model is exported with e0 = 10 (above any entropy), as in tests/test_compress.py, so
that the entropy term's gradient is not zero."""
import json
import re

import numpy as np
import onnx
import pytest

from edgetta.bundle import Bundle
from edgetta.engines import select_engine
from edgetta.profile import BACKWARD_BATCH, analyse, bundle_facts
from edgetta.targets import get_target
from edgetta_export.bundle import export_bundle
from edgetta_export.lean import LeanOptions, ort_inferred_shapes

ENGINES = ("ort-training", "onnx")
GRAPHS = {"ort-training": "training_model.onnx", "onnx": "portable_step.onnx"}
BATCH = 16


@pytest.fixture(scope="module")
def pair(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with neither rewrite, with the backward pass's own batch
    symbol, and with both rewrites (Sign kept as Sign, for the L1 gradient's test to find)."""
    root = tmp_path_factory.mktemp("workspace")
    out = {}
    for name, apart, l1 in (("shared", False, False), ("apart", True, False), ("bounded", True, True)):
        out[name] = root / name
        export_bundle(tiny_ckpt, out[name], profile=False, e0=10.0,
                      lean_options=LeanOptions(separate_backward_buffers=apart, l1_gradient_in_place=l1,
                                               fast_elementwise=False))
    return out


def _main_backward(graph: onnx.GraphProto, seed: str) -> list[str]:
    """The tensors computed from ``seed`` (the entropy term's gradient of the logits), in order."""
    reached, out = {seed}, []
    for node in graph.node:
        if any(x in reached for x in node.input):
            for o in node.output:
                if o and o not in reached:
                    reached.add(o)
                    out.append(o)
    return out


def _batch_symbols(path, names: list[str]) -> dict[str, str]:
    """The symbolic dimension onnxruntime's shape inference gives each of ``names`` that has one
    (the batch: no other dimension is symbolic)."""
    shapes = ort_inferred_shapes(onnx.load(str(path)), names)
    out = {}
    for name, (_, shape) in shapes.items():
        symbols = {d for d in shape if isinstance(d, str)}
        assert len(symbols) <= 1, (name, shape)
        if symbols:
            out[name] = symbols.pop()
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_onnxruntime_gives_the_backward_pass_its_own_batch_symbol(pair, engine):
    """What onnxruntime's planner compares, read from onnxruntime itself: with the option every
    backward tensor that has a batch symbol has the backward pass's, and every forward tensor
    keeps the input's; without it they share one (so this fails when the declaration is lost,
    e.g. if onnxruntime's own inference overrode it)."""
    graphs = {k: onnx.load(str(v / GRAPHS[engine])).graph for k, v in pair.items()}
    back = _main_backward(graphs["apart"], "logits_grad")
    assert len(back) > 20
    forward = [o for n in graphs["apart"].node for o in n.output if o and o not in set(back)]
    apart = _batch_symbols(pair["apart"] / GRAPHS[engine], back + forward)
    shared = _batch_symbols(pair["shared"] / GRAPHS[engine], back + forward)
    back_apart = {n: s for n, s in apart.items() if n in set(back)}
    fwd_apart = {n: s for n, s in apart.items() if n not in set(back)}
    # the rows (N*C, H*W) kept inputs are restored into: batch x channels, a symbol per meta
    # network (LeanOptions.declared_restored_rows), computed from the backward pass's batch
    rows = {n: back_apart.pop(n) for n in list(back_apart) if re.search(r"\.q8\.restored\d+\.rows$", n)}
    assert rows and all(s.startswith(BACKWARD_BATCH + "_x") for s in rows.values())
    assert len(back_apart) > 20 and len(fwd_apart) > 20
    assert set(back_apart.values()) == {BACKWARD_BATCH}
    assert BACKWARD_BATCH not in set(fwd_apart.values())
    assert BACKWARD_BATCH not in set(shared.values())
    assert all(shared.get(n) == fwd_apart[n] for n in fwd_apart if n in shared)
    # the profiler's facts record the same set, so its liveness pass keeps them apart too
    facts = bundle_facts(Bundle.open(pair["apart"]))[engine]
    assert set(back_apart) <= facts.backward_batch
    assert not bundle_facts(Bundle.open(pair["shared"]))[engine].backward_batch


def _gradients(bundle, engine: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """One step's gradients: the velocity after a step from zero velocity is the gradient."""
    e = select_engine(engine, Bundle.open(bundle), momentum=0.9)
    e.step(x)
    return e.velocity()


@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_unchanged(pair, engine, corrupted_frames):
    """The same maths in the same kernels: only which buffers hold the tensors changes. Both
    sessions draw the same rounding noise (seeded per session), so compression is on here."""
    from edgetta.adapter import Adapter
    x = Adapter.load(pair["shared"], engine="onnx").preprocess(corrupted_frames[0][:BATCH])
    a, b = _gradients(pair["shared"], engine, x), _gradients(pair["bounded"], engine, x)
    assert set(a) == set(b)
    for name in a:
        scale = float(np.abs(a[name]).max())
        assert scale > 0, name
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("engine", ENGINES)
def test_static_estimate_hands_no_forward_buffer_to_the_backward_pass(pair, engine):
    """The liveness pass follows the planner: with the option a forward buffer is not pinned
    through the backward pass, so the estimated step can only shrink, and kept tensors are the
    same."""
    target = get_target("x86-64")
    shared = analyse(Bundle.open(pair["shared"]), target, 64, engine=engine)["adaptation"]
    for name in ("apart", "bounded"):
        apart = analyse(Bundle.open(pair[name]), target, 64, engine=engine)["adaptation"]
        assert apart["activations_kept"] == shared["activations_kept"]
        assert apart["workspace"] <= shared["workspace"]


def _l1_gradients(graph: onnx.GraphProto) -> tuple[int, int]:
    """(Muls of Expand and Sign, Muls of Sign and a non-Expand): the L1 gradients as generated
    and as rewritten."""
    producer = {o: n for n in graph.node for o in n.output if o}
    ops = [sorted(producer[x].op_type if x in producer else "" for x in n.input)
           for n in graph.node if n.op_type == "Mul"]
    expanded = sum(1 for o in ops if o == ["Expand", "Sign"])
    return expanded, sum(1 for o in ops if "Sign" in o) - expanded


@pytest.mark.parametrize("engine", ENGINES)
def test_l1_gradient_without_a_full_size_expand(pair, engine):
    """Each regularizer term's gradient multiplies Sign(d) by its scalar directly (generated, it
    expands the scalar to d's shape first), and the term's forward mean follows |d| at once."""
    k = json.loads((pair["bounded"] / "manifest.json").read_text())["ecotta"]["k"]
    assert _l1_gradients(onnx.load(str(pair["shared"] / GRAPHS[engine])).graph) == (k, 0)
    g = onnx.load(str(pair["bounded"] / GRAPHS[engine])).graph
    assert _l1_gradients(g) == (0, k)
    order = {o: i for i, n in enumerate(g.node) for o in n.output}
    means = [(i, order[n.input[0]]) for i, n in enumerate(g.node) if n.op_type == "ReduceMean"
             and n.input[0] in order and g.node[order[n.input[0]]].op_type == "Abs"]
    assert len(means) == k
    assert all(i == made + 1 for i, made in means)
