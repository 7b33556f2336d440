"""Samples per runtime per workload, their medians, p90s and p95s, the table and the JSON dump."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Series:
    """One runtime's samples for one figure; `error` or `unsupported` when it has none."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None
    unsupported: bool = False  # the runtime answered UNIMPLEMENTED

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def p90(self) -> float | None:
        if len(self.samples) < 2:
            return self.median()
        # "inclusive" keeps p90 within the observed range for small N.
        return statistics.quantiles(self.samples, n=10, method="inclusive")[8]

    def p95(self) -> float | None:
        if len(self.samples) < 2:
            return self.median()
        return statistics.quantiles(self.samples, n=20, method="inclusive")[18]


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    series: dict[str, Series] = field(default_factory=dict)

    def of(self, runtime: str) -> Series:
        return self.series.setdefault(runtime, Series())


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def figure(self, key: str, title: str, unit: str) -> Figure:
        for existing in self.figures:
            if existing.key == key:
                return existing
        created = Figure(key, title, unit)
        self.figures.append(created)
        return created

    def write_json(self, path: Path) -> None:
        doc = {"meta": self.meta, "notes": self.notes,
               "figures": [asdict(f) for f in self.figures]}
        path.write_text(json.dumps(doc, indent=1) + "\n")


def _cell(series: Series | None) -> tuple[str, str, str]:
    if series is None:
        return "-", "-", "-"
    if series.unsupported:
        return "n/a", "n/a", "n/a"
    if series.error is not None and not series.samples:
        return "ERROR", "ERROR", "ERROR"
    return _num(series.median()), _num(series.p90()), _num(series.p95())


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _ratio(a: Series | None, b: Series | None) -> str:
    if a is None or b is None or a.unsupported or b.unsupported:
        return "-"
    ma, mb = a.median(), b.median()
    if ma is None or mb is None or mb == 0:
        return "-"
    return f"{ma / mb:.2f}"


def format_table(report: Report, runtimes: list[str]) -> str:
    header = ["workload", "unit"]
    for name in runtimes:
        header += [f"{name} med", "p90", "p95"]
    pairs = _ratio_pairs(runtimes)
    header += [label for label, _a, _b in pairs]
    rows = [header]
    for fig in report.figures:
        row = [fig.title, fig.unit]
        for name in runtimes:
            row += list(_cell(fig.series.get(name)))
        row += [_ratio(fig.series.get(a), fig.series.get(b)) for _label, a, b in pairs]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        numbers = zip(r[1:], widths[1:], strict=True)
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in numbers]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ratio_pairs(runtimes: list[str]) -> list[tuple[str, str, str]]:
    """(column label, numerator, denominator): each runtime against the last one; with two
    flatpods (an A/B of event loops) and containerd, also the two flatpods' own ratio."""
    if len(runtimes) < 2:
        return []
    if len(runtimes) == 2 and not any("-" in name for name in runtimes):
        return [(f"{runtimes[0][:2]}/{runtimes[1][:4]}", runtimes[0], runtimes[1])]

    def short(name: str) -> str:
        return name.removeprefix("flatpod-")[:4]

    last = runtimes[-1]
    pairs = [(f"{short(name)}/{short(last)}", name, last) for name in runtimes[:-1]]
    if len(runtimes) == 3:
        pairs.append((f"{short(runtimes[1])}/{short(runtimes[0])}", runtimes[1], runtimes[0]))
    return pairs


def format_errors(report: Report) -> list[str]:
    out = []
    for fig in report.figures:
        for name, series in fig.series.items():
            if series.error is not None:
                out.append(f"{fig.title} [{name}]: {series.error}")
    return out


def format_growth(report: Report, runtimes: list[str], sizes: list[int]) -> str:
    """The at-scale figures (keys `name@pods`) as one row per figure and runtime, with a
    column of medians per pod count, the growth from the first size to the last, and, for
    two runtimes, a ratio row (first / second) per figure."""
    families: dict[str, Figure] = {}
    by_key = {f.key: f for f in report.figures}
    for fig in report.figures:
        if "@" in fig.key:
            families.setdefault(fig.key.split("@")[0], fig)
    header = ["at scale (median)", "unit", *[f"{n} pods" for n in sizes],
              f"x{sizes[-1]}/{sizes[0]}"]
    rows = [header]
    for family, first in families.items():
        per_size = [by_key.get(f"{family}@{n}") for n in sizes]
        medians: dict[str, list[float | None]] = {}
        for name in runtimes:
            medians[name] = [_median_of(f, name) for f in per_size]
            rows.append([f"{family} [{name}]", first.unit,
                         *[_num(m) for m in medians[name]], _growth(medians[name])])
        if len(runtimes) == 2:
            a, b = medians[runtimes[0]], medians[runtimes[1]]
            ratios = [x / y if x is not None and y else None for x, y in zip(a, b, strict=True)]
            rows.append([f"{family} {runtimes[0][:2]}/{runtimes[1][:4]}", "",
                         *[f"{r:.2f}" if r is not None else "-" for r in ratios], ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                  zip(r[1:], widths[1:], strict=True)])
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _median_of(fig: Figure | None, runtime: str) -> float | None:
    series = fig.series.get(runtime) if fig is not None else None
    if series is None or series.unsupported:
        return None
    return series.median()


def _growth(medians: list[float | None]) -> str:
    first, last = medians[0], medians[-1]
    if first is None or last is None or first == 0:
        return "-"
    return f"{last / first:.2f}"
