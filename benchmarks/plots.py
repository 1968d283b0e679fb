"""The benchmark plots, drawn from ``compare.json`` sections only (``python -m benchmarks.report``)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.methods import ordered, spec
from benchmarks.tables import MODEL_LABELS, SPARSE_MAX_DENSITY, model_config, ok


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(plt, fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_memory_bars(data: dict, path: Path) -> Path | None:
    mem = data["memory"]
    plt = _plt()
    res = mem["results"]
    models = list(res)
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 0.6, 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        by_malloc = res[model]
        ml = "pinned" if "pinned" in by_malloc else next(iter(by_malloc))
        rr = by_malloc[ml]
        methods = [m for m in ordered(rr) if ok(rr[m]) and not m.startswith("cotta_aug")]
        loaded = [rr[m]["rss_loaded_mib"] for m in methods]
        share = [max(rr[m]["adaptation_share_mib"], 0) for m in methods]
        x = range(len(methods))
        ax.bar(x, loaded, color="#d9d9d9", edgecolor="none", label="RSS once loaded (runtime + weights)")
        ax.bar(x, share, bottom=loaded, color=[spec(m).colour for m in methods], edgecolor="none",
               label="adaptation share (peak - loaded), method colour")
        for i, (l, s) in enumerate(zip(loaded, share)):
            ax.text(i, l + s, f"{l + s:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [spec(m).short for m in methods], rotation=45, ha="right")
        ax.set_title(f"{MODEL_LABELS.get(model, model)}\nbatch {model_config(mem, model)['batch']}", fontsize=9)
        ax.set_ylabel("peak RSS (MiB)" if ax is axes[0][0] else "")
        ax.margins(y=0.12)
    # the legend below the panels, where it cannot cover a bar or its label
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Peak memory of one process per method (glibc mmap threshold pinned at 64 KiB in every process)",
                 fontsize=10)
    return _save(plt, fig, path, rect=(0, 0.07, 1, 1))


def plot_errors(data: dict, path: Path) -> Path | None:
    main = data["main"]
    plt = _plt()
    res = main["results"]
    methods = [m for m in ordered(res) if ok(res[m]) and "error_per_domain" in res[m]]
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
                color=spec(m).colour, label=f"{spec(m).short} (mean {100 * r['error']:.1f}%)", **style)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=40, ha="right")
    ax.set_ylabel("error (%)")
    cfg = main["config"]
    ax.set_title(f"Error per corruption, continual stream (severity 5, {cfg['frames_per_type']} per type, "
                 f"batch {cfg['batch']}, in stream order, no reset)", fontsize=10)
    ax.legend(fontsize=8, ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_memory_vs_batch(data: dict, path: Path) -> Path | None:
    small, main = data["small_batch"], data.get("main")
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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.3))
    for m in ordered(points):
        pts = sorted(points[m])
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, color=spec(m).colour,
                 lw=2.2 if m == "edgetta" else 1.3, label=spec(m).short)
        e = [p for p in pts if p[2] is not None]
        ax2.plot([p[0] for p in e], [100 * p[2] for p in e], marker="o", ms=4, color=spec(m).colour,
                 lw=2.2 if m == "edgetta" else 1.3, label=spec(m).short)
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
    # one legend for both panels, below them, where no line runs
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, 0.06, 1, 1))


def plot_sparsity(data: dict, path: Path) -> Path | None:
    sp = data["sparsity"]
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
    ax2.set_xticks(list(x), [r["name"] for r in rows], rotation=30, ha="right")
    step_label = "adaptation step, batch %d (ms)" % sp["config"]["batch"]
    if sp["config"].get("sparse_max_density", SPARSE_MAX_DENSITY) != SPARSE_MAX_DENSITY:
        # bundle sizes from an exporter with another sparse-storage rule are not today's: not drawn
        ax2.bar(list(x), [r["step_ms"] for r in rows], 0.5, color="#ff7f0e")
        ax2.set_ylabel(step_label)
        ax2.set_ylim(0, 1.3 * max(r["step_ms"] for r in rows))
        ax2.set_title("Adaptation step time (bundle sizes: see the table)", fontsize=9)
    else:
        ax2.bar([i - 0.2 for i in x], [r["bundle_bytes"] / 1e6 for r in rows], 0.4, color="#1f77b4", label="bundle MB")
        ax3 = ax2.twinx()
        ax3.bar([i + 0.2 for i in x], [r["step_ms"] for r in rows], 0.4, color="#ff7f0e", label="adaptation step ms")
        ax2.set_ylabel("bundle size (MB)")
        ax3.set_ylabel(step_label)
        ax3.spines["right"].set_visible(True)
        ax2.set_ylim(0, 1.3 * max(r["bundle_bytes"] / 1e6 for r in rows))
        ax3.set_ylim(0, 1.3 * max(r["step_ms"] for r in rows))
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=8, frameon=False, loc="upper left", ncol=2)
        ax2.set_title("Bundle size and step time", fontsize=9)
    return _save(plt, fig, path)


# (the compare.json section a plot needs, the plot, its file name)
PLOTS = (("memory", plot_memory_bars, "memory_bars.png"), ("main", plot_errors, "error_per_corruption.png"),
         ("small_batch", plot_memory_vs_batch, "memory_vs_batch.png"), ("sparsity", plot_sparsity, "sparsity.png"))
