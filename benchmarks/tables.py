"""Markdown tables and number formats of the benchmark reports, read from ``compare.json``
sections only (``python -m benchmarks.report`` puts them together)."""
from __future__ import annotations

from typing import Any

from benchmarks.methods import ordered, spec

MODEL_LABELS = {"default": "WRN-16-2 (trained, 80% ERK) 32x32", "wrn28_10": "WRN-28-10 32x32",
                "wrn40_2": "WRN-40-2 32x32", "resnet50": "ResNet-50 224x224",
                "mobilenet_v2_224": "MobileNetV2 224x224"}
ABBREV = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
          "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
          "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
          "pixelate": "pixel", "jpeg_compression": "jpeg"}
PAPER = {"cotta": (0.80, 0.86), "tent": (0.58, 0.68)}  # EcoTTA's memory reduction, Table 1 (analytic MB)
# the exporter (edgetta_export.bundle) stores a backbone layer as a sparse initializer at this
# density or below, where COO (12 bytes per non-zero) is smaller than dense (4 bytes per weight)
SPARSE_MAX_DENSITY = 0.3


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


def main_tables(sec: dict) -> list[str]:
    res, cfg = sec["results"], sec["config"]
    lines = [f"Continual stream: Fashion-MNIST test, 15 corruption types at severity {cfg['severity']} in the "
             f"standard order, {cfg['frames_per_type']} images per type, no reset, batch {cfg['batch']}, "
             f"{cfg['threads']} thread(s) per method, each method in a fresh process.", "",
             "| method | mean error % | ms / batch | peak RSS MiB | RSS once loaded MiB | adaptation share MiB | kept for backward MiB |",
             "|---|---|---|---|---|---|---|"]
    for m in ordered(res):
        r = res[m]
        if not ok(r):
            lines.append(f"| {spec(m).label} | failed: {r.get('failed', '?')[:80]} ||||||")
            continue
        lines.append(f"| {spec(m).label} | {pct(r.get('error'))} | {r['ms_per_batch']:.0f} | {mib(r['peak_rss_mib'])} "
                     f"| {mib(r['rss_loaded_mib'])} | {mib(r['adaptation_share_mib'])} | {mib(activations_mib(r))} |")
    names = next((list(r["error_per_domain"]) for r in res.values() if ok(r) and "error_per_domain" in r), [])
    if names:
        lines += ["", "Error (%) per corruption type, in stream order:", "",
                  "| method | " + " | ".join(ABBREV.get(n, n) for n in names) + " | mean |",
                  "|---|" + "---|" * (len(names) + 1)]
        for m in ordered(res):
            r = res[m]
            if ok(r):
                lines.append(f"| {spec(m).short} | " + " | ".join(pct(r['error_per_domain'][n], 1) for n in names)
                             + f" | **{pct(r['error'])}** |")
    return lines


def small_batch_table(sec: dict) -> list[str]:
    res, cfg = sec["results"], sec["config"]
    batches = sorted(res, key=int, reverse=True)
    methods = ordered({m: 1 for b in batches for m in res[b]})
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
        lines.append(f"| {spec(m).short} | " + " | ".join(cells) + " |")
    return lines


def gradual_table(sec: dict) -> list[str]:
    res, cfg = sec["results"], sec["config"]
    sevs = next((sorted(r["error_per_severity"], key=int) for r in res.values() if ok(r) and "error_per_severity" in r), [])
    lines = [f"Gradual: within each type the severity goes {'-'.join(map(str, cfg['severities']))}, "
             f"{cfg['per_segment']} images per segment ({cfg['per_segment'] * 135} frames), batch {cfg['batch']}, "
             "continual over the 15 types.", "",
             "| method | mean error % | " + " | ".join(f"severity {s}" for s in sevs) + " |",
             "|---|---|" + "---|" * len(sevs)]
    for m in ordered(res):
        r = res[m]
        if ok(r):
            lines.append(f"| {spec(m).short} | **{pct(r['error'])}** | "
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
        methods = ordered({m: 1 for ml in mallocs for m in by_malloc[ml]})
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
                lines.append(f"| {spec(m).short} | " + " | ".join(cells) + " | | | |")
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
            lines.append(f"| {spec(m).short} | " + " | ".join(cells)
                         + f" | {mib(activations_mib(ref))} | {mib(analytic_mib(ref))} | {step} |")
        lines.append("")
    return lines


def lean_table(sec: dict, malloc: str = "pinned") -> list[str]:
    """The lean graph against the generated one, TENT and CoTTA: peak RSS of the whole process,
    the static estimate against the measured adaptation part, and step time."""
    lines = ["| model, batch | edgetta peak MiB | generated graph peak | TENT peak | CoTTA peak "
             "| edgetta / TENT (target <= 0.35) | edgetta / CoTTA (target <= 0.25) "
             "| adaptation MiB: static estimate / one step measured / whole run | step s: lean / generated "
             "| memory_arena=True: peak MiB, step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, by_malloc in sec["results"].items():
        res = by_malloc.get(malloc, {})
        e, g, t, c, ar = (res.get(k) for k in ("edgetta", "edgetta_generated", "tent", "cotta", "edgetta_arena"))
        if not ok(e):
            continue
        peak = lambda r: mib(r["peak_rss_mib"]) if ok(r) else "n/a"
        # three decimals: at two, 0.353 reads as meeting a 0.35 target
        ratio = lambda r: f"{e['peak_rss_mib'] / r['peak_rss_mib']:.3f}" if ok(r) else "n/a"
        static = e.get("static_step_mib")
        one = e.get("measured_step_mib")
        est = " / ".join([f"{static:.0f}" if static else "n/a",
                          f"{one:.0f} ({100 * (one / static - 1):+.0f}%)" if static and one else "n/a",
                          f"{e['adaptation_share_mib']:.0f}"])
        step = f"{e['ms_per_batch'] / 1e3:.2f} / {g['ms_per_batch'] / 1e3:.2f} " \
               f"({100 * (e['ms_per_batch'] / g['ms_per_batch'] - 1):+.0f}%)" if ok(g) else f"{e['ms_per_batch'] / 1e3:.2f}"
        arena = (f"{peak(ar)} ({100 * (ar['peak_rss_mib'] / e['peak_rss_mib'] - 1):+.0f}%), "
                 f"{ar['ms_per_batch'] / 1e3:.2f} ({100 * (ar['ms_per_batch'] / e['ms_per_batch'] - 1):+.0f}%)"
                 if ok(ar) else "n/a")
        lines.append(f"| {MODEL_LABELS.get(model, model)}, {model_config(sec, model)['batch']} | {peak(e)} | {peak(g)} "
                     f"| {peak(t)} | {peak(c)} | {ratio(t)} | {ratio(c)} | {est} | {step} | {arena} |")
    return lines


def ratio_rows(sec_memory: dict | None) -> list[dict]:
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
        lines.append(f"| {MODEL_LABELS.get(r['model'], r['model'])} | {spec(r['method']).short} | {spec(r['against']).short} "
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
