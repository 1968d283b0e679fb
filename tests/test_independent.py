"""The independent validation protocol (benchmarks/independent.py): a third-party generator's
streams, seeded, run through benchmarks.run_method, summarized with the spread over seeds."""
import importlib.util
import json

import numpy as np
import pytest

from benchmarks import independent as ind

needs_ic = pytest.mark.skipif(importlib.util.find_spec("imagecorruptions") is None,
                              reason="imagecorruptions not installed (pip install -e '.[bench]')")


def _run(method, sev, batch, seed, err, per_kind):
    return {"method": method, "severity": sev, "batch": batch, "seed": seed, "error": err,
            "error_per_domain": per_kind}


def test_summary_spread_and_paired_difference():
    runs = [_run("edgetta", 5, 64, s, e, {"a": e, "b": e}) for s, e in zip((0, 1, 2), (0.20, 0.22, 0.24))]
    runs += [_run("tent", 5, 64, s, e, {"a": e, "b": e}) for s, e in zip((0, 1, 2), (0.25, 0.26, 0.30))]
    runs.append({"method": "tent", "severity": 5, "batch": 64, "seed": 3, "failed": "exit 1"})
    s = ind.summarize(runs)
    r = s["edgetta"]["5"]["64"]
    assert r["mean"] == pytest.approx(0.22) and r["std"] == pytest.approx(0.02)
    assert (r["min"], r["max"]) == (0.20, 0.24) and r["per_kind"]["a"]["mean"] == pytest.approx(0.22)
    assert s["tent"]["5"]["64"]["seeds"] == [0, 1, 2]  # the failed run is left out
    d = ind.paired(s, "edgetta", "tent")["5"]["64"]
    assert d["per_seed"] == pytest.approx([-0.05, -0.04, -0.06])
    assert d["wider_spread"] == pytest.approx(np.std([0.25, 0.26, 0.30], ddof=1))
    text = ind.render({"config": {"methods": ["tent", "edgetta"], "severities": [5], "batches": [64],
                                  "seeds": [0, 1, 2], "frames_per_kind": 1, "kinds": ["a", "b"], "dropped": {},
                                  "work_size": 128, "versions": {}, "command": "x", "started": "t",
                                  "machine": {"platform": "p", "cpus": 2, "load_avg_at_start": [1, 1, 1]}},
                       "summary": s})
    assert "| TENT | 5 | 27.0 ± 2.6 (25.0-30.0) |" in text
    assert "| TENT | 5 | 64 | -5.0 (-6.0 to -4.0) | 2.6 | better |" in text


def test_earlier_runs_of_the_same_protocol_are_kept():
    cfg = {"kinds": ["a"], "frames_per_kind": 1, "work_size": 128, "threads": 1, "smoke": False,
           "checkpoint": "c", "versions": {}, "machine": {}}
    old = {"config": {**cfg, "command": "first"},
           "runs": [_run("tent", 5, 64, 0, 0.3, {"a": 0.3}), _run("tent", 5, 8, 0, 0.4, {"a": 0.4}),
                    {"method": "tent", "severity": 5, "batch": 4, "seed": 0, "failed": "x"}]}
    kept = ind.earlier_runs(old, cfg, {("tent", 5, 64, 0)})
    assert [r["batch"] for r in kept] == [8] and cfg["earlier_commands"] == ["first"]
    assert ind.earlier_runs(old, {**cfg, "work_size": 32}, set()) == []  # another protocol: start afresh


@needs_ic
def test_corruption_is_seeded_and_leaves_numpy_alone():
    from edgetta_export.datasets import to_cifar_shape
    img = to_cifar_shape(np.tile(np.linspace(0, 255, 28, dtype=np.uint8), (1, 28, 1)))[0]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = ind.corrupt_one(img, "gaussian_noise", 5, (0, 0, 0), 128)
    assert np.array_equal(np.random.get_state()[1], before)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, ind.corrupt_one(img, "gaussian_noise", 5, (0, 0, 0), 128))
    assert not np.array_equal(a, ind.corrupt_one(img, "gaussian_noise", 5, (1, 0, 0), 128))
    # area-resizing back from 128 averages 16 noisy pixels: less noise than corrupting at 32
    at32 = ind.corrupt_one(img, "gaussian_noise", 5, (0, 0, 0), 32)
    diff = lambda x: np.abs(x.astype(float) - img).mean()  # noqa: E731
    assert 0 < diff(a) < diff(at32)
    assert np.ptp(ind.corrupt_one(img, "contrast", 5, (0, 0, 0), 128)) < np.ptp(img) / 4


@needs_ic
def test_smoke_run_writes_report(tmp_path, monkeypatch):
    monkeypatch.setattr(ind, "CACHE", tmp_path / "cache")
    doc = tmp_path / "validation.md"
    for method in ("source", "bn_adapt"):  # the second run adds to the first one's report
        assert ind.main(["--smoke", "--methods", method, "--out-dir", str(tmp_path), "--doc", str(doc)]) == 0
    data = json.loads((tmp_path / "independent.json").read_text())
    src, run = data["runs"]
    assert src["method"] == "source" and data["config"]["methods"] == ["source", "bn_adapt"]
    assert run["error"] <= src["error"] + 0.25  # batch statistics on 4 frames: not far off the source model
    assert run["method"] == "bn_adapt" and run["frames"] == 16 and 0 <= run["error"] <= 1
    assert list(run["error_per_domain"]) == list(ind.KINDS[:2])
    assert run["error"] == pytest.approx(np.mean(list(run["error_per_domain"].values())))
    assert data["summary"]["bn_adapt"]["5"]["4"]["per_seed"] == [run["error"]]
    (stream,) = (tmp_path / "cache" / "independent").glob("*.npz")
    with np.load(stream) as s:
        assert s["images"].shape == (16, 32, 32, 3) and list(s["domain_names"]) == list(ind.KINDS[:2])
        from edgetta_export.datasets import fashion_mnist
        clean, labels = fashion_mnist("test")
        assert np.array_equal(s["labels"], labels[s["source_index"]])
        assert not np.array_equal(s["images"], clean[s["source_index"]])
    text = doc.read_text()
    assert "| BN-adapt | 5 |" in text and "| source | 5 |" in text and "Earlier command" in text
