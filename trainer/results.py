"""Eval results as a table: the mean ± sd over seeds, Markdown and a bar chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRIC_COLUMNS = ["recall@10", "ndcg@10", "recall@50", "ndcg@50", "recall@200", "ndcg@200", "ild@10", "coverage@10",
                  "train_s", "train_items_per_s"]


def across_seeds(results: list[dict]) -> list[dict]:
    """Per-seed rows → one row per model (first-seen order): the mean of each metric, its sample
    standard deviation as ``<metric>_sd`` and the number of seeds."""
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    rows = []
    for name, runs in by_model.items():
        row: dict = {"model": name, "seeds": len(runs)}
        for c in METRIC_COLUMNS:
            values = [r[c] for r in runs if c in r]
            if values:
                row[c] = float(np.mean(values))
                row[f"{c}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def cell(row: dict, col: str) -> str:
    if col not in row:
        return ""
    if f"{col}_sd" in row:
        digits = 1 if col.startswith("train") else 4
        return f"{row[col]:.{digits}f} ± {row[col + '_sd']:.{digits}f}"
    return str(row[col])


def markdown_table(results: list[dict]) -> str:
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in results)]
    seeds = any("seeds" in r for r in results)
    head = ["model", "seeds"] if seeds else ["model"]
    lines = ["| " + " | ".join(head + cols) + " |", "|---|" + "---|" * (len(head) - 1 + len(cols))]
    for r in results:
        first = [r["model"], str(r["seeds"])] if seeds else [r["model"]]
        lines.append("| " + " | ".join(first + [cell(r, c) for c in cols]) + " |")
    return "\n".join(lines)


def plot_results(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in results]
    metrics = [m for m in ("recall@10", "ndcg@10", "ild@10") if all(m in r for r in results)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.bar(names, [r[metric] for r in results], yerr=[r.get(f"{metric}_sd", 0.0) for r in results], capsize=3,
               color=["C0" if n.startswith("hymirec") else "C7" for n in names])
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
