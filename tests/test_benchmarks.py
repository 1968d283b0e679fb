"""The comparison benchmark: the reference methods do what their papers say, and a tiny run of
``python -m benchmarks.compare`` writes every report with a number for every method."""
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import methods, source_models, tta

ROOT = Path(__file__).resolve().parents[1]


def _x(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 1.5 + 0.3  # shifted: not the source statistics


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_bn_adapt_uses_batch_statistics_and_trains_nothing(tiny_ckpt):
    source = methods.create("source", tiny_ckpt)
    bn = methods.create("bn_adapt", tiny_ckpt)
    state = copy.deepcopy(bn.model.state_dict())
    x = _x()
    out = bn.step(x)
    assert not torch.allclose(out, source.step(x), atol=1e-4)  # batch statistics, not the source's
    after = bn.model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.allclose(bn.step(x), out)  # nothing was learnt


def test_tent_updates_only_batchnorm_affine(tiny_ckpt):
    tent = methods.create("tent", tiny_ckpt)
    before = _params(tent.model)
    for seed in range(2):
        tent.step(_x(seed))
    changed = _changed(before, tent.model)
    bn_affine = {f"{m}.{p}" for m, mod in tent.model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
                 for p in ("weight", "bias")}
    assert changed and changed <= bn_affine
    assert len(changed) > 0.9 * len(bn_affine)
    assert isinstance(tent.optimizer, torch.optim.Adam) and tent.optimizer.defaults["lr"] == 1e-3


def test_cotta_teacher_is_an_ema_of_the_student(tiny_ckpt):
    cotta = methods.create("cotta", tiny_ckpt, augmentations=2, restore=0.0, gate=1.01)
    teacher_before = _params(cotta.teacher)
    cotta.step(_x())
    assert cotta.augmented_steps == 1  # gate above any confidence: the augmented pseudo-label ran
    for (n, t), s in zip(cotta.teacher.named_parameters(), cotta.student.parameters()):
        expected = 0.999 * teacher_before[n] + 0.001 * s.detach()
        assert torch.allclose(t, expected, atol=1e-6), n
    assert _changed(teacher_before, cotta.teacher)
    # all weights train, the anchor does not
    assert all(p.requires_grad for p in cotta.student.parameters())
    anchor = dict(cotta.anchor.named_parameters())
    assert all(torch.equal(anchor[n], teacher_before[n]) for n in anchor)


def test_cotta_stochastic_restore(tiny_ckpt):
    full = methods.create("cotta", tiny_ckpt, augmentations=1, restore=1.0)
    full.step(_x())
    assert all(torch.equal(p, s) for p, s in zip(full.student.parameters(), full.source))
    partial = methods.create("cotta", tiny_ckpt, augmentations=1, restore=0.01)
    partial.step(_x())
    w = max(zip(partial.student.parameters(), partial.source), key=lambda ps: ps[0].numel())
    restored = (w[0] == w[1]).float().mean().item()
    assert 0.002 < restored < 0.05  # about 1% of the elements are back at their source value


def test_cotta_augmentation_keeps_pixels_in_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    a, b = tta.cotta_augment(x, g), tta.cotta_augment(x, g)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)  # a fresh draw each call


def test_ecotta_torch_updates_only_meta_parameters(tiny_ckpt):
    eco = methods.create("ecotta_torch", tiny_ckpt)
    backbone = copy.deepcopy(eco.model.backbone.state_dict())
    before = _params(eco.model)
    for seed in range(3):
        eco.step(_x(seed))
    changed = _changed(before, eco.model)
    meta = {n for n, _ in eco.model.named_parameters() if n.startswith("metas.")}
    assert changed and changed <= meta
    after = eco.model.backbone.state_dict()
    # the batch-statistics backbone keeps running statistics for single frames, as the device does;
    # its weights and affines stay as trained
    running = {k for k in backbone if k.endswith(("running_mean", "running_var"))}
    assert running and all(not torch.equal(backbone[k], after[k]) for k in running)
    assert all(torch.equal(backbone[k], after[k]) for k in set(backbone) - running)
    assert isinstance(eco.optimizer, torch.optim.SGD) and eco.optimizer.defaults["momentum"] == 0.9


def test_compare_smoke(tmp_path):
    """The one command, tiny: every method has numbers, every file is written, edgetta ran
    without torch."""
    out = tmp_path / "results"
    env = dict(os.environ, EDGETTA_BENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--smoke", "--quiet",
                        "--suites", "main", "small_batch", "memory", "--methods", "tent", "cotta", "edgetta",
                        "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "compare.json").read_text())
    sections = [data["main"]["results"], data["small_batch"]["results"]["4"],
                data["memory"]["results"]["default"]["pinned"]]
    for res in sections:
        assert {"tent", "cotta", "edgetta"} <= set(res) <= {"tent", "cotta", "edgetta", "cotta_aug2",
                                                            "edgetta_generated", "edgetta_arena"}
        for m, row in res.items():
            assert "failed" not in row, (m, row)
            assert row["peak_rss_mib"] > row["rss_loaded_mib"] > 0
            assert row["ms_per_batch"] > 0
    for m, row in data["main"]["results"].items():
        assert 0.0 <= row["error"] <= 1.0 and len(row["error_per_domain"]) == 15
    assert data["main"]["results"]["edgetta"]["torch_loaded"] is False
    assert data["main"]["results"]["tent"]["saved_for_backward_mib"] > 0
    # the memory suite measures the lean graph beside the generated one, each with its own estimate
    mem = data["memory"]["results"]["default"]["pinned"]
    assert mem["edgetta_generated"]["static_step_mib"] > mem["edgetta"]["static_step_mib"] > 0
    # and the same bundle with the arena, which the run records
    assert mem["edgetta_arena"]["memory_arena"] is True and mem["edgetta"]["memory_arena"] is False
    for name in ("benchmarks.md", "memory_bars.png", "error_per_corruption.png", "memory_vs_batch.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "benchmarks.md").read_text()
    assert "CoTTA" in md and "edgetta" in md
    assert "](error_per_corruption.png)" in md  # image links relative to the document


def test_load_memory_measures_every_session(tmp_path):
    """A tiny run of ``python -m benchmarks.load_memory``: one row per session, folding and
    pre-packing setting, each session loaded in a fresh process."""
    env = dict(os.environ, EDGETTA_BENCH_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "load_memory.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", "--models", "wrn16_1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(x["session"], x["batchnorms_folded"], x["prepacking"]) for x in rows} == {
        (s, f, p) for s in ("inference", "training module", "portable step") for f in (False, True) for p in (False, True)}
    assert all(x["machine"] == platform.machine() and x["loaded_mib"] > 0 and x["weights_mib"] > 0 for x in rows)


def test_benchmark_document_is_generated_whole_from_the_json():
    """docs/benchmarks.md is exactly what ``python -m benchmarks.report`` makes of the committed
    compare.json: nothing hand-written in it, nothing stale."""
    from benchmarks import report
    data = json.loads((ROOT / "benchmarks" / "results" / "compare.json").read_text())
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert report.document(data) == committed, "run: python -m benchmarks.report"
    assert "](../benchmarks/results/memory_bars.png)" in committed


def test_readme_results_table_is_the_generated_one():
    from benchmarks import report
    data = json.loads((ROOT / "benchmarks" / "results" / "compare.json").read_text())
    table = report.readme_table(data)
    assert table in (ROOT / "README.md").read_text(), "paste: python -m benchmarks.report --readme-table"
    assert table.count("\n") == 2 + len(report.README_METHODS)


def test_source_models_report_gathers_training_checkpoints(tmp_path, tiny_ckpt):
    """benchmarks/results/source_models.json is written by ``python -m benchmarks.source_models``
    from training checkpoints: their measured facts, no weights."""
    from edgetta_export import checkpoint
    ckpt = {**tiny_ckpt, "test_accuracy": 0.5, "train_time_s": 1.0, "history": [{"epoch": 1}],
            "dataset": "fashion-mnist", "command": "python -m edgetta_export.train ..."}
    checkpoint.save(tmp_path / "tiny_erk80.pt", ckpt)
    out = tmp_path / "source_models.json"
    out.write_text(json.dumps({"older": {"test_accuracy": 0.9}}))
    r = subprocess.run([sys.executable, "-m", "benchmarks.source_models", str(tmp_path / "tiny_erk80.pt"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data) == {"older", "tiny_erk80"}
    assert data["tiny_erk80"]["test_accuracy"] == 0.5 and data["tiny_erk80"]["pruning"]["sparsity"] == 0.8
    assert "state_dict" not in data["tiny_erk80"] and "masks" not in data["tiny_erk80"]
    committed = json.loads((ROOT / "benchmarks" / "results" / "source_models.json").read_text())
    assert set(committed["wrn16_2_erk80"]) <= set(source_models.FIELDS)  # the committed report has this form


@pytest.mark.parametrize("args", [
    ["benchmarks.run_method", "--method", "tent", "--stream", "missing.npz"],
    ["benchmarks.run_method", "--method", "edgetta", "--bundle", "missing-bundle", "--random-steps", "1"],
    ["benchmarks.run_method", "--method", "tent", "--random-steps", "1", "--batch", "0"],
    ["benchmarks.report", "--results", "missing-folder"],
    ["benchmarks.compare", "--batch", "0"],
])
def test_benchmark_cli_errors_are_one_line(args):
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "error: " in r.stderr.strip().splitlines()[-1]


def test_benchmark_output_into_a_closed_pipe_is_quiet():
    """A benchmark CLI piped into ``head`` ends without a BrokenPipeError traceback (the output
    is larger than the pipe's buffer, so the write really fails)."""
    main = ("from benchmarks.common import run_cli\n"
            "def main():\n    for _ in range(200000):\n        print('row')\n    return 0\n"
            "run_cli(main)")  # without run_cli: 'BrokenPipeError: [Errno 32] Broken pipe' and a traceback
    r = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(main)} | head -c 8",
                       shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout == "row\nrow\n"
    assert r.stderr == ""


def test_benchmark_help_shows_every_default():
    r = subprocess.run([sys.executable, "-m", "benchmarks.sparsity", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "--batch BATCH (default: 64)" in text and "--seed SEED (default: 0)" in text
    assert "'uniform 50%'" in text  # a literal % in a help text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_ecotta_paper_runs_on_source_statistics_and_needs_the_paper_variant(tiny_ckpt):
    eco = methods.create("ecotta_paper", tiny_ckpt)  # untrained: the same model on source statistics
    assert eco.model.backbone_norm == "source" and not eco.model.batch_stat_norms()
    assert eco.step(_x(0)).shape[0] == _x(0).shape[0]
    with pytest.raises(ValueError, match="paper-variant"):  # warmed up without it: no paper meta networks
        methods.create("ecotta_paper", {**tiny_ckpt, "warmup": {}})


def test_partial_compare_run_keeps_other_methods_and_meta_rows_only_from_the_same_warmup():
    """A run of some methods replaces those; the meta-network methods' rows of an earlier run stay
    only when the checkpoint (their warm-up) is byte for byte the same."""
    from benchmarks.compare import kept_results
    results = {"tent": {"error": 0.23}, "ecotta_torch": {"error": 0.19}, "edgetta": {"error": 0.2},
               "16": {"tent": {"error": 0.24}, "ecotta_paper": {"error": 0.21}, "edgetta": {"error": 0.22}}}
    same = kept_results(results, {"edgetta"}, same_warmup=True)
    assert same == {"tent": {"error": 0.23}, "ecotta_torch": {"error": 0.19},
                    "16": {"tent": {"error": 0.24}, "ecotta_paper": {"error": 0.21}}}
    other = kept_results(results, {"edgetta"}, same_warmup=False)
    assert other == {"tent": {"error": 0.23}, "16": {"tent": {"error": 0.24}}}


@pytest.mark.slow  # two bundle exports and two fresh processes: about a minute here
def test_shipped_step_times_runners_in_fresh_processes():
    from benchmarks.shipped_step import RUNNERS, measure
    runners = [r for r in RUNNERS if r.key in ("ecotta_torch", "edgetta_arena")]
    got = {m.runner: m for m in measure("wrn16_2", batch=8, steps=2, rounds=1, timeout=600, runners=runners)}
    assert set(got) == {"ecotta_torch", "edgetta_arena"}
    assert got["ecotta_torch"].ratio_to_torch == 1.0
    assert got["edgetta_arena"].ms_per_step > 0 and got["edgetta_arena"].peak_rss_mib > 50
    assert got["edgetta_arena"].ratio_to_torch == pytest.approx(
        got["edgetta_arena"].ms_per_step / got["ecotta_torch"].ms_per_step, rel=0.01)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="onnxruntime's NCHWc layout, and so its reorders, exists on x86-64 only")
def test_reorders_benchmark_times_the_layout_reorders():
    """benchmarks.reorders finds the reorders around a constant-weight Conv in onnxruntime's
    profile and times each op of the graph."""
    from benchmarks.reorders import kernel_ms
    ms = kernel_ms((2, 16, 8, 8), runs=2, warmup=1)
    assert {"Conv", "ReorderInput", "ReorderOutput", "ReduceMean"} <= set(ms)
    assert all(v > 0 for v in ms.values())


@pytest.mark.parametrize("engine", ["ort-training", "onnx"])
def test_rss_trace_finds_the_step_peak_and_its_node(tiny_bundle, tmp_path, engine):
    """One real step traced: RSS samples inside it, a peak at or above where it started, the
    node running then among the step's profiled nodes, and the JSON written."""
    from benchmarks import rss_trace
    out = tmp_path / "trace.json"
    assert rss_trace.main(["--bundle", str(tiny_bundle), "--engine", engine, "--batch", "32",
                           "--threshold", "0.5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    s = data["summary"]
    assert data["step_ms"] > 0 and data["node_count"] > 50
    assert s["peak_mib"] >= s["start_mib"] > 0 and 0 <= s["peak_ms"] <= data["step_ms"]
    node = s["peak_node"]
    assert node["name"] and node["start_ms"] <= s["peak_ms"] + 1 and node["start_ms"] + node["ms"] >= s["peak_ms"] - 50
    # the listed moves, in time order, each more than the threshold from the one before (a
    # step of the tiny model moves RSS by about 2 MiB, so how many there are is not asserted)
    # (by start: a Loop's body nodes end before the Loop node does)
    level, start = s["start_mib"], -1.0
    for m in s["moves"]:
        assert abs(m["change_mib"]) > 0.5 and m["rss_mib"] - level == pytest.approx(m["change_mib"])
        assert m["start_ms"] >= start
        level, start = m["rss_mib"], m["start_ms"]
    assert max(data["rss_mib"]) == pytest.approx(s["peak_mib"], abs=0.2)
