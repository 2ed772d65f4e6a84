"""What a run leaves behind: the text table, the JSON (rows, extras and the stamp), the llm_stream
plot, README.md's benchmark table, and the side-by-side comparison of two runs. Reads no product code,
so ``--compare`` and ``--from-json`` work without a product checkout."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from scripts.bench.machine import stamp_line
from scripts.bench.model import Row

#: README.md's table is everything between these two lines; ``write_readme`` replaces it.
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or math.isnan(x):
        return "-"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return f"{text} {unit}".strip()


def columns(head: tuple[str, ...], lines: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns separated by " | ", with a rule under the head."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return out


def table(rows: list[Row]) -> str:
    """The rows as a text table; errors are listed under it (a row can have both values and an error)."""
    head = ("scenario", "figure", "value", "baseline", "ratio", "target", "met?")
    lines = []
    for r in rows:
        base = f"{r.baseline} {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
        met = "ERROR" if r.error else "" if r.met is None else "yes" if r.met else "NO"
        lines.append((r.scenario, r.figure, fmt(r.value, r.unit), base, fmt(r.ratio), r.target, met))
    out = columns(head, lines)
    errors = dict.fromkeys(f"{r.scenario}: {r.error}" for r in rows if r.error)
    if errors:
        out += ["", "errors (full text in the JSON):", *(f"  {e[:400]}" for e in errors)]
    return "\n".join(out)


def clean(x: Any) -> Any:
    """JSON has no NaN: make it null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x


def write_json(path: Path, rows: list[Row], extras: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "rows": [asdict(r) for r in rows], "extras": extras}
    path.write_text(json.dumps(clean(doc), indent=2) + "\n")


def load_json(path: Path) -> tuple[list[Row], dict[str, Any]]:
    """The rows and the meta (with its stamp) of a JSON written by ``write_json``."""
    doc = json.loads(path.read_text())
    known = {f.name for f in fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in known}) for r in doc["rows"]], doc.get("meta", {})


# ---- README -----------------------------------------------------------------------------------------


def readme_block(rows: list[Row], meta: dict[str, Any]) -> str:
    """The text between (and including) the README markers: the stamp, then the table."""
    quick = " A `--quick` run (small sizes, 3 rounds): not comparable with a full run." if meta.get("quick") else ""
    return "\n".join(
        [
            README_BEGIN,
            f"Written by `python -m scripts.bench --readme`: {stamp_line(meta.get('stamp', {}))}.{quick}",
            "",
            "```",
            table(rows),
            "```",
            README_END,
        ]
    )


def replace_block(text: str, block: str) -> str:
    """``text`` with everything from README_BEGIN to README_END (inclusive) replaced by ``block``."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no {README_BEGIN} ... {README_END} block to replace")
    return text[:begin] + block + text[end + len(README_END) :]


def write_readme(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    """Rewrite the benchmark block of ``path`` (README.md); the rest of the file stays as it is."""
    path.write_text(replace_block(path.read_text(), readme_block(rows, meta)))


# ---- comparing two runs -----------------------------------------------------------------------------


def _ratio(new: float | None, old: float | None) -> str:
    return fmt(new / old) if new is not None and old else "-"


def compare(old: tuple[list[Row], dict], new: tuple[list[Row], dict]) -> str:
    """Two runs side by side, figure by figure, with new/old for the value and for its baseline (the
    baseline's ratio shows how much the machine itself moved between the runs)."""
    (old_rows, old_meta), (new_rows, new_meta) = old, new
    by_key = {(r.scenario, r.figure): r for r in old_rows}
    head = ("scenario", "figure", "old", "new", "new/old", "baseline old", "baseline new", "new/old")
    lines = []
    for r in new_rows:
        o = by_key.pop((r.scenario, r.figure), None)
        if o is None:
            lines.append((r.scenario, r.figure, "", fmt(r.value, r.unit), "new", "", fmt(r.baseline_value), ""))
            continue
        lines.append(
            (
                r.scenario,
                r.figure,
                fmt(o.value, o.unit),
                fmt(r.value, r.unit),
                _ratio(r.value, o.value),
                fmt(o.baseline_value, o.unit),
                fmt(r.baseline_value, r.unit),
                _ratio(r.baseline_value, o.baseline_value),
            )
        )
    for (scenario, name), o in by_key.items():
        lines.append((scenario, name, fmt(o.value, o.unit), "", "gone", fmt(o.baseline_value), "", ""))
    return "\n".join(
        [
            f"old: {stamp_line(old_meta.get('stamp', {}))}",
            f"new: {stamp_line(new_meta.get('stamp', {}))}",
            "",
            *columns(head, lines),
        ]
    )


# ---- the llm_stream plot ----------------------------------------------------------------------------


def write_png(path: Path, extras: dict) -> str:
    """Plot llm_stream's chunk-arrival timeline, direct vs through the product; returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--png: matplotlib is not installed (pip install matplotlib, or the 'bench' extra); no plot"
    timeline = extras.get("llm_stream_timeline_ms")
    if not timeline:
        return "--png: llm_stream did not run (or failed); no plot"
    gap = float(extras.get("llm_stream_gap_ms", 50))
    middle = timeline[len(timeline) // 2]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, style in (("direct", "o-"), ("product", "x--")):
        times = middle[name]
        events = range(len(times))
        ax1.plot(times, events, style, label=name, markersize=5)
        ax2.plot(events, [t - i * gap for i, t in enumerate(times)], style, label=name)
        ax3.plot(range(1, len(times)), [b - a for a, b in itertools.pairwise(times)], style, label=name)
    ax1.set(xlabel="arrival at the end client (ms since request)", ylabel="event #", title="llm_stream: arrivals")
    ax2.set(xlabel="event #", ylabel=f"arrival - event # x {gap:g} ms", title="lateness against the upstream's clock")
    ax3.axhline(gap, color="grey", linewidth=0.8)
    ax3.set(
        xlabel="event #", ylabel="gap to the previous event (ms)", title=f"gaps (the upstream sends every {gap:g} ms)"
    )
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"llm_stream, round {len(timeline) // 2 + 1} of {len(timeline)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
