"""The memory profiler: static liveness analysis against measured peak RSS, and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from edgetta.bundle import Bundle
from edgetta.profile import MIB, analyse, execution_order, inference_facts, measure_step, training_facts
from edgetta.targets import TARGETS, get_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facts(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    return b, training_facts(b), inference_facts(b)


@pytest.mark.parametrize("batch", [16, 64])
def test_static_estimate_agrees_with_measured_peak(facts, batch):
    """Activations + workspace from the graph's liveness vs the growth of the peak RSS of a real
    adaptation step in a fresh process (allocator arena off, so RSS follows allocations)."""
    bundle, train, infer = facts
    report = analyse(bundle, get_target("x86-64"), batch, train=train, infer=infer)
    static = report["adaptation"]["activations_kept"] + report["adaptation"]["workspace"]
    measured = measure_step(bundle.path, batch)["step_peak"]
    # the estimate hands buffers on as onnxruntime's planner does; what is left is kernel scratch
    # (a few MiB whatever the batch, and varying between processes: it matters at batch 16 here)
    assert 0.85 * static < measured < 1.15 * static + 4 * MIB, (static / MIB, measured / MIB)


def test_x86_counts_the_weights_backward_convs_read_twice(facts):
    """On x86-64 the forward convs run on NCHWc-reordered weights and the backward ConvTranspose
    reads the original layout: the frozen weights it reads are counted a second time there, and
    nowhere else (with pre-packing off, ARM holds one copy)."""
    bundle, train, infer = facts
    x86 = analyse(bundle, get_target("x86-64"), 16, train=train, infer=infer)["adaptation"]
    arm = analyse(bundle, get_target("rpi4-4gb"), 16, train=train, infer=infer)["adaptation"]
    backward = {n.input[1] for n in train.nodes if n.op_type == "ConvTranspose"}
    meta = set(bundle.manifest.trainable)
    expected = 4 * sum(v for k, v in train.params.items() if k in backward and k not in meta)
    assert 0 < x86["parameters_frozen_second_layout"] == expected < x86["parameters_frozen"]
    assert arm["parameters_frozen_second_layout"] == 0
    assert x86["total"] - arm["total"] == expected


def test_generated_graph_estimate_is_an_upper_bound(generated_bundle):
    """For onnxruntime-training's own graph the static figure is conservative: its priority-based
    execution order runs each regularizer term's gradient before the forward pass ends (the loss
    gradient is the constant 1), freeing tensors that graph-order liveness still counts."""
    bundle = Bundle.open(generated_bundle)
    report = analyse(bundle, get_target("x86-64"), 32)
    static = report["adaptation"]["activations_kept"] + report["adaptation"]["workspace"]
    measured = measure_step(bundle.path, 32)["step_peak"]
    assert 0.65 * static < measured < 1.15 * static, (static / MIB, measured / MIB)


def test_default_bundle_estimate_agrees_with_measured_peak(default_bundle):
    bundle = Bundle.open(default_bundle)
    report = analyse(bundle, get_target("x86-64"), 32)
    static = report["adaptation"]["activations_kept"] + report["adaptation"]["workspace"]
    measured = measure_step(bundle.path, 32)["step_peak"]
    assert 0.85 * static < measured < 1.15 * static, (static / MIB, measured / MIB)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wrn40_2", "wrn28_10", "resnet50"])
def test_zoo_estimate_agrees_with_measured_peak(name, tmp_path):
    """The issue's models at batch 64 (ResNet-50 at 224x224): the lean graph's measured step
    stays within 15% of the static estimate. (ResNet-50 measured 13-20% above it before the
    masks of frozen convs were taken in NHWC order: onnxruntime's x86 NCHWc layout then held
    each blocked conv output until a late reorder ran.) The paper's variant: with the backbone
    on batch statistics a per-channel normalization stands between each frozen conv and its
    ReLU, the NHWC masks do not apply, and ResNet-50 measured 21% above the estimate (2,948 vs
    2,426 MiB, issue 16)."""
    from edgetta_export.bundle import export_bundle
    from tests.conftest import make_checkpoint
    from edgetta_export.models import CONFIGS
    ckpt = make_checkpoint(name, backbone_norm="source")
    ckpt["input_size"] = CONFIGS[name].input_size
    export_bundle(ckpt, tmp_path / name, profile=False, portable=False)
    bundle = Bundle.open(tmp_path / name)
    report = analyse(bundle, get_target("x86-64"), 64)
    static = report["adaptation"]["activations_kept"] + report["adaptation"]["workspace"]
    measured = measure_step(bundle.path, 64)["step_peak"]
    print(name, f"static {static / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB")
    assert 0.85 * static < measured < 1.15 * static, (static / MIB, measured / MIB)


@pytest.fixture(scope="module")
def generated_bundle(tiny_ckpt, tmp_path_factory):
    """The same model with onnxruntime-training's graph as generated (no lean rewrite)."""
    from edgetta_export.bundle import export_bundle
    out = tmp_path_factory.mktemp("gen") / "generated"
    export_bundle(tiny_ckpt, out, lean=False, profile=False)
    return out


def test_kept_tensors_are_judged_by_their_gradient_nodes(facts, generated_bundle):
    gen = analyse(Bundle.open(generated_bundle), get_target("x86-64"), 8)
    assert sum(gen["activations_by_need"].values()) == gen["adaptation"]["activations_kept"]
    relu_only = [t for t in gen["kept_tensors"] if t["consumers"] == ["ReluGrad"]]
    assert relu_only and all(t["need"] == "sign mask" for t in relu_only)
    frozen_conv_inputs = [t for t in gen["kept_tensors"] if "ConvGrad" in t["consumers"] and t["need"] != "needed"]
    assert frozen_conv_inputs            # kept only because ConvGrad/ReluGrad read them
    bn = [t for t in gen["kept_tensors"] if "BatchNormalizationGrad" in t["consumers"]]
    assert bn and all(t["need"] == "needed" for t in bn)
    # the lean rewrite leaves only what trainable layers need, plus masks of 1 bit per sign
    bundle, train, infer = facts
    r = analyse(bundle, get_target("x86-64"), 8, train=train, infer=infer)
    assert {t["need"] for t in r["kept_tensors"]} == {"needed"}
    masks = [t for t in r["kept_tensors"] if t["name"].endswith(".mask_bits")]
    assert masks and not [t for t in r["kept_tensors"] if t["name"].endswith(".mask")]
    for t in masks:
        shape = train.tensors[t["name"][:-len(".mask_bits")]].shape1
        assert t["bytes"] == 8 * np.prod(shape[1:]) // 8  # batch 8, one byte per 8 signs
    assert r["adaptation"]["activations_kept"] < 0.6 * gen["adaptation"]["activations_kept"]
    # activations grow linearly with the batch; parameters do not
    r2 = analyse(bundle, get_target("x86-64"), 16, train=train, infer=infer)
    assert r2["adaptation"]["activations_kept"] == pytest.approx(2 * r["adaptation"]["activations_kept"], rel=0.02)
    assert r2["adaptation"]["parameters_trainable"] == r["adaptation"]["parameters_trainable"]


def test_targets_change_the_verdict_not_the_graph(facts):
    bundle, train, infer = facts
    reports = {n: analyse(bundle, t, 256, train=train, infer=infer) for n, t in TARGETS.items()}
    assert reports["x86-64"]["fits"] and not reports["arm-sbc-512mb"]["fits"]
    with pytest.raises(ValueError, match="unknown target"):
        get_target("pdp-11")


def test_export_writes_the_profile_into_the_manifest(tiny_bundle):
    p = json.loads((tiny_bundle / "manifest.json").read_text())["profile"]
    assert p["batch"] == 64 and p["adaptation_peak_mib"] > p["adaptation_step_growth_mib"] > 0
    assert set(p["fits"]) == set(TARGETS)


NO_HOST = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
           "from edgetta.cli import main; sys.exit(main(sys.argv[1:]))")


def _profile(*args):
    """``edgetta profile`` in a process where neither torch nor onnx can be imported, as on a
    device with only the base dependencies."""
    return subprocess.run([sys.executable, "-c", NO_HOST, "profile", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_bundle_carries_the_facts_the_host_probe_finds(facts):
    """The facts written at export give the device the very figures the onnx-based probe gives."""
    from edgetta.profile import bundle_facts, portable_facts
    bundle, train, infer = facts
    carried = bundle_facts(bundle)
    assert set(carried) == {"ort-training", "onnx", "inference"}
    for target in ("x86-64", "rpi4-1gb"):
        host = analyse(bundle, get_target(target), 32, train=train, infer=infer)
        device = analyse(bundle, get_target(target), 32)
        assert device == host
    portable = analyse(bundle, get_target("rpi4-1gb"), 32, engine="onnx")
    assert portable == analyse(bundle, get_target("rpi4-1gb"), 32, engine="onnx",
                               train=portable_facts(bundle), infer=infer)
    assert portable["adaptation"]["gradients"] == 0 and portable["engine"] == "onnx"


def test_cli_profile_exit_codes_json_and_plot(tiny_bundle, tmp_path):
    r = _profile(tiny_bundle, "--batch", "8", "--budget", "1", "--no-measure")
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout, r.stderr[-2000:]
    assert "estimated: static" in r.stdout and "the exporter's process held" in r.stdout
    assert "not measured on x86_64" in r.stdout
    png = tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "edgetta", "profile", str(tiny_bundle), "--batch", "8",
                        "--budget", "4096", "--json", "--plot", str(png)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["measured"]["peak_after_step"] > 0 and report["fits"]
    v = report["verdict"]
    assert v["measured"] and v["quantity"] == "peak RSS of the adapting process"
    assert v["peak_rss_mib"] == report["measured"]["peak_after_step"] / MIB
    assert png.stat().st_size > 5000
    r = _profile(tiny_bundle, "--target", "vax")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown target")
    r = _profile(tmp_path / "nowhere")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_cli_profile_auto_engine_is_the_targets(tiny_bundle):
    """ARM targets have no onnxruntime-training wheel: 'auto' profiles the portable step there,
    and on an x86-64 target the engine 'adapt' picks here."""
    from edgetta.bundle import Bundle
    from edgetta.engines import choose_engine
    here = choose_engine("auto", Bundle.open(tiny_bundle))
    for target, expected in (("rpi4-1gb", "onnx"), ("arm-sbc-512mb", "onnx"), ("x86-64", here)):
        r = _profile(tiny_bundle, "--target", target, "--no-measure", "--json")
        assert r.returncode in (0, 1), r.stderr[-2000:]
        assert json.loads(r.stdout)["engine"] == expected, target


@pytest.mark.parametrize("engine", ["onnx", "ort-training"])
def test_cli_profile_on_a_device_measures_the_engine_that_runs(tiny_bundle, engine):
    """Only base dependencies: the static figures come from the bundle, the measurement from a
    fresh process of the chosen engine; the verdict for an aarch64 target is not taken from this
    x86-64 measurement, and says so."""
    r = _profile(tiny_bundle, "--target", "rpi4-1gb", "--engine", engine, "--json")
    assert r.returncode in (0, 1), r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["engine"] == engine and report["measured"]["engine"] == engine
    assert report["measured"]["machine"] == "x86_64"
    v = report["verdict"]
    assert not v["measured"] and "not measured on aarch64" in v["how"]
    # the aarch64 figure: static for the target + what this process held beyond its own static
    static = report["adaptation"]["total"] / MIB
    here = analyse(Bundle.open(tiny_bundle), get_target("x86-64"), report["batch"], engine=engine)
    overhead = report["measured"]["peak_after_step"] / MIB - here["adaptation"]["total"] / MIB
    assert overhead > 0 and v["peak_rss_mib"] == pytest.approx(static + overhead)
    assert r.returncode == (0 if v["fits"] else 1)
    r = _profile(tiny_bundle, "--target", "x86-64", "--engine", engine, "--batch", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"engine {engine}" in r.stdout and "measured on this x86_64 machine" in r.stdout


def test_execution_order_follows_onnxruntime_priorities():
    """Kahn's sort: Shape/Size first, then the lowest index among the ready nodes."""
    n = lambda name, ins, outs, op="Relu": helper.make_node(op, ins, outs, name=name)
    nodes = [n("f1", ["x"], ["a"]), n("f2", ["a"], ["b"]), n("f3", ["b"], ["c"]),
             n("g_early", ["a"], ["ga"], "Neg"), n("g_late", ["c", "ga"], ["gc"], "Add"),
             n("shape", ["b"], ["sb"], "Shape")]
    order = [x.name for x in execution_order(nodes)]
    assert order == ["f1", "f2", "shape", "f3", "g_early", "g_late"]
    with pytest.raises(ValueError, match="cycle"):
        execution_order([n("p", ["q_out"], ["p_out"]), n("q", ["p_out"], ["q_out"])])
