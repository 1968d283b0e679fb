"""The README's main command, end to end: export the built-in model, adapt on the built-in stream."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_export_then_adapt_prints_both_accuracies(tmp_path):
    bundle = tmp_path / "default"
    r = subprocess.run([sys.executable, "-m", "edgetta", "export", "--out", str(bundle)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "backbone density 0.200" in r.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "wrn16_2"
    assert manifest["backbone"]["density"] <= 0.2 + 1e-3   # at least 80% sparse (ERK)

    r = subprocess.run([sys.executable, "-m", "edgetta", "adapt", str(bundle), "--limit", "960",
                        "--quiet"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy without adaptation:" in r.stdout
    assert "accuracy with EcoTTA adaptation" in r.stdout
    assert r.stdout.startswith("engine ort-training, provider cpu")   # chosen by itself, said first

    r = subprocess.run([sys.executable, "-m", "edgetta", "adapt", str(bundle), "--limit", "320",
                        "--quiet", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(r.stdout)
    assert report["frames"] == 320 and report["adaptation_steps"] == 5
    assert (report["engine"], report["provider"]) == ("ort-training", "cpu") and report["machine"]
    assert 0.0 <= report["accuracy_no_adaptation"] <= 1.0
    assert 0.0 <= report["accuracy_adapted"] <= 1.0
    assert set(report["per_domain"]) == {"gaussian_noise", "shot_noise"}


def test_default_bundle_matches_torch_and_source_accuracy(default_bundle):
    """The built-in bundle's inference graph reproduces the torch model (max |diff| < 1e-4) on
    real corrupted frames."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgetta.streams import load_stream
    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT, build_model
    from edgetta.preprocess import preprocess

    manifest = json.loads((default_bundle / "manifest.json").read_text())
    frames = load_stream("demo").images[::50]
    x = preprocess(frames, manifest["input"])
    model = build_model(checkpoint.load(DEFAULT_CHECKPOINT)).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = ort.InferenceSession(str(default_bundle / "inference.onnx")).run(["logits"], {"input": x})[0]
    assert np.abs(out - ref).max() < 1e-4


def test_closed_pipe_ends_quietly(tiny_bundle):
    # `edgetta adapt ... | head -1`: the reader goes away after one line; no traceback follows
    p = subprocess.Popen([sys.executable, "-m", "edgetta", "adapt", str(tiny_bundle), "--limit", "64",
                          "--batch", "16", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 1
    assert first and "Traceback" not in err and "BrokenPipe" not in err


def test_host_tool_errors_are_one_line(tmp_path):
    for args in (["edgetta_export.warmup", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "w.pt")],
                 ["edgetta_export.train", "--data-root", str(tmp_path), "--out", str(tmp_path / "t.pt")]):
        r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_memory_arena_flag_adapts_alike(tiny_bundle):
    """``--memory-arena`` only changes onnxruntime's allocator: the same report, accuracy included."""
    from edgetta.cli import build_parser
    from edgetta.serve.config import ServeConfig
    reports = []
    for flag in ([], ["--memory-arena"]):
        r = subprocess.run([sys.executable, "-m", "edgetta", "adapt", str(tiny_bundle), "--limit", "64",
                            "--batch", "16", "--quiet", "--json", "--threads", "1", *flag],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        reports.append(json.loads(r.stdout))
    assert reports[0]["accuracy_adapted"] == reports[1]["accuracy_adapted"]
    a = build_parser().parse_args(["serve", str(tiny_bundle), "--source", "x", "--memory-arena"])
    assert ServeConfig.from_args(a).memory_arena


def test_memory_arena_is_one_shared_arena_and_adapts_alike(tiny_bundle, corrupted_frames):
    """In one process: Adapters with the arena share one registered arena (a second one loads),
    and steps give what they give without it."""
    import numpy as np
    from edgetta.adapter import Adapter
    frames = corrupted_frames[0][:16]
    ref = Adapter.load(tiny_bundle, engine="onnx", threads=1)
    expected = [ref.step(frames) for _ in range(2)]
    for _ in range(2):
        a = Adapter.load(tiny_bundle, engine="onnx", threads=1, memory_arena=True)
        got = [a.step(frames) for _ in range(2)]
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(e, g)
