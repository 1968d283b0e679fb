"""The long-term suite (``python -m benchmarks.longterm``) on a tiny stream: every method keeps
its rounds, the clean-image checkpoints and the figures, and the device runtime follows EcoTTA
in PyTorch round after round."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks.longterm import RECOVERY_AFTER, checkpoint_label, default_checkpoint


def test_longterm_smoke(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, EDGETTA_BENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    methods = ["tent", "ecotta_torch", "edgetta", "edgetta_lam0"]
    r = subprocess.run([sys.executable, "-m", "benchmarks.longterm", "--smoke", "--out-dir", str(out),
                        "--methods", *methods], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "longterm.json").read_text())
    cfg = data["config"]
    assert cfg["rounds"] == 2 and cfg["frames_per_round"] == 30 and cfg["clean_after"] == [1, 2]
    assert cfg["generator"] == "project" and cfg["checkpoint"] == checkpoint_label(default_checkpoint())
    res = data["methods"]
    assert set(res) == set(methods)
    for m, rec in res.items():
        assert rec["finished"] and [x["round"] for x in rec["rounds"]] == [1, 2], m
        assert 0.0 <= rec["clean_error_start"] <= 1.0
        for row in rec["rounds"]:
            assert 0.0 <= row["error"] <= 1.0 and len(row["error_per_domain"]) == 15
            assert row["clean_error"] is not None and row["peak_rss_mib"] > 0
            assert row["param_distance"] > 0  # every one of these methods trains something
        # EcoTTA and edgetta also on batch statistics, before round 1 and after the last
        # (TENT always predicts on batch statistics)
        assert (rec["clean_error_start_batch_stats"] is None) == (m == "tent")
        assert [x["clean_error_batch_stats"] is None for x in rec["rounds"]] == [True, m == "tent"]
        # adaptation without reset moves the parameters further in round 2
        assert rec["rounds"][1]["param_distance"] > rec["rounds"][0]["param_distance"], m
    assert res["edgetta"]["torch_loaded"] is False and res["tent"]["torch_loaded"] is True
    assert res["edgetta"]["lam"] == 0.5 and res["edgetta_lam0"]["lam"] == 0.0
    # the device runtime follows EcoTTA in PyTorch over rounds: same stream predictions, same
    # distance, same clean predictions on running and on batch statistics
    assert res["edgetta"]["clean_error_start_batch_stats"] == res["ecotta_torch"]["clean_error_start_batch_stats"]
    for a, b in zip(res["edgetta"]["rounds"], res["ecotta_torch"]["rounds"]):
        assert a["error"] == b["error"] and a["clean_error_batch_stats"] == b["clean_error_batch_stats"]
        assert a["clean_error"] == b["clean_error"]
        assert abs(a["param_distance"] - b["param_distance"]) <= 1e-3 * b["param_distance"]
    # the regularizer changes the updates
    assert res["edgetta_lam0"]["rounds"][1]["param_distance"] != res["edgetta"]["rounds"][1]["param_distance"]
    # edgetta's runs end with the recovery curve on clean frames, the others have none
    for m, rec in res.items():
        curve = rec["recovery"]
        assert [p["batches"] for p in curve] == (list(RECOVERY_AFTER) if m.startswith("edgetta") else []), m
        assert all(0.0 <= p["clean_error"] <= 1.0 and 0.0 <= p["clean_error_fresh"] <= 1.0 for p in curve)
    for name in ("longterm_error.png", "longterm_clean.png", "longterm_rss_distance.png", "longterm.md"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "longterm.md").read_text()
    assert "| edgetta |" in md and "lambda=0" in md and "TENT" in md and "Back to clean" in md


def test_recovery_curve_is_the_device_adapting_on_clean_frames(tiny_bundle):
    """The curve's points are what an Adapter predicts after adapting on the same clean batches:
    from the adapted state, and (the reference) from the warmed-up state."""
    import numpy as np
    from benchmarks.longterm import EdgettaRunner, recovery_curve
    from edgetta import Adapter
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    clean_x, clean_y = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16)
    runner = EdgettaRunner(tiny_bundle, threads=1)
    for i in range(0, 48, 8):
        runner.step(stream[i:i + 8])
    curve = recovery_curve(runner, frames, clean_x, clean_y, batch=8, after=(1, 3))

    def errors(start_adapted: bool) -> list[float]:
        a = Adapter.load(tiny_bundle, threads=1)
        for i in range(0, 48 if start_adapted else 0, 8):  # the same stream: the same adapted state
            a.step(stream[i:i + 8])
        out = []
        for k in range(1, 4):
            a.step(frames[(k - 1) * 8:k * 8])
            if k in (1, 3):
                out.append(float((a.step(clean_x, adapt=False).argmax(1) != clean_y).mean()))
        return out
    assert [p.batches for p in curve] == [1, 3]
    assert [p.clean_error for p in curve] == errors(True)
    assert [p.clean_error_fresh for p in curve] == errors(False)


def _device_and_torch(tiny_ckpt, tiny_bundle, anchor, steps=3):
    """The device loop and EcoTTA in PyTorch after the same ``steps`` batches of random frames:
    (the device's state before, and after, the PyTorch model's state dict under the device's names)."""
    import numpy as np
    import torch
    from benchmarks.tta import EcoTTATorch
    from edgetta import Adapter
    from edgetta_export.train import to_tensor
    torch.manual_seed(0)
    adapter = Adapter.load(tiny_bundle, threads=1, anchor=anchor)
    a = adapter.bundle.manifest.adaptation
    norm = tiny_ckpt["normalization"]
    method = EcoTTATorch(tiny_ckpt, lr=a.lr, momentum=a.momentum, anchor=anchor, bn_momentum=a.bn_momentum)
    start = adapter.meta_state()
    rng = np.random.default_rng(0)
    for _ in range(steps):
        frames = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        adapter.step(frames)
        method.step(to_tensor(frames, norm["mean"], norm["std"]))
    torch_state = {"model." + k: v.numpy() for k, v in method.model.state_dict().items()}
    return start, adapter.meta_state(), torch_state


def test_ecotta_torch_moves_running_statistics_once_per_step(tiny_ckpt, tiny_bundle):
    """The regularizer recomputes each meta network in train mode; the running statistics must
    still move once per step, as on the device (they moved twice: momentum 0.19 for 0.1)."""
    import numpy as np
    start, device, torch_state = _device_and_torch(tiny_ckpt, tiny_bundle, anchor=0.0)
    stats = [n for n in device if "running_" in n]  # the meta BatchNorms' (and any the device keeps)
    assert any(".metas." in n for n in stats)
    for n in stats:
        assert not np.allclose(device[n], start[n])  # they moved
        np.testing.assert_allclose(torch_state[n], device[n], rtol=1e-4, atol=1e-5, err_msg=n)


@pytest.mark.slow  # two device loops and two PyTorch models: about 20 s here
def test_ecotta_torch_anchor_is_the_device_anchor(tiny_ckpt, tiny_bundle):
    """``EcoTTATorch(anchor=rho)`` pulls the meta parameters back as ``Adapter(anchor=rho)`` does,
    so the selection grid may use it as the device's proxy."""
    import numpy as np
    _, free, _ = _device_and_torch(tiny_ckpt, tiny_bundle, anchor=0.0)
    _, device, torch_state = _device_and_torch(tiny_ckpt, tiny_bundle, anchor=0.3)
    trainable = [n for n in device if "running_" not in n]
    assert any(not np.allclose(device[n], free[n]) for n in trainable)  # rho = 0.3 changes the state
    for n in trainable:
        np.testing.assert_allclose(torch_state[n], device[n], rtol=1e-4, atol=1e-5, err_msg=n)
