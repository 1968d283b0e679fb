"""The running-statistics momentum benchmark (``python -m benchmarks.running_stats``): one run
measures every momentum, and each column is what an Adapter with that momentum predicts."""
import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

from benchmarks.running_stats import CRITERION, choose, measure


def _stream(path, rng, n):
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, n))
    return path


def test_every_momentum_is_an_adapter_with_that_momentum(tiny_bundle, tmp_path):
    from edgetta import Adapter
    rng = np.random.default_rng(3)
    stream, clean, recovery = (_stream(tmp_path / f"{n}.npz", rng, k) for n, k in (("s", 40), ("c", 16), ("r", 24)))
    run = measure(tiny_bundle, stream, clean, recovery, batch=8, rounds=2, momenta=(0.1, 0.5, 1.0), threads=1,
                  split="train", generator="project", seed=0)
    with np.load(stream) as d, np.load(clean) as c, np.load(recovery) as r:
        x, y, cx, cy, rx = d["images"], d["labels"], c["images"], c["labels"], r["images"]
    for res in run.momenta:
        a = Adapter.load(tiny_bundle, threads=1, bn_momentum=res.momentum)
        single = []
        for _ in range(2):
            wrong = []
            for i in range(0, len(x), 8):
                wrong.append(a.step(x[i:i + 8], adapt=False).argmax(1) != y[i:i + 8])
                a.step(x[i:i + 8])
            single.append(float(np.concatenate(wrong).mean()))
        assert res.single_frame_error == single, res.momentum
        clean_err = lambda: float((a.step(cx, adapt=False).argmax(1) != cy).mean())  # noqa: E731
        assert res.clean_error == clean_err()
        a.step(rx[:8])
        assert res.recovery[1] == clean_err()
    # the momenta differ where the statistics move
    assert len({tuple(r.single_frame_error) + (r.clean_error,) for r in run.momenta}) > 1


def test_bn_momentum_option(tiny_bundle):
    import pytest
    from edgetta import Adapter
    assert Adapter.load(tiny_bundle, threads=1).bn_momentum == 0.7  # the exporter's default
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="bn_momentum"):
            Adapter.load(tiny_bundle, threads=1, bn_momentum=bad)


def test_criterion_needs_both_batches_and_prefers_the_least_change():
    def run(batch, errs):
        return {"split": "train", "batch": batch,
                "momenta": [{"momentum": m, "single_frame_error": [e]} for m, e in errs.items()]}
    assert choose([run(64, {0.1: 0.3, 1.0: 0.2})]) is None
    assert choose([run(64, {0.1: 0.30, 0.3: 0.25, 1.0: 0.2}), run(16, {0.1: 0.30, 0.3: 0.25, 1.0: 0.3})]) == 0.3
    # other batch sizes are information, not part of the criterion
    assert choose([run(64, {0.1: 0.30, 0.3: 0.25, 1.0: 0.2}), run(16, {0.1: 0.30, 0.3: 0.25, 1.0: 0.3}),
                   run(8, {0.1: 0.1, 0.3: 0.9, 1.0: 0.9})]) == 0.3
    # within 0.1 point: the one closest to 0.1
    assert choose([run(64, {0.1: 0.3, 0.5: 0.2005, 1.0: 0.2}), run(16, {0.1: 0.3, 0.5: 0.2, 1.0: 0.2})]) == 0.5


def test_running_stats_smoke(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, EDGETTA_BENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.running_stats", "--smoke", "--out-dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "running_stats.json").read_text())
    assert data["criterion"] == CRITERION
    (run,) = data["runs"].values()
    assert run["batch"] == 8 and len(run["momenta"]) == 6 and len(run["batch_stats_error"]) == 1
    md = (out / "running_stats.md").read_text()
    assert "Chosen on the training streams: nothing yet" in md and "| 0.1 |" in md
