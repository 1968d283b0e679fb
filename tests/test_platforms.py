"""edgetta installs where edge devices are: the built wheel, installed with plain ``pip install``
(pip resolves onnxruntime from the registry), into a Python 3.13 venv and into an emulated
aarch64 Python 3.11; then ``edgetta adapt`` and ``edgetta profile`` run there.

The install tests are slow (they build a wheel and reach the package registry; the aarch64 one
runs pip and the adaptation under qemu-user): ``pytest -m slow tests/test_platforms.py``
(.ci/run runs them after the default suite). The marker test is fast and always runs.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARM = Path(os.environ.get("EDGETTA_ARM64_ROOT", "/opt/edgetta-arm64"))
QEMU = shutil.which("qemu-aarch64-static")


def _python313() -> str | None:
    """A working Python 3.13 (a pyenv shim exists even where that version is not selected)."""
    candidates = [*map(str, sorted(Path("~/.pyenv/versions").expanduser().glob("3.13*/bin/python3.13"))),
                  shutil.which("python3.13")]
    for p in filter(None, candidates):
        r = subprocess.run([p, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 13))"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == "True":
            return p
    return None


PY313 = _python313()

# (sys_platform, platform_machine, python) of the machines edgetta is meant for
PLATFORMS = [("linux", "x86_64", (3, 11)), ("linux", "x86_64", (3, 12)), ("linux", "x86_64", (3, 13)),
             ("linux", "aarch64", (3, 10)), ("linux", "aarch64", (3, 11)), ("linux", "aarch64", (3, 13)),
             ("linux", "armv7l", (3, 11)), ("darwin", "arm64", (3, 12)), ("darwin", "x86_64", (3, 13)),
             ("win32", "AMD64", (3, 12)), ("win32", "ARM64", (3, 12))]


def _requirements():
    import tomllib
    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project, [Requirement(r) for r in project["dependencies"]]


@pytest.mark.parametrize("system,machine,python", PLATFORMS)
def test_markers_install_exactly_one_onnxruntime(system, machine, python):
    """Both builds ship the module ``onnxruntime``: every platform gets exactly one, the training
    build exactly where its wheel exists (the rule the engine's error messages use too)."""
    from edgetta.engines import training_wheel_exists
    project, reqs = _requirements()
    env = {"sys_platform": system, "platform_machine": machine, "python_version": "%d.%d" % python,
           "python_full_version": "%d.%d.0" % python, "platform_system": "", "extra": ""}
    chosen = {r.name for r in reqs if r.marker is None or r.marker.evaluate(env)}
    runtimes = chosen & {"onnxruntime", "onnxruntime-training-cpu"}
    expected = "onnxruntime-training-cpu" if training_wheel_exists(system, machine, python) else "onnxruntime"
    assert runtimes == {expected}
    assert "<" not in project["requires-python"]   # no cap on new Pythons


def _build_wheel(out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(ROOT), "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(out.glob("edgetta-*.whl"))


def _figures(stdout: str) -> tuple[float, float]:
    before = re.search(r"accuracy without adaptation: ([\d.]+)%", stdout)
    after = re.search(r"accuracy with EcoTTA adaptation .*: ([\d.]+)%", stdout)
    assert before and after, stdout
    return float(before.group(1)), float(after.group(1))


def _run(cmd: list, timeout: int, cwd: Path) -> subprocess.CompletedProcess:
    # the child must find the installed edgetta, not this checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.skipif(PY313 is None, reason="no Python 3.13 here (pyenv install 3.13)")
def test_wheel_installs_and_runs_on_python_313(default_bundle, tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv313"
    subprocess.run([PY313, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = _run([py, "-m", "pip", "install", "-q", wheel], 900, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([py, "-c", "import importlib.metadata as m, onnxruntime, sys; print(sys.version_info[:2], "
              "[d.metadata['Name'] for d in m.distributions() if 'onnxruntime' in d.metadata['Name']])"],
             300, tmp_path)
    assert "(3, 13)" in r.stdout and "['onnxruntime']" in r.stdout, r.stdout + r.stderr
    for host_only in ("torch", "onnx"):
        assert _run([py, "-c", f"import {host_only}"], 60, tmp_path).returncode != 0
    r = _run([venv / "bin" / "edgetta", "adapt", default_bundle, "--limit", 256, "--quiet"], 900, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "engine onnx, provider cpu" in r.stdout
    before, after = _figures(r.stdout)
    print(f"python 3.13: {before}% -> {after}%")
    r = _run([venv / "bin" / "edgetta", "profile", default_bundle, "--target", "rpi4-1gb"], 900, tmp_path)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert "measured on this machine (x86_64, Python 3.13" in r.stdout and "engine onnx" in r.stdout
    print(r.stdout.splitlines()[-1])
    r = _run([venv / "bin" / "edgetta", "--version"], 60, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("edgetta ")


ARM_PYTHON = ARM / "sysroot/usr/bin/python3.11"
PIP_WHEEL = next(iter(sorted((ARM / "pip").glob("pip-*.whl"))), None) if (ARM / "pip").exists() else None


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or not ARM_PYTHON.exists() or PIP_WHEEL is None,
                    reason="no arm64 emulation here: run scripts/arm64_emulation.sh (root)")
def test_wheel_installs_and_runs_on_emulated_aarch64(tiny_bundle, tmp_path):
    """pip itself runs on the emulated aarch64 Python and resolves the aarch64 onnxruntime wheel.
    One constraint: onnxruntime 1.19.2, because 1.3x aarch64 wheels crash on import under
    qemu-user (an emulation limit; plain 'pip install edgetta' on a board takes the newest).
    The small test bundle keeps the emulated run to minutes (docs/devices.md has the default
    bundle's figures, from the same commands)."""
    qemu = [QEMU, "-L", ARM / "sysroot"]
    wheel = _build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv-arm64"
    r = _run([*qemu, ARM_PYTHON, "-m", "venv", "--without-pip", venv], 300, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    py = venv / "bin" / "python"
    (tmp_path / "constraints.txt").write_text("onnxruntime==1.19.2\n")
    r = _run([*qemu, py, f"{PIP_WHEEL}/pip", "install", "-q", "-c", tmp_path / "constraints.txt", wheel],
             1800, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([*qemu, py, "-c", "import importlib.metadata as m, platform; print(platform.machine(), "
              "sorted(d.metadata['Name'] for d in m.distributions() if 'onnxruntime' in d.metadata['Name']))"],
             300, tmp_path)
    assert r.stdout.split() == ["aarch64", "['onnxruntime']"], r.stdout + r.stderr
    r = _run([*qemu, py, "-m", "edgetta", "adapt", tiny_bundle, "--limit", 256, "--quiet"], 3600, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "engine onnx, provider cpu" in r.stdout and "aarch64" in r.stdout
    before, after = _figures(r.stdout)
    print(f"aarch64 (emulated): {before}% -> {after}%")
    # qemu-user cannot start a child process of another architecture (no binfmt_misc here), and
    # RSS under emulation holds the emulator's own memory: the static verdict only
    r = _run([*qemu, py, "-m", "edgetta", "profile", tiny_bundle, "--target", "rpi4-1gb", "--no-measure"],
             900, tmp_path)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert "not measured on aarch64" in r.stdout
    print(r.stdout.splitlines()[-1])
    r = _run([*qemu, py, "-m", "edgetta", "profile", tiny_bundle, "--target", "rpi4-1gb"], 900, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
