"""Tables, plots and the README's results section, generated from ``compare.json`` only.

    python -m benchmarks.report [--results benchmarks/results]

Writes ``compare.md``, ``README_section.md``, ``memory_bars.png``, ``error_per_corruption.png``,
``memory_vs_batch.png`` and (with a sparsity section) ``sparsity.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS

LABELS = {"source": "source (no adaptation)", "source_meta": "source + warmed-up meta nets",
          "bn_adapt": "BN-adapt", "tent": "TENT", "cotta": "CoTTA", "ecotta_torch": "EcoTTA (PyTorch)",
          "edgetta": "edgetta (EcoTTA, onnxruntime-training)",
          "edgetta_generated": "edgetta, onnxruntime-training's graph as generated (no lean rewrite)"}
SHORT = {"source": "source", "source_meta": "source+meta", "bn_adapt": "BN-adapt", "tent": "TENT",
         "cotta": "CoTTA", "ecotta_torch": "EcoTTA-torch", "edgetta": "edgetta",
         "edgetta_generated": "edgetta (generated graph)"}
COLORS = {"source": "#7f7f7f", "source_meta": "#bcbd22", "bn_adapt": "#17becf", "tent": "#1f77b4",
          "cotta": "#d62728", "ecotta_torch": "#9467bd", "edgetta": "#2ca02c", "edgetta_generated": "#98df8a"}
MODEL_LABELS = {"default": "WRN-16-2 (trained, 80% ERK) 32x32", "wrn28_10": "WRN-28-10 32x32",
                "wrn40_2": "WRN-40-2 32x32", "resnet50": "ResNet-50 224x224"}
ABBREV = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
          "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
          "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
          "pixelate": "pixel", "jpeg_compression": "jpeg"}
PAPER = {"cotta": (0.80, 0.86), "tent": (0.58, 0.68)}


def ok(r: Any) -> bool:
    return isinstance(r, dict) and "failed" not in r


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def mib(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def analytic_mib(r: dict) -> float | None:
    """Memory as the EcoTTA paper counts it: weights held, gradients, optimizer state and the
    activations kept for backward (no runtime, no allocator, no workspace)."""
    if "analytic_mib" in r:
        return r["analytic_mib"]
    sb = r.get("state_bytes")
    if not sb or r.get("saved_for_backward_mib") is None:
        return None
    return (sb["weights"] + sb.get("gradients", 0) + sb["optimizer"]) / 2 ** 20 + r["saved_for_backward_mib"]


def activations_mib(r: dict) -> float | None:
    return r.get("activations_kept_mib", r.get("saved_for_backward_mib"))


def reduction(a: float | None, b: float | None) -> float | None:
    """How much less ``a`` is than ``b`` (0.8 = 80% less)."""
    if a is None or b is None or b <= 0:
        return None
    return 1.0 - a / b


def _methods(results: dict) -> list[str]:
    order = list(LABELS)
    return [m for m in order if m in results] + [m for m in results if m not in order]


# --------------------------------------------------------------------------------------------- tables

def main_tables(sec: dict) -> list[str]:
    res, cfg = sec["results"], sec["config"]
    lines = [f"Continual stream: Fashion-MNIST test, 15 corruption types at severity {cfg['severity']} in the "
             f"standard order, {cfg['frames_per_type']} images per type, no reset, batch {cfg['batch']}, "
             f"{cfg['threads']} thread(s) per method, each method in a fresh process.", "",
             "| method | mean error % | ms / batch | peak RSS MiB | RSS once loaded MiB | adaptation share MiB | kept for backward MiB |",
             "|---|---|---|---|---|---|---|"]
    for m in _methods(res):
        r = res[m]
        if not ok(r):
            lines.append(f"| {LABELS.get(m, m)} | failed: {r.get('failed', '?')[:80]} ||||||")
            continue
        lines.append(f"| {LABELS.get(m, m)} | {pct(r.get('error'))} | {r['ms_per_batch']:.0f} | {mib(r['peak_rss_mib'])} "
                     f"| {mib(r['rss_loaded_mib'])} | {mib(r['adaptation_share_mib'])} | {mib(activations_mib(r))} |")
    names = next((list(r["error_per_domain"]) for r in res.values() if ok(r) and "error_per_domain" in r), [])
    if names:
        lines += ["", "Error (%) per corruption type, in stream order:", "",
                  "| method | " + " | ".join(ABBREV.get(n, n) for n in names) + " | mean |",
                  "|---|" + "---|" * (len(names) + 1)]
        for m in _methods(res):
            r = res[m]
            if ok(r):
                lines.append(f"| {SHORT.get(m, m)} | " + " | ".join(pct(r['error_per_domain'][n], 1) for n in names)
                             + f" | **{pct(r['error'])}** |")
    return lines


def small_batch_table(sec: dict, main: dict | None) -> list[str]:
    res, cfg = sec["results"], sec["config"]
    batches = sorted(res, key=int, reverse=True)
    methods = _methods({m: 1 for b in batches for m in res[b]})
    lines = [f"Same protocol, {cfg['frames_per_type']} images per type ({15 * cfg['frames_per_type']} frames); "
             "error % / peak RSS MiB / ms per batch:", "",
             "| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for m in methods:
        cells = []
        for b in batches:
            r = res[b].get(m)
            cells.append(f"{pct(r.get('error'))} / {mib(r['peak_rss_mib'])} / {r['ms_per_batch']:.0f}"
                         if ok(r) else "failed")
        lines.append(f"| {SHORT.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def gradual_table(sec: dict) -> list[str]:
    res, cfg = sec["results"], sec["config"]
    sevs = next((sorted(r["error_per_severity"], key=int) for r in res.values() if ok(r) and "error_per_severity" in r), [])
    lines = [f"Gradual: within each type the severity goes {'-'.join(map(str, cfg['severities']))}, "
             f"{cfg['per_segment']} images per segment ({cfg['per_segment'] * 135} frames), batch {cfg['batch']}, "
             "continual over the 15 types.", "",
             "| method | mean error % | " + " | ".join(f"severity {s}" for s in sevs) + " |",
             "|---|---|" + "---|" * len(sevs)]
    for m in _methods(res):
        r = res[m]
        if ok(r):
            lines.append(f"| {SHORT.get(m, m)} | **{pct(r['error'])}** | "
                         + " | ".join(pct(r["error_per_severity"][s]) for s in sevs) + " |")
    return lines


def model_config(sec: dict, model: str) -> dict:
    """Batch, steps and CoTTA augmentations of one model's memory runs."""
    if model in sec.get("models", {}):
        return sec["models"][model]
    cfg = sec.get("config", {})
    return {"batch": cfg.get("batch"), "steps": cfg.get("steps"), "cotta_augmentations": 32}


def cotta_full_step_s(by_malloc: dict, ml: str, n_aug: int) -> float | None:
    """CoTTA's step time at 32 augmentations, estimated from a run with ``n_aug``: each missing
    augmentation costs one teacher forward pass, timed as BN-adapt's step (a forward pass with
    batch statistics) on the same model."""
    c, f = by_malloc[ml].get("cotta"), by_malloc[ml].get("bn_adapt")
    if not ok(c) or not ok(f):
        return None
    return (c["ms_per_batch"] + (32 - n_aug) * f["ms_per_batch"]) / 1e3


def memory_tables(sec: dict) -> list[str]:
    res = sec["results"]
    lines = []
    for model, by_malloc in res.items():
        mc = model_config(sec, model)
        mallocs = list(by_malloc)
        methods = _methods({m: 1 for ml in mallocs for m in by_malloc[ml]})
        lines += [f"**{MODEL_LABELS.get(model, model)}**, batch {mc['batch']}, {mc['steps']} adaptation step(s) on "
                  "random frames, a fresh process per method and allocator setting:", "",
                  "| method | " + " | ".join(f"peak RSS MiB ({ml} malloc) | adaptation share ({ml})" for ml in mallocs)
                  + " | kept for backward MiB | analytic MiB (paper's count) | s / step |",
                  "|---|" + "---|---|" * len(mallocs) + "---|---|---|"]
        for m in methods:
            cells, ref = [], None
            for ml in mallocs:
                r = by_malloc[ml].get(m)
                if ok(r):
                    ref = ref or r
                    cells += [mib(r["peak_rss_mib"]), mib(r["adaptation_share_mib"])]
                else:
                    cells += ["failed" if r else "", ""]
            if ref is None:
                lines.append(f"| {SHORT.get(m, m)} | " + " | ".join(cells) + " | | | |")
                continue
            ml_best = min((ml for ml in mallocs if ok(by_malloc[ml].get(m))),
                          key=lambda ml: by_malloc[ml][m]["ms_per_batch"])
            step = f"{by_malloc[ml_best][m]['ms_per_batch'] / 1e3:.2f}"
            if m == "cotta" and mc.get("cotta_augmentations", 32) != 32:
                est = cotta_full_step_s(by_malloc, ml_best, mc["cotta_augmentations"])
                step += f" with {mc['cotta_augmentations']} aug. (~{est:.0f} with 32, estimated)" if est else \
                    f" with {mc['cotta_augmentations']} aug."
            elif m.startswith("cotta_aug"):
                step += f" with {m[len('cotta_aug'):]} aug."
            fb = ref.get("fallback")
            if fb:
                step += " (contiguous input: with channels-last input PyTorch's backward segfaulted)"
            lines.append(f"| {SHORT.get(m, m)} | " + " | ".join(cells)
                         + f" | {mib(activations_mib(ref))} | {mib(analytic_mib(ref))} | {step} |")
        lines.append("")
    return lines


def lean_table(sec: dict, malloc: str = "pinned") -> list[str]:
    """The lean graph against the generated one, TENT and CoTTA: peak RSS of the whole process,
    the static estimate against the measured adaptation part, and step time."""
    lines = ["| model, batch | edgetta peak MiB | generated graph peak | TENT peak | CoTTA peak "
             "| edgetta / TENT (target <= 0.35) | edgetta / CoTTA (target <= 0.10) "
             "| adaptation MiB: static estimate / one step measured / whole run | step s: lean / generated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, by_malloc in sec["results"].items():
        res = by_malloc.get(malloc, {})
        e, g, t, c = (res.get(k) for k in ("edgetta", "edgetta_generated", "tent", "cotta"))
        if not ok(e):
            continue
        peak = lambda r: mib(r["peak_rss_mib"]) if ok(r) else "n/a"
        ratio = lambda r: f"{e['peak_rss_mib'] / r['peak_rss_mib']:.2f}" if ok(r) else "n/a"
        static = e.get("static_step_mib")
        one = e.get("measured_step_mib")
        est = " / ".join([f"{static:.0f}" if static else "n/a",
                          f"{one:.0f} ({100 * (one / static - 1):+.0f}%)" if static and one else "n/a",
                          f"{e['adaptation_share_mib']:.0f}"])
        step = f"{e['ms_per_batch'] / 1e3:.2f} / {g['ms_per_batch'] / 1e3:.2f} " \
               f"({100 * (e['ms_per_batch'] / g['ms_per_batch'] - 1):+.0f}%)" if ok(g) else f"{e['ms_per_batch'] / 1e3:.2f}"
        lines.append(f"| {MODEL_LABELS.get(model, model)}, {model_config(sec, model)['batch']} | {peak(e)} | {peak(g)} "
                     f"| {peak(t)} | {peak(c)} | {ratio(t)} | {ratio(c)} | {est} | {step} |")
    return lines


def ratio_rows(sec_memory: dict | None, sec_main: dict | None) -> list[dict]:
    """edgetta's and EcoTTA-torch's memory reduction against CoTTA and TENT, per measure."""
    rows = []
    if sec_memory:
        for model, by_malloc in sec_memory["results"].items():
            for ml, res in by_malloc.items():
                for eco in ("edgetta", "ecotta_torch"):
                    e = res.get(eco)
                    if not ok(e):
                        continue
                    for base in ("cotta", "tent"):
                        b = res.get(base)
                        if not ok(b):
                            continue
                        rows.append({"model": model, "malloc": ml, "method": eco, "against": base,
                                     "peak_rss": reduction(e["peak_rss_mib"], b["peak_rss_mib"]),
                                     "adaptation_share": reduction(e["adaptation_share_mib"], b["adaptation_share_mib"]),
                                     "analytic": reduction(analytic_mib(e), analytic_mib(b))})
    return rows


def ratio_table(rows: list[dict], malloc: str = "pinned") -> list[str]:
    lines = ["| model | method | vs | peak RSS | adaptation share | analytic (paper's count) | paper |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["malloc"] != malloc:
            continue
        lo, hi = PAPER[r["against"]]
        lines.append(f"| {MODEL_LABELS.get(r['model'], r['model'])} | {SHORT[r['method']]} | {SHORT[r['against']]} "
                     f"| {less(r['peak_rss'])} | {less(r['adaptation_share'])} "
                     f"| {less(r['analytic'])} | {lo * 100:.0f}-{hi * 100:.0f}% less |")
    return lines


def less(x: float | None) -> str:
    if x is None:
        return "n/a"
    if round(100 * x) >= 0:
        return f"{abs(100 * x):.0f}% less"
    return f"**{-100 * x:.0f}% more**"


def sparsity_table(sec: dict) -> list[str]:
    cfg = sec["config"]
    lines = [f"WRN-16-2 trained {cfg['epochs']} epoch(s) on the first {cfg['train_images']:,} Fashion-MNIST training "
             f"images (a short schedule: errors are higher than the built-in model's 5-epoch run), meta "
             f"networks warmed up {cfg['warmup_epochs']} epoch(s) on {cfg['warmup_images']:,} images; corrupted "
             f"stream: {cfg['frames_per_type']} per type, severity 5, batch {cfg['batch']}.", "",
             "| backbone | density | clean error % | corrupted error %, source | corrupted error %, edgetta | bundle MB | "
             "adaptation step ms | inference ms | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sec["results"]:
        if not ok(r):
            lines.append(f"| {r.get('name', '?')} | failed: {r.get('failed', '')[:60]} ||||||||")
            continue
        lines.append(f"| {r['name']} | {r['density']:.3f} | {pct(r['clean_error'])} | {pct(r['corrupted_error_source'])} "
                     f"| {pct(r['corrupted_error_edgetta'])} | {r['bundle_bytes'] / 1e6:.2f} | {r['step_ms']:.0f} "
                     f"| {r['inference_ms']:.0f} | {r['train_s']:.0f} |")
    return lines


# --------------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def plot_memory_bars(data: dict, path: Path) -> Path | None:
    mem = data.get("memory")
    if not mem:
        return None
    plt = _plt()
    res = mem["results"]
    models = list(res)
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 0.6, 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        by_malloc = res[model]
        ml = "pinned" if "pinned" in by_malloc else next(iter(by_malloc))
        rr = by_malloc[ml]
        methods = [m for m in _methods(rr) if ok(rr[m]) and not m.startswith("cotta_aug")]
        loaded = [rr[m]["rss_loaded_mib"] for m in methods]
        share = [max(rr[m]["adaptation_share_mib"], 0) for m in methods]
        x = range(len(methods))
        ax.bar(x, loaded, color="#d9d9d9", edgecolor="none", label="RSS once loaded (runtime + weights)")
        ax.bar(x, share, bottom=loaded, color=[COLORS.get(m, "k") for m in methods], edgecolor="none",
               label="adaptation share (peak - loaded), method colour")
        for i, (l, s) in enumerate(zip(loaded, share)):
            ax.text(i, l + s, f"{l + s:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [SHORT.get(m, m) for m in methods], rotation=45, ha="right")
        ax.set_title(f"{MODEL_LABELS.get(model, model)}\nbatch {model_config(mem, model)['batch']}", fontsize=9)
        ax.set_ylabel("peak RSS (MiB)" if ax is axes[0][0] else "")
        ax.margins(y=0.12)
    axes[0][0].legend(loc="upper left", fontsize=7, frameon=False)
    fig.suptitle("Peak memory of one process per method (glibc mmap threshold pinned at 64 KiB in every process)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_errors(data: dict, path: Path) -> Path | None:
    main = data.get("main")
    if not main:
        return None
    plt = _plt()
    res = main["results"]
    methods = [m for m in _methods(res) if ok(res[m]) and "error_per_domain" in res[m]]
    if not methods:
        return None
    names = list(res[methods[0]]["error_per_domain"])
    fig, ax = plt.subplots(figsize=(10, 4.3))
    for m in methods:
        r = res[m]
        style = {"lw": 2.2 if m == "edgetta" else 1.3, "ls": "--" if m in ("source", "source_meta") else "-"}
        if m == "ecotta_torch":  # drawn over edgetta, which it matches
            style = {"lw": 1.0, "ls": ":", "zorder": 3}
        ax.plot(range(len(names)), [100 * r["error_per_domain"][n] for n in names], marker="o", ms=3,
                color=COLORS.get(m), label=f"{SHORT.get(m, m)} (mean {100 * r['error']:.1f}%)", **style)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=40, ha="right")
    ax.set_ylabel("error (%)")
    cfg = main["config"]
    ax.set_title(f"Error per corruption, continual stream (severity 5, {cfg['frames_per_type']} per type, "
                 f"batch {cfg['batch']}, in stream order, no reset)", fontsize=10)
    ax.legend(fontsize=8, ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_memory_vs_batch(data: dict, path: Path) -> Path | None:
    small, main = data.get("small_batch"), data.get("main")
    if not small:
        return None
    plt = _plt()
    points: dict[str, list[tuple[int, float, float]]] = {}
    for b, res in small["results"].items():
        for m, r in res.items():
            if ok(r):
                points.setdefault(m, []).append((int(b), r["peak_rss_mib"], r["error"]))
    if main:
        for m, r in main["results"].items():
            if ok(r):
                points.setdefault(m, []).append((main["config"]["batch"], r["peak_rss_mib"], None))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in _methods(points):
        pts = sorted(points[m])
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, color=COLORS.get(m),
                 lw=2.2 if m == "edgetta" else 1.3, label=SHORT.get(m, m))
        e = [p for p in pts if p[2] is not None]
        ax2.plot([p[0] for p in e], [100 * p[2] for p in e], marker="o", ms=4, color=COLORS.get(m),
                 lw=2.2 if m == "edgetta" else 1.3, label=SHORT.get(m, m))
    all_b = sorted({p[0] for pts in points.values() for p in pts})
    err_b = sorted({p[0] for pts in points.values() for p in pts if p[2] is not None})
    for ax, batches in ((ax1, all_b), (ax2, err_b)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("peak RSS of the process (MiB)")
    ax1.set_title("Peak memory against batch size\n(each method as it ships: torch with glibc defaults)", fontsize=9)
    ax2.set_ylabel("error (%)")
    ax2.set_title(f"Error against batch size ({15 * small['config']['frames_per_type']}-frame stream)", fontsize=9)
    ax1.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_sparsity(data: dict, path: Path) -> Path | None:
    sp = data.get("sparsity")
    if not sp:
        return None
    rows = [r for r in sp["results"] if ok(r)]
    if not rows:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    w = 0.27
    ax1.bar([i - w for i in x], [100 * r["clean_error"] for r in rows], w, label="clean", color="#7f7f7f")
    ax1.bar(list(x), [100 * r["corrupted_error_source"] for r in rows], w, label="corrupted, no adaptation", color="#d62728")
    ax1.bar([i + w for i in x], [100 * r["corrupted_error_edgetta"] for r in rows], w, label="corrupted, edgetta", color="#2ca02c")
    ax1.set_xticks(list(x), [r["name"] for r in rows], rotation=30, ha="right")
    ax1.set_ylabel("error (%)")
    ax1.set_ylim(0, 1.35 * max(100 * max(r["corrupted_error_source"], r["corrupted_error_edgetta"]) for r in rows))
    ax1.legend(fontsize=8, frameon=False, ncol=3, loc="upper left")
    ax1.set_title(f"Error by backbone sparsity (short training: {sp['config']['epochs']} epoch on "
                  f"{sp['config']['train_images']:,} images)", fontsize=9)
    ax2.bar([i - 0.2 for i in x], [r["bundle_bytes"] / 1e6 for r in rows], 0.4, color="#1f77b4", label="bundle MB")
    ax3 = ax2.twinx()
    ax3.bar([i + 0.2 for i in x], [r["step_ms"] for r in rows], 0.4, color="#ff7f0e", label="adaptation step ms")
    ax2.set_xticks(list(x), [r["name"] for r in rows], rotation=30, ha="right")
    ax2.set_ylabel("bundle size (MB)")
    ax3.set_ylabel("adaptation step, batch %d (ms)" % sp["config"]["batch"])
    ax3.spines["right"].set_visible(True)
    ax2.set_ylim(0, 1.3 * max(r["bundle_bytes"] / 1e6 for r in rows))
    ax3.set_ylim(0, 1.3 * max(r["step_ms"] for r in rows))
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=8, frameon=False, loc="upper left", ncol=2)
    ax2.set_title("Bundle size and step time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- documents

def compare_md(data: dict) -> str:
    out = ["# edgetta against other test-time adaptation methods", "",
           "Generated by `python -m benchmarks.report` from `compare.json`; every number comes from the command "
           "recorded with its section.", ""]
    for name, title in (("main", "Continual, severity 5"), ("small_batch", "Small batches"),
                        ("gradual", "Gradual severity"), ("memory", "Memory per architecture"),
                        ("sparsity", "Random pruning")):
        sec = data.get(name)
        if not sec:
            continue
        cfg = sec.get("config", {})
        out += [f"## {title}", ""]
        if name == "memory" and sec.get("models"):
            cmds = {}
            for model, mc in sec["models"].items():
                cmds.setdefault(mc["command"], []).append(model)
                for pc in mc.get("partial_commands", []):
                    cmds.setdefault(pc, []).append(model)
            out += [f"Command: `{c}` ({', '.join(dict.fromkeys(ms))})  " for c, ms in cmds.items()]
        else:
            out.append(f"Command: `{cfg.get('command', sec.get('command', '?'))}`")
        if cfg.get("machine"):
            mach = cfg["machine"]
            out.append(f"Machine: {mach.get('platform')}, {mach.get('cpus')} CPUs (shared), load average at start "
                       f"{', '.join(f'{v:.1f}' for v in mach.get('load_avg_at_start', []))}; "
                       f"{cfg.get('threads')} thread(s) per method; started {cfg.get('started')}.")
        out.append("")
        if name == "main":
            out += main_tables(sec)
        elif name == "small_batch":
            out += small_batch_table(sec, data.get("main"))
        elif name == "gradual":
            out += gradual_table(sec)
        elif name == "memory":
            out += memory_tables(sec)
            out += ["Lean graph (issue 7 targets), pinned allocator:", ""] + lean_table(sec) + [""]
            rows = ratio_rows(sec, data.get("main"))
            for ml in dict.fromkeys(r["malloc"] for r in rows):
                out += ["", f"Memory reduction against CoTTA and TENT ({ml} malloc in every process):", ""]
                out += ratio_table(rows, ml)
        elif name == "sparsity":
            out += sparsity_table(sec)
        out.append("")
    return "\n".join(out) + "\n"


def readme_section(data: dict) -> str:
    from benchmarks.readme_text import render
    return render(data)


def write_all(data: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    (out_dir / "compare.md").write_text(compare_md(data))
    written.append(out_dir / "compare.md")
    for fn, name in ((plot_memory_bars, "memory_bars.png"), (plot_errors, "error_per_corruption.png"),
                     (plot_memory_vs_batch, "memory_vs_batch.png"), (plot_sparsity, "sparsity.png")):
        p = fn(data, out_dir / name)
        if p:
            written.append(p)
    (out_dir / "README_section.md").write_text(readme_section(data))
    written.append(out_dir / "README_section.md")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args(argv)
    data = json.loads((Path(a.results) / "compare.json").read_text())
    for path in write_all(data, Path(a.results)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
