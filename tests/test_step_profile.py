"""benchmarks.step_profile on the tests' tiny bundles (before and after the speed rewrites):
onnxruntime's profiler on both engines, torch.profiler on EcoTTA in PyTorch, the micro-benchmarks,
the fresh-process memory, the report."""
import json

import pytest

from benchmarks import step_profile
from edgetta_export.bundle import export_bundle


@pytest.fixture(scope="module")
def report(tiny_ckpt, tiny_bundle, tmp_path_factory):
    before = tmp_path_factory.mktemp("step_profile") / "before"
    export_bundle(tiny_ckpt, before, profile=False, lean_options=step_profile.BEFORE)
    reports = step_profile.run(["wrn16_1"], batch=8, warmup=1, steps=2, threads=1, settings_on=False,
                               micro_repeats=1, bundles={"wrn16_1": (tiny_ckpt, {"before": before, "after": tiny_bundle})})
    assert len(reports) == 1
    return reports[0]


@pytest.mark.parametrize("variant", step_profile.VARIANTS)
def test_engine_profiles_account_for_the_step(report, variant):
    profiles = report.profiles if variant == "after" else report.profiles_before
    for engine in step_profile.ENGINES:
        p = profiles[engine]
        assert p.steps == 2
        assert p.kernel_ms_per_step > 0
        # node kernels of a step run inside that step's model_run
        assert p.kernel_ms_per_step <= p.run_ms * 1.05
        assert sum(s.share for s in p.ops) == pytest.approx(1.0, abs=0.01)
        assert not {s.name for s in p.ops} & set(step_profile.SUBGRAPH_OPS)  # counted by their bodies' nodes
        assert sum(s.ms_per_step for s in p.groups) == pytest.approx(p.kernel_ms_per_step, rel=0.01)
        assert sum(s.nodes for s in p.ops) == sum(s.nodes for s in p.groups)
        assert [n.ms_per_step for n in p.top_nodes] == sorted((n.ms_per_step for n in p.top_nodes), reverse=True)
        assert 0 < len(p.top_nodes) <= step_profile.TOP_NODES
        groups = {g.name: g for g in p.groups}
        frozen = next(g for name, g in groups.items() if name.startswith("frozen conv input gradient"))
        assert frozen.nodes == len(p.frozen_input_gradients) > 0
        assert {n.op for n in p.frozen_input_gradients} <= {"ConvTranspose", "Conv"}
        assert any(name.startswith("ReLU mask unpacking") for name in groups)
        # one unpacking head per packed mask: BitShift before, Gather after
        assert p.unpack_heads and {n.op for n in p.unpack_heads} == {"BitShift" if variant == "before" else "Gather"}
        # before: every frozen input gradient but depthwise ones is a ConvTranspose; after: stride-1 ones are Convs
        ops = {n.op for n in p.frozen_input_gradients}
        assert ops == ({"ConvTranspose"} if variant == "before" else {"Conv", "ConvTranspose"})
    training, portable = profiles["ort-training"], profiles["onnx"]
    assert "ConvGrad" in {s.name for s in training.ops}  # the meta convs' fused gradient kernel
    assert not training.portable_replacements
    assert "ConvGrad" not in {s.name for s in portable.ops}  # standard ops only
    assert portable.portable_replacements


def test_torch_profile_and_step_times(report):
    assert report.torch is not None and report.torch.steps == 2
    assert "aten::convolution_backward" in {s.name for s in report.torch.ops}
    runners = ("ort-training", "onnx", step_profile.UNPINNED)
    assert set(report.step_ms) == {"ecotta_torch"} | {step_profile.key(r, v) for r in runners
                                                      for v in step_profile.VARIANTS}
    assert all(len(v) == 2 and min(v) > 0 for v in report.step_ms_all.values())


def test_micro_benchmark_computes_the_same_gradient(report):
    assert report.micro, "the tiny model has stride-1 3x3 frozen convs"
    assert {r.prepacking for r in report.micro} == {False, True}
    for r in report.micro:
        assert r.nodes_in_graph >= 1 and r.step_ms > 0
        assert r.conv_ms > 0 and r.conv_transpose_ms > 0
        assert r.max_abs_diff < 1e-3  # Conv with flipped, channel-swapped weights == ConvTranspose


def test_report_and_document(report):
    data = json.loads(json.dumps(step_profile.to_json([report], "python -m benchmarks.step_profile --test")))
    text = step_profile.render(data)
    assert "## wrn16_1, batch 8" in text
    assert "training engine: groups" in text and "EcoTTA in PyTorch: ops by self CPU time" in text
    assert "Micro-benchmark" in text and "BitShift chain vs Gather" in text
    assert "groups before and after" in text and "## Summary" in text and "Memory, fresh process" in text
    assert f"| wrn16_1 | {report.backbone_norm} | 8 |" in text and report.backbone_norm in ("source", "batch")


def test_memory_of_both_variants_and_engines(report):
    assert {(r.variant, r.engine) for r in report.memory} == {(v, e) for v in step_profile.VARIANTS
                                                              for e in step_profile.ENGINES}
    for r in report.memory:
        assert r.rss_loaded_mib > 50 and r.peak_after_step_mib >= r.rss_loaded_mib
        assert (r.flipped_weight_mib > 0) == (r.variant == "after")


def test_summarize_refuses_a_profile_with_other_runs():
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 10}]
    with pytest.raises(RuntimeError, match="1 runs, expected 3"):
        step_profile.summarize("onnx", events, warmup=1, steps=2, step_ms=[1.0, 1.0])


def test_unpack_micro_benchmark_gives_the_same_mask(report):
    assert report.unpack, "the tiny model's lean graph unpacks bit-packed masks"
    assert sum(r.masks_in_graph for r in report.unpack) == len(report.profiles_before["ort-training"].unpack_heads)
    for r in report.unpack:
        assert r.bitshift_ms > 0 and r.gather_ms > 0
        assert r.max_abs_diff == 0.0  # both give exactly 0.0 / 1.0
