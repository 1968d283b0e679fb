"""StreamingAdapter: every frame predicted at once, adaptation on buffered batches, the
collapse guard."""
import numpy as np
import pytest

from edgetta import Adapter, FrameError
from edgetta.streaming import CollapseGuard, SourceModel, StreamingAdapter


def test_frames_are_predicted_at_once_and_adapted_on_in_batches(tiny_bundle, corrupted_frames):
    images, labels = corrupted_frames
    a = Adapter.load(tiny_bundle)
    sa = StreamingAdapter(a, batch_size=4, guard=CollapseGuard(window=0),
                          baseline=SourceModel(a))
    fresh = Adapter.load(tiny_bundle)
    first = fresh.step(images[0], adapt=False)[0]
    preds = [sa.push(images[i], label=int(labels[i])) for i in range(10)]

    assert [p.index for p in preds] == list(range(10))
    assert [p.batch for p in preds] == [1] * 4 + [2] * 4 + [3] * 2
    assert all(p.adapted and p.predict_ms > 0 for p in preds)
    assert (a.steps, sa.adapted_batches, sa.pending) == (2, 2, 2)
    assert len(sa.predict_ms) == 10 and len(sa.adapt_ms) == 2
    # the first frame is predicted before any adaptation, as a fresh adapter predicts it
    assert preds[0].class_index == int(first.argmax())
    assert preds[0].confidence == pytest.approx(float(np.exp(first - first.max()).max()
                                                      / np.exp(first - first.max()).sum()), rel=1e-5)
    # each step adapted on exactly the buffered frames: the same state as stepping on the batches
    fresh.step(images[:4])
    fresh.step(images[4:8])
    for name, value in fresh.meta_state().items():
        np.testing.assert_allclose(a.meta_state()[name], value, rtol=1e-5, atol=1e-6)
    assert sa.flush() and (a.steps, sa.pending) == (3, 0)
    assert not sa.flush()
    # accuracies are measured: adapted from the pushed predictions, the baseline never adapts
    assert sa.accuracy == np.mean([p.class_index == labels[i] for i, p in enumerate(preds)])
    source = Adapter.load(tiny_bundle).step(images[:10], adapt=False).argmax(1)
    assert sa.accuracy_no_adaptation == np.mean(source == labels[:10])


def test_batch_of_one_adapts_on_every_frame(tiny_bundle, corrupted_frames):
    images, _ = corrupted_frames
    sa = StreamingAdapter(Adapter.load(tiny_bundle), batch_size=1, guard=CollapseGuard(window=0))
    for i in range(3):
        sa.push(images[i])
    assert (sa.adapted_batches, sa.adapter.steps, sa.pending) == (3, 3, 0)
    with pytest.raises(ValueError, match="at least 1"):
        StreamingAdapter(sa.adapter, batch_size=0)


def test_bad_frames_raise_and_are_not_buffered(tiny_bundle):
    sa = StreamingAdapter(Adapter.load(tiny_bundle), batch_size=4)
    with pytest.raises(FrameError, match="NaN"):
        sa.push(np.full((32, 32, 3), np.nan, np.float32))
    with pytest.raises(FrameError):
        sa.push(np.zeros((32, 32, 5), np.uint8))
    assert (sa.frames, sa.pending) == (0, 0)
    # other sizes share a batch with 32x32 frames (each is preprocessed on arrival)
    for shape in [(32, 32, 3), (48, 40, 3), (20, 20, 3), (32, 32, 3)]:
        sa.push(np.full(shape, 128, np.uint8))
    assert sa.adapted_batches == 1


class CollapsingStub:
    """Predicts varied classes until it has adapted, then always class 0."""
    class_names = ["a", "b", "c"]

    def __init__(self):
        self.steps = 0
        self.resets = 0

    def preprocess(self, frame):
        return np.asarray(frame, np.float32)[None]

    def predict_tensor(self, x):
        logits = np.zeros((1, 3))
        logits[0, 0 if self.steps else int(x.sum()) % 3] = 8.0
        return logits

    def adapt(self, x):
        self.steps += 1

    def reset(self):
        self.steps = 0
        self.resets += 1


def test_collapse_guard_resets_to_the_warmed_up_state():
    stub = CollapsingStub()
    sa = StreamingAdapter(stub, batch_size=4, guard=CollapseGuard(window=8, max_share=0.9,
                                                                   min_entropy=0.0))
    for i in range(8):  # varied, then after the first step all class 0: half the window
        sa.push(np.full(2, i))
    assert (sa.resets, stub.steps) == (0, 2)
    for i in range(4):  # the whole window is class 0 now
        sa.push(np.full(2, i))
    assert (sa.resets, stub.resets, stub.steps) == (1, 1, 0)
    assert "class 0 is 100%" in sa.last_reset_reason
    for i in range(4):  # the window starts over after a reset
        sa.push(np.full(2, i))
    assert sa.resets == 1


def test_collapse_guard_entropy_and_off_switch():
    confident = np.array([0.998, 0.001, 0.001])
    g = CollapseGuard(window=6, max_share=0.9, min_entropy=0.05)
    for i in range(6):  # classes vary, but every prediction is near one-hot
        g.observe(np.roll(confident, i))
    assert "entropy" in g.collapsed()
    g = CollapseGuard(window=6, max_share=0.9, min_entropy=0.05)
    for i in range(6):
        g.observe(np.roll(np.array([0.5, 0.3, 0.2]), i))
    assert g.collapsed() is None
    off = CollapseGuard(window=0)
    for _ in range(10):
        off.observe(confident)
    assert off.collapsed() is None
