"""The benchmark document and plots, generated from ``compare.json`` only (nothing is run).

    python -m benchmarks.report                       # docs/benchmarks.md + plots in benchmarks/results/
    python -m benchmarks.report --readme-table        # print the README's results table

Writes ``docs/benchmarks.md`` (``benchmarks.narrative``: findings, then every table) and, beside
the JSON, ``memory_bars.png``, ``error_per_corruption.png``, ``memory_vs_batch.png`` and (with a
sparsity section) ``sparsity.png``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchmarks import narrative, plots
from benchmarks.common import RESULTS, ROOT, HelpFormatter, run_cli
from benchmarks.methods import spec
from benchmarks.tables import MODEL_LABELS, mib, model_config, ok, pct
from edgetta.system import write_text_atomic

DOC = ROOT / "docs" / "benchmarks.md"
README_METHODS = ("source", "tent", "cotta", "ecotta_paper", "ecotta_torch", "edgetta")


def document(data: dict[str, Any], doc: Path = DOC, results: Path = RESULTS) -> str:
    """docs/benchmarks.md's text for ``data``; image links relative to the document."""
    rel = Path(os.path.relpath(results, doc.parent)).as_posix()
    return narrative.render(data, "" if rel == "." else rel + "/")


def readme_table(data: dict[str, Any]) -> str:
    """The README's one results table: accuracy on the continual stream and peak memory of the
    whole process, for the default model and the largest zoo model, against TENT and CoTTA."""
    main, mem = data["main"], data["memory"]["results"]
    big = "resnet50" if "resnet50" in mem else next(iter(mem))
    mcfg = data["memory"]
    lines = [f"| method | mean error %, continual stream (batch {main['config']['batch']}) "
             f"| peak RSS MiB, {MODEL_LABELS['default'].split(' (')[0]} (batch {model_config(mcfg, 'default')['batch']}) "
             f"| peak RSS MiB, {MODEL_LABELS.get(big, big)} (batch {model_config(mcfg, big)['batch']}) |",
             "|---|---|---|---|"]
    for m in README_METHODS:
        r = main["results"].get(m)
        cells = [pct(r["error"]) if ok(r) else "n/a"]
        for model in ("default", big):
            row = mem[model].get("pinned", {}).get(m)
            cells.append(mib(row["peak_rss_mib"]) if ok(row) else "n/a")
        name = f"**{spec(m).label}**" if m == "edgetta" else spec(m).label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_all(data: dict[str, Any], out_dir: Path, doc: Path | None = None) -> list[Path]:
    """The plots into ``out_dir`` and the document to ``doc`` (default: docs/benchmarks.md for
    the committed results, ``out_dir/benchmarks.md`` for any other folder)."""
    out_dir = Path(out_dir)
    if doc is None:
        doc = DOC if out_dir.resolve() == RESULTS.resolve() else out_dir / "benchmarks.md"
    written = []
    for section, plot, name in plots.PLOTS:
        p = plot(data, out_dir / name) if data.get(section) else None
        if p:
            written.append(p)
    write_text_atomic(doc, document(data, doc, out_dir))
    written.append(doc)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder holding compare.json; the plots go there")
    p.add_argument("--doc", default=None, help="where the document goes (default: docs/benchmarks.md for the "
                                               "committed results, else RESULTS/benchmarks.md)")
    p.add_argument("--readme-table", action="store_true", help="print the README's results table and stop")
    a = p.parse_args(argv)
    path = Path(a.results) / "compare.json"
    if not path.exists():
        p.error(f"{path} not found: run python -m benchmarks.compare first")
    data = json.loads(path.read_text())
    if a.readme_table:
        print(readme_table(data), end="")
        return 0
    for out in write_all(data, Path(a.results), Path(a.doc) if a.doc else None):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
