"""/ready's reasons besides a silent source, in process: a stuck adaptation step, a guard that
keeps firing, a dead worker; and the exposition's histogram arithmetic."""
import threading
import time

from edgetta import Adapter
from edgetta.serve.telemetry import Histogram, Telemetry
from edgetta.sources import FrameReader, Source
from edgetta.streaming import CollapseGuard, StreamingAdapter


class Stuck:
    def __init__(self, adapter):
        self.inner, self.release = adapter, threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def adapt(self, x):
        assert self.release.wait(30)
        return self.inner.adapt(x)


def telemetry(sa, stuck_after=0.3):
    src = Source("test", lambda: iter(()))
    reader = FrameReader(src, threading.Event())
    reader.last_frame_at = time.monotonic() + 3600  # frames keep arriving, as far as /ready knows
    return Telemetry(sa, src, reader, None, stale_after=10, stuck_after=stuck_after,
                     engine="onnx", provider="cpu")


def test_ready_fails_while_a_step_is_stuck_and_recovers(tiny_bundle, corrupted_frames):
    images, _ = corrupted_frames
    stuck = Stuck(Adapter.load(tiny_bundle))
    sa = StreamingAdapter(stuck, batch_size=2, guard=CollapseGuard(window=0), blocking=False)
    t = telemetry(sa)
    assert t.readiness().ready and t.liveness().ready
    sa.push(images[0])
    sa.push(images[1])
    time.sleep(0.6)
    r = t.readiness()
    assert not r.ready and any("adaptation step running for" in x for x in r.reasons)
    assert t.liveness().ready  # alive: a slow step is not a dead process
    stuck.release.set()
    sa.close(timeout=30)
    assert t.readiness().ready
    sa.worker.close(5)
    assert not t.liveness().ready  # the worker is gone


def test_ready_fails_when_the_guard_keeps_firing(tiny_bundle):
    sa = StreamingAdapter(Adapter.load(tiny_bundle), batch_size=2, threaded=False)
    t = telemetry(sa)
    sa.worker.stats.guard_refires = 3
    sa.worker.stats.last_reset_reason = "1.00 effective classes"
    r = t.readiness()
    assert not r.ready and "collapse guard fired 3 times in a row: 1.00 effective classes" in r.reasons[0]
    assert "edgetta_ready 0.0" in t.metrics()


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert h.samples() == [('_bucket{le="0.1"}', 2), ('_bucket{le="1.0"}', 3),
                           ('_bucket{le="+Inf"}', 4), ("_sum", 2.65), ("_count", 4)]
