"""One copy of the frozen weights for prediction and adaptation (``Adapter(share_weights=...)``):
what is shared, that both sessions really read it, and that it changes no number."""
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetta import Adapter, Bundle, BundleError
from edgetta.engines import (SharedWeights, frozen_weights, has_blocked_layout, inference_session,
                             select_engine, session_options, weight_sharing)

ROOT = Path(__file__).resolve().parents[1]
ARM = Path(os.environ.get("EDGETTA_ARM64_ROOT", "/opt/edgetta-arm64"))
QEMU = shutil.which("qemu-aarch64-static")
ENGINES = ("ort-training", "onnx")
GRAPH = {"ort-training": "training_model.onnx", "onnx": "portable_step.onnx"}


def onnx_initializers(path: Path) -> tuple[dict, set]:
    """Every initializer of a graph as onnx decodes it (sparse ones densified), with its
    serialized form, and the graph's input names."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(path)).graph
    out = {t.name: (numpy_helper.to_array(t), t.SerializeToString()) for t in graph.initializer}
    for s in graph.sparse_initializer:
        values, indices = numpy_helper.to_array(s.values), numpy_helper.to_array(s.indices)
        dense = np.zeros(int(np.prod(s.dims)), values.dtype)
        flat = np.ravel_multi_index(indices.T, tuple(s.dims)) if indices.ndim == 2 else indices
        dense[flat] = values
        out[s.values.name] = (dense.reshape(tuple(s.dims)), s.SerializeToString())
    return out, {i.name for i in graph.input}


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_weights_are_the_initializers_both_graphs_hold_alike(tiny_bundle, engine):
    """The device's protobuf reader finds exactly the float32 initializers that the inference
    graph and the engine's graph store identically (graph inputs excluded), and decodes them as
    onnx does, sparse ones included."""
    inf, inf_inputs = onnx_initializers(tiny_bundle / "inference.onnx")
    step, step_inputs = onnx_initializers(tiny_bundle / GRAPH[engine])
    expected = {n for n, (a, raw) in inf.items() if n in step and step[n][1] == raw
                and a.dtype == np.float32 and n not in inf_inputs | step_inputs}
    shared = frozen_weights(Bundle.open(tiny_bundle), engine)
    assert set(shared.arrays) == expected
    # every frozen conv of the backbone, the sparse ones too; no meta-network tensor
    convs = {n for n in inf if n.startswith("model.backbone") and inf[n][0].ndim == 4}
    assert convs and convs <= expected
    assert not any(".metas." in n for n in expected)
    import onnx
    assert any(s.values.name in expected for s in onnx.load(str(tiny_bundle / "inference.onnx")).graph.sparse_initializer)
    for name, value in shared.arrays.items():
        assert value.dtype == np.float32 and not value.flags.writeable
        np.testing.assert_array_equal(value, inf[name][0], err_msg=name)
    assert shared.nbytes == sum(inf[n][0].nbytes for n in expected)


def test_a_damaged_graph_is_a_bundle_error(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = (copy / "inference.onnx").read_bytes()
    (copy / "inference.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cannot read the frozen weights"):
        frozen_weights(Bundle.open(copy, verify=False), "onnx")


def _sessions(bundle: Bundle, engine: str, shared: SharedWeights | None):
    """An engine and an inference session with edgetta's settings, without the NCHWc layout
    (which makes per-session copies), the weights shared or not."""
    opts = session_options(blocked_layout=False)
    if shared is not None:
        shared.add_to(opts)
    return select_engine(engine, bundle, opts=opts, shared=shared), inference_session(bundle, opts, "cpu")


def _run(runner, session, x: np.ndarray, stats: dict) -> tuple[list, dict]:
    """A prediction of one frame, then three steps (their logits and losses); the state after."""
    out = [session.run(["logits"], {"input": x[:1], **runner.params(), **stats})[0]]
    for _ in range(3):
        r = runner.step(x)
        out += [r.logits, np.float32(r.loss)]
    return out, runner.params()


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_weights_change_no_number(tiny_bundle, corrupted_frames, engine):
    """With the same session settings, shared weights give bit-identical predictions, step
    logits, losses and adapted parameters."""
    bundle = Bundle.open(tiny_bundle)
    stats = {n: v for n, v in bundle.initial_meta_state().items() if n in bundle.manifest.kept_running_stats}
    x = Adapter(bundle).preprocess(corrupted_frames[0][:16])
    ref, ref_state = _run(*_sessions(bundle, engine, None), x, stats)
    got, got_state = _run(*_sessions(bundle, engine, frozen_weights(bundle, engine)), x, stats)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    for name, value in ref_state.items():
        np.testing.assert_array_equal(got_state[name], value, err_msg=name)


def _with_zeroed(shared: SharedWeights, name: str, fn):
    """``fn()`` while one shared weight is zero, then the weight restored."""
    array = shared.arrays[name]
    keep = array.copy()
    array.flags.writeable = True
    try:
        array[...] = 0
        return fn()
    finally:
        array[...] = keep
        array.flags.writeable = False


@pytest.mark.parametrize("engine", ENGINES)
def test_both_sessions_read_the_one_shared_copy(tiny_bundle, corrupted_frames, engine):
    """The sharing really happens: zeroing a shared array in place changes the inference
    session's prediction and the engine's loss; restored, both come back bit for bit."""
    a = Adapter.load(tiny_bundle, engine=engine, share_weights=True)
    assert a.shared is not None and a.runner.shared is a.shared
    x = a.preprocess(corrupted_frames[0][:16])
    name = max(a.shared.arrays, key=lambda n: a.shared.arrays[n].size)

    def predict_and_step():
        p = a.predict_tensor(x[:4])
        logits = a.adapt(x)
        loss = a.last_loss
        a.reset()
        return p, logits, loss

    before = predict_and_step()
    zeroed = _with_zeroed(a.shared, name, predict_and_step)
    after = predict_and_step()
    assert np.abs(zeroed[0] - before[0]).max() > 1e-3
    assert np.abs(zeroed[1] - before[1]).max() > 1e-3 and zeroed[2] != before[2]
    for u, v in zip(before, after):
        np.testing.assert_array_equal(u, v)


@pytest.mark.skipif(not has_blocked_layout(), reason="onnxruntime has no NCHWc layout here")
def test_the_nchwc_layout_copies_the_weights_so_auto_does_not_share_on_x86(tiny_bundle, corrupted_frames):
    """Why sharing is off by default on x86-64: with onnxruntime's NCHWc layout (its default
    there), a session reads its own reordered copy, not the shared array, so sharing would add
    a copy. (Changing a shared array in place is not something edgetta does: it shows here
    which copy a session reads.)"""
    bundle = Bundle.open(tiny_bundle)
    shared = frozen_weights(bundle, "onnx")
    opts = session_options()  # blocked layout on
    shared.add_to(opts)
    session = inference_session(bundle, opts, "cpu")
    x = Adapter(bundle).preprocess(corrupted_frames[0][:4])
    feeds = {"input": x, **bundle.initial_meta_state()}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    before = session.run(["logits"], feeds)[0]
    convs = [n for n, v in shared.arrays.items() if v.ndim == 4 and v.shape[0] % 16 == 0 and v.shape[1] % 16 == 0]
    zeroed = _with_zeroed(shared, convs[0], lambda: session.run(["logits"], feeds)[0])
    np.testing.assert_array_equal(zeroed, before)
    assert Adapter.load(tiny_bundle).shared is None  # auto


def test_when_weights_are_shared():
    assert weight_sharing(None, "cpu") is (not has_blocked_layout())
    assert weight_sharing(None, "cuda") is False
    assert weight_sharing(True, "cpu") is True and weight_sharing(False, "cpu") is False
    with pytest.raises(ValueError, match="CPU provider"):
        weight_sharing(True, "cuda")


def test_the_engine_keeps_the_shared_weights_alive(tiny_bundle, corrupted_frames):
    """The engine's session reads the shared arrays: an engine outliving its adapter still
    steps exactly as an unshared one does."""
    frames = corrupted_frames[0][:16]
    a = Adapter.load(tiny_bundle, engine="onnx", share_weights=True)
    x = a.preprocess(frames)
    runner = a.runner
    del a
    gc.collect()
    garbage = [np.full(1 << 16, np.nan, np.float32) for _ in range(64)]  # reuse of freed memory
    bundle = Bundle.open(tiny_bundle)
    ref, _ = _sessions(bundle, "onnx", None)
    np.testing.assert_array_equal(runner.step(x).logits, ref.step(x).logits)
    del garbage


ARM_SCRIPT = """
import json, sys
import numpy as np
from edgetta import Adapter
frames = np.load(sys.argv[2])
out = {}
for share in (None, False):
    a = Adapter.load(sys.argv[1], share_weights=share)
    got = [a.step(frames[:1], adapt=False)] + [a.step(frames[i * 8:(i + 1) * 8]) for i in range(2)]
    got.append(a.step(frames[:4], adapt=False))
    out[str(share)] = dict(shared=a.shared.nbytes if a.shared else 0, loss=a.last_loss,
                           logits=[g.tolist() for g in got],
                           state={k: v.tolist() for k, v in a.meta_state().items()})
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or not (ARM / "sysroot/usr/bin/python3.11").exists(),
                    reason="no arm64 emulation here: run scripts/arm64_emulation.sh (root)")
def test_aarch64_shares_by_default_and_changes_no_number(tiny_bundle, corrupted_frames, tmp_path):
    """On aarch64 (emulated) the default adapter holds the frozen weights once; its predictions,
    step logits, loss and adapted state equal an unshared adapter's bit for bit."""
    from benchmarks.load_memory import run_child  # the emulated arm64 Python, as the benchmark runs it
    np.save(tmp_path / "frames.npy", corrupted_frames[0][:16])
    out = run_child(ARM_SCRIPT, [str(tiny_bundle), str(tmp_path / "frames.npy")], emulated=True)
    shared, unshared = out["None"], out["False"]
    assert shared["shared"] > 0 and unshared["shared"] == 0
    assert shared["loss"] == unshared["loss"]
    assert shared["logits"] == unshared["logits"] and shared["state"] == unshared["state"]


def test_load_memory_measures_adapters_with_and_without_sharing(tmp_path):
    """A tiny run of ``python -m benchmarks.load_memory --part adapter``: each engine with and
    without shared weights, in fresh processes, and how far their numbers are apart."""
    env = dict(os.environ, EDGETTA_BENCH_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "load_memory.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", "--part", "adapter", "--models", "wrn16_1",
                        "--steps", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["adapter_rows"]
    assert "rows" not in data
    assert {(x["engine"], x["share_weights"]) for x in rows} == {(e, s) for e in ENGINES for s in (False, True)}
    for x in rows:
        assert x["loaded_mib"] > 0 and x["after_step_mib"] > 0 and x["step_s"] > 0
        assert (x["shared_mib"] > 0) == x["share_weights"]
        if x["share_weights"]:  # on x86-64 without the NCHWc layout: rounding only
            assert x["max_abs_diff_vs_unshared"] <= (1e-5 if has_blocked_layout() else 0.0)
