"""The plot of `hymirec simulate`: every arm's rolling Recall@10 and NDCG@10 along the log."""

from __future__ import annotations

from pathlib import Path

from bench.diagnostic import FROZEN_BLEND, FROZEN_DIAGNOSTIC, Diagnostic, ExactBlend, SignalsOnly
from bench.oracle import HINDSIGHT, ORACLE, ORACLE_ITEMS, ORACLE_MIX
from bench.prequential import K, rolling

LIVE = ("frozen", "online")  # the arms served by a live system
# computed in the simulation's process
REFERENCE = (Diagnostic.name, SignalsOnly.name, ExactBlend.name, FROZEN_DIAGNOSTIC, FROZEN_BLEND, ORACLE, ORACLE_MIX,
             ORACLE_ITEMS, HINDSIGHT)
UNDRAWN = (HINDSIGHT,)  # in the table only: at ~5 × the arms (ml-100k) it would flatten every other curve


def plot(records: dict[str, list[dict]], switches: list[int], rejected: list[int], path: Path, *, window: int,
         bootstrap_events: int, title: str) -> Path:
    """PNG: each arm's rolling Recall@10 and NDCG@10 against the log position (baselines dashed), the online arm's
    version switches after the bootstrap (dashed) and rejected cycles (dotted), and the end of the
    bootstrap, where both arms start serving v0001 (grey)."""
    # Imported here on purpose: the headless backend must be chosen before pyplot loads, and only a
    # run that draws should set it (or pay for it).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colours = {"frozen": "tab:blue", "online": "tab:orange", "pop": "tab:brown", "recent-pop": "tab:green",
               "rules": "tab:purple", "item-knn": "tab:cyan", "ease": "black", "cat-trend": "gold", "diagnostic": "tab:red",
               "signals-only": "tab:grey", "exact-blend": "tab:olive",
               FROZEN_DIAGNOSTIC: "tab:pink", FROZEN_BLEND: "darkkhaki", ORACLE: "lightgrey",
               ORACLE_MIX: "silver", ORACLE_ITEMS: "gainsboro"}
    for name, recs in records.items():
        if name in UNDRAWN:
            continue
        curve = rolling(recs, window)
        style = ({"linewidth": 1.2} if name in LIVE else {"linewidth": 0.9, "linestyle": ":"} if name in REFERENCE
                 else {"linewidth": 0.9, "linestyle": "--"})
        for ax, column in zip(axes, ("recall", "ndcg")):
            ax.plot(curve["position"], curve[column], label=name, color=colours.get(name), **style)
    for ax, label in zip(axes, (f"Recall@{K}", f"NDCG@{K}")):
        ax.axvline(bootstrap_events, color="grey", linewidth=1, label="v0001, both live arms")
        for i, x in enumerate(switches):
            ax.axvline(x, color="tab:orange", linestyle="--", linewidth=0.7, alpha=0.7,
                       label="online: new version" if i == 0 else None)
        for i, x in enumerate(rejected):
            ax.axvline(x, color="tab:red", linestyle=":", linewidth=0.7, alpha=0.7,
                       label="online: candidate rejected" if i == 0 else None)
        ax.set_ylabel(f"{label} (rolling {window} events)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8, ncol=2)
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xlabel("event position in the log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
