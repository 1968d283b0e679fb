"""Selection on corrupted training images (``python -m benchmarks.selection``): the criterion picks
what it says, and a tiny run goes from training images to the report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from benchmarks.selection import CRITERION, Verdict, choose


def _v(anchor, mean, drift=0.0, forgetting=0.0, lr=0.005):
    return Verdict(name=f"{anchor}", seed=11, anchor=anchor, lr=lr, rounds=10, mean_error=mean, round1=0.2,
                   last=0.2 + drift, drift=drift, forgetting=forgetting, forgetting_batch_stats=None,
                   stable=abs(drift) <= 0.01, retains=forgetting is not None and forgetting <= 0.02)


def test_criterion():
    # the lowest mean error among points that are stable and retain the source
    vs = [_v(0.0, 0.200, drift=0.012), _v(0.001, 0.205, forgetting=0.021), _v(0.003, 0.210), _v(0.01, 0.215)]
    assert choose(vs).anchor == 0.003
    # within 0.1 point counts as tied: the least intervention wins
    assert choose([_v(0.01, 0.2100), _v(0.003, 0.2105), _v(0.03, 0.2098)]).anchor == 0.003
    assert choose([_v(0.01, 0.2100), _v(0.003, 0.2109), _v(0.03, 0.2098)]).anchor == 0.01
    assert choose([_v(0.003, 0.2108), _v(0.003, 0.2100, lr=0.0025)]).lr == 0.005  # the larger lr
    # a drop of more than a point is not "within 1 point" either; no clean figure does not qualify
    assert choose([_v(0.03, 0.19, drift=-0.011), _v(0.0, 0.19, forgetting=None)]) is None


@pytest.mark.slow  # a bundle export and two device runs: about 20 s here
def test_selection_smoke(tmp_path):
    out = tmp_path / "results"
    cache = tmp_path / "cache"
    env = dict(os.environ, EDGETTA_BENCH_CACHE=str(cache), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.selection", "--smoke", "--out-dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "selection.json").read_text())
    assert data["config"]["criterion"] == CRITERION and data["config"]["method"] == "edgetta"
    runs = data["runs"]
    assert set(runs) == {"edgetta+anchor0, seed 11", "edgetta+anchor0.3, seed 11"}
    for run in runs.values():
        rec = run["record"]
        assert rec["torch_loaded"] is False and [x["round"] for x in rec["rounds"]] == [1, 2]
        assert rec["rounds"][-1]["clean_error"] is not None
    # the anchor pulls the meta networks back: a shorter way from the warmed-up state
    dist = {n: run["record"]["rounds"][-1]["param_distance"] for n, run in runs.items()}
    assert dist["edgetta+anchor0.3, seed 11"] < dist["edgetta+anchor0, seed 11"]
    # the stream is made of TRAINING images, and the clean images are not in it
    with np.load(cache / "stream_continual_train_2_s5_seed11.npz") as s, \
            np.load(cache / "clean_fashion_mnist_train_16_seed11.npz") as c:
        assert "Fashion-MNIST train" in str(s["description"]) and len(s["images"]) == 30
        assert not np.intersect1d(s["source_index"], c["source_index"]).size
        assert c["source_index"].max() >= 10_000 or s["source_index"].max() >= 10_000  # beyond the test set's size
    md = (out / "selection.md").read_text()
    assert "Criterion (written down before the first run)" in md and "| 0.3 |" in md and "Chosen on seed 11" in md
