"""The device side: bundle verification, the adapter loop, and no torch anywhere near it."""
import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetta import Adapter, Bundle, BundleError, EngineUnavailable, FrameError, StateError
from tests.test_manifest import resign

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"


def run_without_torch(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A fresh interpreter in which ``import torch`` fails, as on a device. (onnx is there:
    onnxruntime-training itself depends on it.)"""
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_device_package_never_imports_torch_or_host_code():
    banned = {"torch", "torchvision", "onnx", "export"}
    for path in (ROOT / "edgetta").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                top = n.split(".")[0]
                if top in banned:
                    # allowed: 'edgetta export' reaching for the host toolchain, and the profiler
                    # reading graphs with onnx (a dependency of onnxruntime-training itself)
                    assert (path.name, top) in {("cli.py", "export"), ("profile.py", "onnx")}, \
                        f"{path}: imports {n}"


def test_adaptation_runs_without_torch(tiny_bundle, corrupted_frames):
    """20 onnxruntime-training steps on real corrupted images in a torch-free process: the loss
    falls, every meta parameter changes, the frozen backbone and the checkpoint's running
    statistics do not."""
    images, _ = corrupted_frames
    np.save(tiny_bundle.parent / "frames.npy", images[:32])
    code = f"""
import json, numpy as np
import edgetta
from edgetta import Adapter
assert 'torch' not in sys.modules or sys.modules['torch'] is None
a = Adapter.load({str(tiny_bundle)!r})
frames = np.load({str(tiny_bundle.parent / 'frames.npy')!r})
x = a.preprocess(frames)
before = a.meta_state()
state = a.runner.checkpoint_state.parameters
frozen = {{n: state[n].data.copy() for n in a.bundle.manifest.meta_running_stats}}
losses = []
for _ in range(20):
    a.step(frames)
    losses.append(a.last_loss)
after = a.meta_state()
changed = [n for n in a.bundle.manifest.trainable if not np.array_equal(before[n], after[n])]
frozen_same = all(np.array_equal(frozen[n], state[n].data) for n in frozen)
# backbone inside the training session: with the initial meta values restored, a forward pass
# gives the very first loss again, bit for bit
a.reset()
replay = a.runner.loss_of(x)
print(json.dumps(dict(losses=losses, changed=len(changed), total=len(a.bundle.manifest.trainable), frozen_same=frozen_same,
                      replay=replay, torch=str(sys.modules.get('torch')))))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] == "None"
    assert out["losses"][-1] < out["losses"][0]
    assert out["changed"] == out["total"]
    assert out["frozen_same"]
    assert out["replay"] == out["losses"][0]
    # and the bundle's files are untouched
    Bundle.open(tiny_bundle)


def test_export_without_torch_says_how_to_install(tmp_path):
    r = run_without_torch(f"from edgetta.cli import main; sys.exit(main(['export', '--out', {str(tmp_path / 'b')!r}]))")
    assert r.returncode == 2
    assert "pip install 'edgetta[export]'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_tampered_file_is_refused(bundle_copy):
    path = bundle_copy / "inference.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 of inference.onnx does not match"):
        Adapter.load(bundle_copy)


def test_truncated_missing_and_foreign_bundles_are_refused(bundle_copy, tmp_path):
    ck = bundle_copy / "checkpoint"
    ck.write_bytes(ck.read_bytes()[:-10])
    with pytest.raises(BundleError, match="checkpoint has .* bytes"):
        Bundle.open(bundle_copy)
    (bundle_copy / "checkpoint").unlink()
    with pytest.raises(BundleError, match="checkpoint listed in the manifest is missing"):
        Bundle.open(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.open(tmp_path / "empty")
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    resign(bundle_copy, m)
    with pytest.raises(BundleError, match="schema 99"):
        Bundle.open(bundle_copy)


def test_cli_refuses_a_tampered_bundle_in_one_line(bundle_copy):
    (bundle_copy / "training_model.onnx").write_bytes(b"not a model")
    r = subprocess.run([sys.executable, "-m", "edgetta", "adapt", str(bundle_copy), "--limit", "8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_save_resume_and_reset(tiny_bundle, corrupted_frames, tmp_path):
    images, _ = corrupted_frames
    a = Adapter.load(tiny_bundle)
    initial = a.meta_state()
    for i in range(3):
        a.step(images[i * 16:(i + 1) * 16])
    adapted = a.meta_state()
    a.save(tmp_path / "state.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["state.npz"]  # no temp file left
    b = Adapter.load(tiny_bundle)
    b.resume(tmp_path / "state.npz")
    assert b.steps == 3
    for n in adapted:
        np.testing.assert_array_equal(b.meta_state()[n], adapted[n])
    # the resumed adapter continues exactly as the original would
    np.testing.assert_allclose(a.step(images[48:64]), b.step(images[48:64]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.step(images[64:80], adapt=False), b.step(images[64:80], adapt=False),
                               rtol=1e-5, atol=1e-5)
    a.reset()
    assert a.steps == 0
    for n in initial:
        np.testing.assert_array_equal(a.meta_state()[n], initial[n])


def test_bad_frames_raise_clear_errors(tiny_bundle):
    a = Adapter.load(tiny_bundle)
    with pytest.raises(FrameError, match="NaN"):
        a.step(np.full((32, 32, 3), np.nan, dtype=np.float32))
    with pytest.raises(FrameError, match="empty"):
        a.step(np.zeros((0, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(FrameError, match="shape"):
        a.step(np.zeros((2, 32, 32, 5), dtype=np.uint8))
    with pytest.raises(FrameError, match="shape"):
        a.step(np.zeros((2, 2, 32, 32, 3), dtype=np.uint8))
    # other sizes are resized as the manifest says; greyscale is expanded
    assert a.step(np.zeros((48, 40, 3), dtype=np.uint8), adapt=False).shape == (1, 10)
    assert a.step(np.zeros((32, 32), dtype=np.uint8), adapt=False).shape == (1, 10)


def test_unavailable_provider_is_a_clear_error_naming_a_fix(tiny_bundle):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    for engine in ("ort-training", "onnx", "auto"):
        with pytest.raises(EngineUnavailable, match="no CUDAExecutionProvider") as e:
            Adapter.load(tiny_bundle, provider="cuda", engine=engine)
        assert "\n" not in str(e.value) and "pip install" in str(e.value)
    # auto picks the CPU here, and says so
    a = Adapter.load(tiny_bundle, provider="auto")
    assert (a.engine, a.provider) == ("ort-training", "cpu")


def test_plain_sgd_runs_on_the_bundles_optimizer_graph(tiny_bundle):
    """momentum=0 uses onnxruntime-training's own SGD graph; it must agree with the device's
    update rule (which with a vanishing momentum is plain SGD on the first step)."""
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    a = Adapter.load(tiny_bundle, momentum=0.0, lr=0.01)
    b = Adapter.load(tiny_bundle, momentum=1e-12, lr=0.01)
    assert a.runner.uses_optimizer_graph and not b.runner.uses_optimizer_graph
    a.step(frames)
    b.step(frames)
    sa, sb = a.meta_state(), b.meta_state()
    moved = 0
    for n in sa:
        np.testing.assert_allclose(sa[n], sb[n], rtol=1e-5, atol=1e-7)
        moved += not np.array_equal(sa[n], Adapter.load(tiny_bundle).meta_state()[n])
    assert moved > 0


def test_portable_engine_matches_ort_training(tiny_bundle, corrupted_frames):
    """The portable step (standard ONNX ops on plain onnxruntime) and onnxruntime-training give
    the same losses, logits and adapted state on the same frames."""
    images, _ = corrupted_frames
    a = Adapter.load(tiny_bundle)
    b = Adapter.load(tiny_bundle, engine="onnx")
    for i in range(4):
        frames = images[i * 16:(i + 1) * 16]
        la, lb = a.step(frames), b.step(frames)
        assert a.last_loss == pytest.approx(b.last_loss, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    sa, sb = a.meta_state(), b.meta_state()
    for n in sa:
        assert np.abs(sa[n] - sb[n]).max() <= 1e-4 * (np.abs(sa[n]).max() + 1e-6), n
    np.testing.assert_allclose(a.step(images[:8], adapt=False), b.step(images[:8], adapt=False),
                               rtol=1e-4, atol=1e-4)


def test_portable_step_uses_standard_onnx_ops_only(tiny_bundle):
    import onnx
    model = onnx.load(str(tiny_bundle / "portable_step.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    onnx.checker.check_model(model)  # (export runs the full check before sparse storage)


HIDE_TRAINING = """
import importlib.abc, sys
class HideTraining(importlib.abc.MetaPathFinder):
    # as on a device with plain onnxruntime: onnxruntime.training does not exist
    def find_spec(self, name, path=None, target=None):
        if name == 'onnxruntime.training' or name.startswith('onnxruntime.training.'):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, HideTraining())
"""


def test_auto_engine_falls_back_to_the_portable_step_without_onnxruntime_training(
        tiny_bundle, corrupted_frames, tmp_path):
    """In a process where onnxruntime.training cannot be imported, Adapter.load picks the
    portable engine by itself: predictions equal the training engine's bit for bit (the same
    inference graph and state), and adaptation logits and state stay close."""
    images, _ = corrupted_frames
    np.save(tmp_path / "frames.npy", images[:48])
    code = HIDE_TRAINING + f"""
import json, numpy as np
from edgetta import Adapter, EngineUnavailable
frames = np.load({str(tmp_path / 'frames.npy')!r})
a = Adapter.load({str(tiny_bundle)!r})
try:
    Adapter.load({str(tiny_bundle)!r}, engine='ort-training')
    refused = ''
except EngineUnavailable as e:
    refused = str(e)
predict = a.step(frames[:16], adapt=False)
adapted = [a.step(frames[16 * i:16 * (i + 1)]) for i in range(3)]
np.savez({str(tmp_path / 'portable.npz')!r}, predict=predict, adapted=np.stack(adapted),
         **{{'state/' + k: v for k, v in a.meta_state().items()}})
print(json.dumps(dict(engine=a.engine, provider=a.provider, refused=refused,
                      training_loaded='onnxruntime.training.api' in sys.modules)))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["engine"] == "onnx" and out["provider"] == "cpu" and not out["training_loaded"]
    assert "use --engine onnx" in out["refused"] and "\n" not in out["refused"]
    ref = Adapter.load(tiny_bundle)
    assert ref.engine == "ort-training"   # here onnxruntime-training is installed
    portable = np.load(tmp_path / "portable.npz")
    np.testing.assert_array_equal(portable["predict"], ref.step(images[:16], adapt=False))
    adapted = [ref.step(images[16 * i:16 * (i + 1)]) for i in range(3)]
    np.testing.assert_allclose(portable["adapted"], np.stack(adapted), rtol=1e-4, atol=1e-4)
    for name, value in ref.meta_state().items():
        np.testing.assert_allclose(portable[f"state/{name}"], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_threads_option_and_engine_names(tiny_bundle):
    a = Adapter.load(tiny_bundle, threads=1, engine="onnx")
    assert (a.engine, a.provider, a.threads) == ("onnx", "cpu", 1)
    with pytest.raises(ValueError, match="threads"):
        Adapter.load(tiny_bundle, threads=0)
    with pytest.raises(ValueError, match="engine"):
        Adapter.load(tiny_bundle, engine="tensorrt")
    with pytest.raises(ValueError, match="lr"):
        Adapter.load(tiny_bundle, lr=1e308)


def test_non_finite_state_is_never_saved_nor_resumed(tiny_bundle, corrupted_frames, tmp_path):
    images, _ = corrupted_frames
    a = Adapter.load(tiny_bundle)
    a.step(images[:16])
    good = tmp_path / "good.npz"
    a.save(good)
    # a state file holding NaN (as a failing disk or a bug could leave): refused, state kept
    with np.load(good) as data:
        arrays = {k: data[k] for k in data.files}
    name = next(k for k in arrays if k.startswith("t/"))
    arrays[name] = np.full_like(arrays[name], np.nan)
    np.savez(tmp_path / "nan.npz", **arrays)
    b = Adapter.load(tiny_bundle)
    before = b.meta_state()
    with pytest.raises(StateError, match="non-finite"):
        b.resume(tmp_path / "nan.npz")
    for k, v in b.meta_state().items():
        np.testing.assert_array_equal(v, before[k])
    for bad in (b"not a zip file", b""):
        (tmp_path / "bad.npz").write_bytes(bad)
        with pytest.raises(StateError):
            b.resume(tmp_path / "bad.npz")
    with pytest.raises(StateError):
        b.resume(tmp_path / "missing.npz")
    arrays_other = dict(arrays, bundle=np.asarray("0123456789abcdef"))
    arrays_other[name] = np.zeros_like(arrays[name])
    np.savez(tmp_path / "other.npz", **arrays_other)
    with pytest.raises(StateError, match="another bundle"):
        b.resume(tmp_path / "other.npz")
    # an adapter whose state went non-finite refuses to save it, and the old file stays
    b.resume(good)
    b._stats[next(iter(b._stats))][...] = np.inf  # as an overflowing update would leave it
    with pytest.raises(StateError, match="non-finite"):
        b.save(good)
    c = Adapter.load(tiny_bundle)
    c.resume(good)
    assert c.steps == 1


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed here")
def test_torch_installed_beside_is_never_imported(tiny_bundle):
    """With torch installed (the host install), importing onnxruntime-training would import
    torch (its build check and onnxruntime.training's __init__): about twice the peak RSS.
    The device side loads and adapts without it."""
    code = f"""
import json, sys
import numpy as np
from edgetta import Adapter
a = Adapter.load({str(tiny_bundle)!r})
a.step(np.zeros((8, 32, 32, 3), np.uint8))
print(json.dumps(dict(engine=a.engine, torch='torch' in sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"engine": "ort-training", "torch": False}


def test_anchor_pulls_the_meta_parameters_back_toward_the_warmed_up_state(tiny_bundle, corrupted_frames):
    images, _ = corrupted_frames
    free, anchored = Adapter.load(tiny_bundle), Adapter.load(tiny_bundle, anchor=0.25)
    start = free.meta_state()
    names = list(free.runner.params())
    np.testing.assert_array_equal(free.step(images[:16]), anchored.step(images[:16]))
    # first step from the start: anchored = start + 0.75 (free - start), for every parameter
    for n in names:
        moved = free.meta_state()[n] - start[n]
        np.testing.assert_allclose(anchored.meta_state()[n] - start[n], 0.75 * moved, rtol=1e-5, atol=1e-7)
    assert any(np.abs(free.meta_state()[n] - start[n]).max() > 0 for n in names)
    with pytest.raises(ValueError, match="anchor"):
        Adapter.load(tiny_bundle, anchor=1.0)


def test_the_inference_graph_loads_on_the_first_prediction_only(tiny_bundle, corrupted_frames, tmp_path):
    """An adapter that only adapts never loads the inference graph (a second copy of the
    frozen weights on x86-64); the first prediction loads it once, from any thread."""
    from concurrent.futures import ThreadPoolExecutor
    images, _ = corrupted_frames
    a = Adapter.load(tiny_bundle, engine="onnx", threads=1)
    a.step(images[:16])
    assert not a.predictor_open
    x = a.preprocess(images[16:20])
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: a.predict_tensor(x), range(8)))
    assert a.predictor_open
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])
    assert a.open_predictor() is a and a.predictor_open
    # a graph onnxruntime cannot read is a BundleError when it is opened
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "inference.onnx").write_bytes(b"not a graph")
    b = Adapter(Bundle.open(copy, verify=False), engine="onnx", threads=1)
    with pytest.raises(BundleError, match="inference graph"):
        b.open_predictor()
    assert not b.predictor_open
