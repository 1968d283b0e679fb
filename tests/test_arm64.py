"""The portable adaptation step on 64-bit ARM: plain onnxruntime's aarch64 wheel, in an arm64
Python run under qemu-user emulation (set up by scripts/arm64_emulation.sh). Slow."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgetta import Adapter

ROOT = Path(__file__).resolve().parents[1]
ARM = Path(os.environ.get("EDGETTA_ARM64_ROOT", "/opt/edgetta-arm64"))
QEMU = shutil.which("qemu-aarch64-static")

ARM_SCRIPT = """
import json, platform, sys
import numpy as np, onnxruntime
from edgetta import Adapter
a = Adapter.load(sys.argv[1])  # auto: no onnxruntime-training on aarch64, the portable step
frames = np.load(sys.argv[2])
logits = [a.step(frames[i * 8:(i + 1) * 8]).tolist() for i in range(2)]
state = {k: v.tolist() for k, v in a.meta_state().items()}
print(json.dumps(dict(machine=platform.machine(), ort=onnxruntime.__version__, engine=a.engine,
                      loss=a.last_loss, logits=logits, state=state)))
"""


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or not (ARM / "sysroot/usr/bin/python3.11").exists(),
                    reason="no arm64 emulation here: run scripts/arm64_emulation.sh (root)")
def test_portable_step_runs_on_aarch64_like_on_x86(tiny_bundle, corrupted_frames, tmp_path):
    frames = corrupted_frames[0][:16]
    np.save(tmp_path / "frames.npy", frames)
    env = dict(os.environ, PYTHONPATH=f"{ARM / 'site'}:{ROOT}")
    r = subprocess.run([QEMU, "-L", str(ARM / "sysroot"), str(ARM / "sysroot/usr/bin/python3.11"),
                        "-c", ARM_SCRIPT, str(tiny_bundle), str(tmp_path / "frames.npy")],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    arm = json.loads(r.stdout.strip().splitlines()[-1])
    assert arm["machine"] == "aarch64" and arm["engine"] == "onnx"
    x86 = Adapter.load(tiny_bundle, engine="ort-training")
    logits = [x86.step(frames[i * 8:(i + 1) * 8]) for i in range(2)]
    assert arm["loss"] == pytest.approx(x86.last_loss, rel=1e-4)
    for a, b in zip(arm["logits"], logits):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4)
    for name, value in x86.meta_state().items():
        np.testing.assert_allclose(np.asarray(arm["state"][name], dtype=np.float32), value,
                                   rtol=1e-3, atol=1e-5, err_msg=name)
