"""What every benchmark reports besides its numbers: the machine, the versions, its parameters, and
each DESIGN §7 target as met / missed by how much. Written as JSON (for tools) and Markdown (for
people) under the results directory, and printed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.loadwatch import describe as describe_load
from hymirec.settings import Settings

NOT_MEASURED = "not measured"
TARGET_COLUMNS = ["what", "target", "measured", "spread", "runs", "verdict", "note"]


def machine() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    load = os.getloadavg()
    return {
        "cpu_model": _cpu_model(),
        "cores": cores,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "load_average_1m": round(load[0], 2),
        # Other processes competing for the cores make every timing slower and noisier.
        "noisy": load[0] > cores,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(settings: Settings) -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "lancedb": version("lancedb"),
        "pyarrow": version("pyarrow"),
        "numpy": version("numpy"),
        "kafka_broker": settings.kafka_version,
        "aiokafka": version("aiokafka"),
        "kafka-python": version("kafka-python"),
        "faust-streaming": version("faust-streaming"),
        "hymirec": version("hymirec"),
    }


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float | None]:
    """{"p50": ..., ...} of ``values`` (None when there are none)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return {f"p{q}": (float(np.percentile(arr, q)) if arr.size else None) for q in qs}


def repeated(values) -> dict[str, Any]:
    """The median of a figure measured in several runs, with its spread: {"median", "min", "max",
    "runs", "values"} (None for the figures when no run measured it; runs that measured nothing are
    left out of the median and counted)."""
    measured = [float(v) for v in values if v is not None]
    if not measured:
        return {"median": None, "min": None, "max": None, "runs": 0, "values": []}
    return {"median": float(np.median(measured)), "min": min(measured), "max": max(measured),
            "runs": len(measured), "values": [round(v, 4) for v in measured]}


def spread_text(agg: dict[str, Any]) -> str:
    """``min–max`` of a ``repeated`` figure ("" for one run or none)."""
    if agg["runs"] < 2:
        return ""
    return f"{_cell(round(agg['min'], 4))}–{_cell(round(agg['max'], 4))}"


def _with_runs(row: dict[str, Any], runs: dict[str, Any] | None) -> dict[str, Any]:
    if runs is None:
        return row | {"spread": "", "runs": 1 if row["measured"] is not None else 0}
    return row | {"spread": spread_text(runs), "runs": runs["runs"]}


def target(what: str, measured: float | dict | None, bound: float, *, at_least: bool, unit: str = "",
           note: str = "") -> dict[str, Any]:
    """One DESIGN §7 target: met or missed, and by how much (relative to the bound). ``measured`` is
    one figure, or a ``repeated`` one: then its median is judged and its spread shown beside it."""
    runs = measured if isinstance(measured, dict) else None
    measured = runs["median"] if runs is not None else measured
    row = _with_runs({"what": what, "target": f"{'≥' if at_least else '≤'} {bound:g}{unit}", "measured": measured,
                      "note": note}, runs)
    if measured is None:
        return row | {"met": None, "verdict": NOT_MEASURED}
    met = measured >= bound if at_least else measured <= bound
    gap = abs(measured - bound) / abs(bound) if bound else float("inf")
    verdict = f"met (margin {gap:.0%})" if met else f"missed by {gap:.0%}"
    return row | {"measured": round(measured, 4), "met": met, "verdict": verdict}


def not_measured(what: str, why: str) -> dict[str, Any]:
    return {"what": what, "target": "", "measured": None, "spread": "", "runs": 0, "met": None,
            "verdict": NOT_MEASURED, "note": why}


def reported(what: str, measured: float | dict | None, note: str = "") -> dict[str, Any]:
    """A figure shown next to the targets that DESIGN §7 gives no bound for (one, or ``repeated``)."""
    runs = measured if isinstance(measured, dict) else None
    measured = runs["median"] if runs is not None else measured
    return _with_runs({"what": what, "target": "", "measured": None if measured is None else round(measured, 4),
                       "met": None, "verdict": "reported (no target)" if measured is not None else NOT_MEASURED,
                       "note": note}, runs)


@dataclass
class Result:
    """One benchmark's output. ``rows`` is its table (the same keys in every row)."""

    name: str
    title: str
    params: dict[str, Any]
    rows: list[dict[str, Any]]
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # more tables, by heading
    extra: dict[str, Any] = field(default_factory=dict)  # secondary measurements (shown as JSON)
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    started_at: str = ""
    seconds: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)  # bench.loadwatch.record around the run
    # Text files written next to the results: {suffix: text} → <name>_<suffix> (e.g. a profile).
    attachments: dict[str, str] = field(default_factory=dict)


def stamp(result: Result, settings: Settings, started: float, load: dict[str, Any] | None = None) -> Result:
    """Fill in machine, versions, timing and the load around the run (machine last: the load
    average of the run itself)."""
    result.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    result.seconds = round(time.time() - started, 1)
    result.machine = machine()
    result.versions = versions(settings)
    if load is not None:
        result.load = load
    return result


# --- output ---------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)]) + "\n"


def header(result: Result) -> str:
    m, v = result.machine, result.versions
    lines = [
        f"# {result.title}",
        "",
        f"Run {result.started_at}, {result.seconds:g} s. Machine: {m['cpu_model']}, {m['cores']} cores, "
        f"{m['ram_gib']} GiB RAM, load average {m['load_average_1m']} ({m['os']}).",
    ]
    if result.load:
        lines += ["", describe_load(result.load)]
        if result.load["busy"]:
            lines.append(f"**Warning: the machine was busy** ({result.load['warning']}): these figures are slower "
                         f"and noisier than the machine's own; rule: {result.load['rule']}.")
    elif m["noisy"]:
        lines.append(f"**Noisy numbers:** the load average ({m['load_average_1m']}) exceeded the {m['cores']} "
                     "cores during the run; other processes shared the CPU.")
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
              "", "Parameters: " + ", ".join(f"{k}={val}" for k, val in result.params.items()) + "."]
    return "\n".join(lines) + "\n"


def to_markdown(result: Result) -> str:
    parts = [header(result), "", markdown_table(result.rows)]
    for heading, rows in result.tables.items():
        parts += ["", f"## {heading}", "", markdown_table(rows)]
    if result.targets:
        parts += ["", "## Targets (DESIGN §7)", "", markdown_table(result.targets, TARGET_COLUMNS),
                  "measured: the median of the runs; spread: their min–max."]
    if result.extra:
        parts += ["", "## Also measured", "", "```json", json.dumps(result.extra, indent=2, default=str), "```"]
    if result.notes:
        parts += ["", "## Notes", "", *(f"- {n}" for n in result.notes)]
    return "\n".join(parts) + "\n"


def write(result: Result, out_dir: Path) -> tuple[Path, Path]:
    """<name>.json, <name>.md and each attachment as <name>_<suffix>; the JSON names the attachments."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{result.name}.json", out_dir / f"{result.name}.md"
    data = asdict(result)
    data["attachments"] = []
    for suffix, text in result.attachments.items():
        (out_dir / f"{result.name}_{suffix}").write_text(text)
        data["attachments"].append(f"{result.name}_{suffix}")
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(to_markdown(result))
    return json_path, md_path


def write_summary(results: list[Result], out_dir: Path) -> tuple[Path, Path]:
    """Every benchmark's targets in one table (``hymirec bench all``)."""
    rows = [{"benchmark": r.name, **t} for r in results for t in r.targets]
    busy = {r.name: r.load["warning"] for r in results if r.load.get("busy")}
    summary = {"machine": machine(), "results": [r.name for r in results], "targets": rows, "busy": busy}
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    warning = (f"**Warning: the machine was busy** during {', '.join(busy)} (see each benchmark's page).\n\n"
               if busy else "")
    md_path.write_text("# Benchmarks: DESIGN §7 targets\n\n" + warning
                       + markdown_table(rows, ["benchmark", *TARGET_COLUMNS]))
    return json_path, md_path
