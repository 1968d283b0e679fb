"""StreamingAdapter: every frame predicted at once on the published state, adaptation of
buffered batches in a worker that swaps the new state in, back-pressure, the collapse guard."""
import threading
import time

import numpy as np
import pytest

from edgetta import Adapter, FrameError
from edgetta.streaming import CollapseGuard, SourceModel, StreamingAdapter, effective_classes


def test_frames_are_predicted_at_once_and_adapted_on_in_batches(tiny_bundle, corrupted_frames):
    images, labels = corrupted_frames
    a = Adapter.load(tiny_bundle)
    sa = StreamingAdapter(a, batch_size=4, guard=CollapseGuard(window=0), baseline=SourceModel(a),
                          threaded=False)
    fresh = Adapter.load(tiny_bundle)
    first = fresh.step(images[0], adapt=False)[0]
    preds = [sa.push(images[i], label=int(labels[i])) for i in range(10)]

    assert [p.index for p in preds] == list(range(10))
    assert [p.batch for p in preds] == [1] * 4 + [2] * 4 + [3] * 2
    assert all(p.adapted and p.predict_ms > 0 for p in preds)
    assert (a.steps, sa.adapted_batches, sa.pending) == (2, 2, 2)
    # the first frame is predicted before any adaptation, as a fresh adapter predicts it
    assert preds[0].class_index == int(first.argmax())
    p0 = np.exp(first - first.max())
    assert preds[0].confidence == pytest.approx(float(p0.max() / p0.sum()), rel=1e-5)
    # each step adapted on exactly the buffered frames: the same state as stepping on the batches
    fresh.step(images[:4])
    fresh.step(images[4:8])
    for name, value in fresh.meta_state().items():
        np.testing.assert_allclose(a.meta_state()[name], value, rtol=1e-5, atol=1e-6)
    # frames 4.. were predicted on the state published after step 1 (a fresh adapter agrees)
    check = Adapter.load(tiny_bundle)
    check.step(images[:4])
    expect = check.predict_tensor(check.preprocess(images[5]))[0]
    assert preds[5].class_index == int(expect.argmax())
    sa.close()
    assert (a.steps, sa.pending) == (3, 0)
    assert sa.accuracy == np.mean([p.class_index == labels[i] for i, p in enumerate(preds)])
    source = Adapter.load(tiny_bundle).step(images[:10], adapt=False).argmax(1)
    assert sa.accuracy_no_adaptation == np.mean(source == labels[:10])


class SlowAdapter:
    """Wraps a real Adapter; each adaptation step waits until the test releases it."""

    def __init__(self, adapter):
        self.inner = adapter
        self.release = threading.Event()
        self.started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def adapt(self, x):
        self.started.set()
        assert self.release.wait(30)
        return self.inner.adapt(x)


def test_predictions_during_a_step_use_the_previous_state(tiny_bundle, corrupted_frames):
    images, _ = corrupted_frames
    slow = SlowAdapter(Adapter.load(tiny_bundle))
    sa = StreamingAdapter(slow, batch_size=2, guard=CollapseGuard(window=0), blocking=False,
                          capacity=2)
    before = sa.worker.snapshot
    for i in range(2):  # fills batch 1: the worker starts on it and waits
        sa.push(images[i])
    assert slow.started.wait(10)
    t = time.perf_counter()
    during = [sa.push(images[i]) for i in range(2, 8)]
    assert time.perf_counter() - t < 5  # never waits for the step
    assert sa.worker.snapshot is before and slow.inner.steps == 0
    # batch 2 got the second slot; with both slots taken the next frames are predicted only
    assert [p.adapted for p in during] == [True, True, False, False, False, False]
    assert sa.not_adapted == 4
    slow.release.set()
    sa.close(timeout=30)
    assert sa.adapted_batches == 2 and sa.worker.snapshot.steps == 2
    assert sa.worker.snapshot.version > before.version
    after = sa.push(images[9])
    fresh = Adapter.load(tiny_bundle)
    fresh.step(images[0:2])
    fresh.step(images[2:4])
    assert after.class_index == int(fresh.predict_tensor(fresh.preprocess(images[9]))[0].argmax())
    sa.worker.close(5)


def test_blocking_mode_adapts_every_frame(tiny_bundle, corrupted_frames):
    images, _ = corrupted_frames
    sa = StreamingAdapter(Adapter.load(tiny_bundle), batch_size=3, guard=CollapseGuard(window=0),
                          blocking=True, capacity=1)
    preds = [sa.push(images[i]) for i in range(20)]
    sa.close(timeout=60)
    assert all(p.adapted for p in preds) and sa.not_adapted == 0
    assert sa.adapted_batches == 7 and sa.adapter.steps == 7
    sa.worker.close(5)


def test_bad_frames_raise_and_are_not_buffered(tiny_bundle):
    sa = StreamingAdapter(Adapter.load(tiny_bundle), batch_size=4, threaded=False)
    with pytest.raises(FrameError, match="NaN") as e:
        sa.push(np.full((32, 32, 3), np.nan, np.float32))
    assert e.value.kind == "nan"
    with pytest.raises(FrameError):
        sa.push(np.zeros((32, 32, 5), np.uint8))
    assert (sa.frames, sa.pending) == (0, 0)
    # other sizes share a batch with 32x32 frames (each is preprocessed on arrival)
    for shape in [(32, 32, 3), (48, 40, 3), (20, 20, 3), (32, 32, 3)]:
        sa.push(np.full(shape, 128, np.uint8))
    assert sa.adapted_batches == 1


def test_a_non_finite_state_is_never_published(tiny_bundle, corrupted_frames):
    images, _ = corrupted_frames
    a = Adapter.load(tiny_bundle)

    class Poisoning:
        def __getattr__(self, name):
            return getattr(a, name)

        def adapt(self, x):
            out = a.adapt(x)
            a.runner.set_params({n: np.full_like(v, np.nan) for n, v in a.runner.params().items()},
                                a.runner.velocity())
            return out

    sa = StreamingAdapter(Poisoning(), batch_size=2, guard=CollapseGuard(window=0), threaded=False)
    preds = [sa.push(images[i]) for i in range(4)]
    assert sa.worker.stats.nonfinite_resets == 2
    assert sa.worker.snapshot.finite and a.steps == 0
    assert all(p.finite and np.isfinite(p.confidence) for p in preds)


class Stub:
    """Meta state = one number, the adapted model predicts class ``collapse_to`` once it has
    stepped (when set); the warmed-up model predicts by the frame's value."""
    class_names = ["a", "b", "c", "d"]

    def __init__(self, collapse_to=None):
        self.steps, self.resets, self.collapse_to = 0, 0, collapse_to

    def preprocess(self, frame):
        return np.asarray(frame, np.float32).reshape(1, -1)

    def meta_state(self):
        return {"s": np.array([self.steps], np.float32)}

    def adapt(self, x):
        self.steps += 1

    def reset(self):
        self.steps = 0
        self.resets += 1

    def save(self, path):
        pass


class StubPredictor:
    def __init__(self, stub):
        self.stub = stub

    def logits(self, x, state):
        out = np.zeros((len(x), 4))
        for i, v in enumerate(x[:, 0].astype(int)):
            cls = self.stub.collapse_to if state["s"][0] > 0 and self.stub.collapse_to is not None else v % 4
            out[i, cls] = 3.0
        return out


def run_stub(stub, values, window=8):
    pred = StubPredictor(stub)
    base = SourceModel(stub, pred)
    sa = StreamingAdapter(stub, batch_size=4, guard=CollapseGuard(window=window), baseline=base,
                          predictor=pred, threaded=False)
    for v in values:
        sa.push(np.full(2, v))
    return sa


def test_collapse_guard_compares_with_the_warmed_up_model_on_the_same_frames():
    # a static scene: one class for every frame, adapted and warmed-up alike: never a reset
    assert run_stub(Stub(), [2] * 400).resets == 0
    # a varied scene predicted well: no reset
    assert run_stub(Stub(), list(range(400))).resets == 0
    # a varied scene the adapted model collapses onto one class: reset, window starts over
    stub = Stub(collapse_to=1)
    sa = run_stub(stub, list(range(40)))
    assert sa.resets >= 1 and stub.resets == sa.resets
    assert "effective classes" in sa.last_reset_reason
    # a static scene where the adapted model says something else (no collapse evidence): no reset
    assert run_stub(Stub(collapse_to=3), [2] * 400).resets == 0


def test_collapse_guard_entropy_and_off_switch():
    g = CollapseGuard(window=6, diversity_ratio=0.5, entropy_ratio=0.1)
    sharp = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.998 + 0.001
    soft = np.full((6, 3), 1 / 3) + np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.01
    g.observe(sharp, soft)
    assert "entropy" in g.collapsed()
    g.clear()
    g.observe(soft, soft)
    assert g.collapsed() is None
    off = CollapseGuard(window=0)
    off.observe(sharp, soft)
    assert off.collapsed() is None
    assert effective_classes(np.array([1, 1, 1]), 4) == pytest.approx(1.0)
    assert effective_classes(np.array([0, 1, 2, 3]), 4) == pytest.approx(4.0)


def test_batch_size_is_checked(tiny_bundle):
    with pytest.raises(ValueError, match="at least 1"):
        StreamingAdapter(Adapter.load(tiny_bundle), batch_size=0)
