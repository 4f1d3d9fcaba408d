"""`hymirec simulate`'s report: each arm's prequential metrics (overall, per third, new and old items,
cold events), the paired gaps between arms, the markdown table, the per-arm files and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.diagnostic import Diagnostic, ExactBlend, SignalsOnly
from bench.prequential import K, metrics_of, paired_gap, thirds, warm, windows
from bench.simulate_plot import LIVE, REFERENCE, plot


def kind_of(arm: str) -> str:
    return "live" if arm in LIVE else "reference" if arm in REFERENCE else "baseline"


def summarise(records: dict[str, list[dict]], cycles: dict[str, list[dict]], *, dataset: str, log_events: int,
              bootstrap_events: int, config: dict) -> dict:
    """Overall and per-third prequential metrics of each arm, cold events apart, versions and cycles."""
    arms = {}
    for name, recs in records.items():
        done = cycles.get(name, [])
        cold = [r for r in recs if r["cold"]]
        published = [c for c in done if c["published"]]
        arms[name] = {
            "kind": kind_of(name),
            **metrics_of(warm(recs)),
            "thirds": thirds(recs, bootstrap_events, log_events),
            "cold": metrics_of(cold),
            "new_items": metrics_of([r for r in warm(recs) if r["new_item"]]),
            "old_items": metrics_of([r for r in warm(recs) if not r["new_item"]]),
            "versions": sorted({c["published"] for c in published}),
            "cycles": len(done), "rejected": len(done) - len(published),
            "switch_positions": [c["position"] for c in published],
            "train_s": round(sum(c["train_s"] for c in done), 1),
        }
    baselines = {name: arm for name, arm in arms.items() if arm["kind"] == "baseline" and arm[f"recall@{K}"] is not None}
    best = {}
    if baselines and arms.get("online", {}).get(f"recall@{K}") is not None:
        name = max(baselines, key=lambda b: baselines[b][f"recall@{K}"])
        top, online = baselines[name][f"recall@{K}"], arms["online"][f"recall@{K}"]
        best = {"baseline": name, f"recall@{K}": top, "online_over_best": online / top if top else None}
    # Paired gaps (b − a over the same warm events): what online learning adds, what the blend adds to the
    # model, what the model adds to the blend, what the live system loses against its blend on exact
    # histories, and how far the best baseline is.
    pairs = [("frozen", "online"), (Diagnostic.name, "online"), (SignalsOnly.name, "online"), (ExactBlend.name, "online"),
             (best.get("baseline"), "online")]
    return {"dataset": dataset, "log_events": log_events, "bootstrap_events": bootstrap_events,
            "scored_events": len(next(iter(records.values()), [])), "config": config, "arms": arms,
            "gap": gaps(records, [(a, b) for a, b in pairs if a in records and b in records]), "best_baseline": best}


def gaps(records: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> dict:
    """{"b − a": {metric: {mean, standard_error}}}: the paired gap of each (a, b) of ``pairs``."""
    out = {}
    for a, b in pairs:
        for key, metric in (("hit", f"recall@{K}"), ("ndcg", f"ndcg@{K}")):
            mean, se = paired_gap(records[a], records[b], key)
            out.setdefault(f"{b} − {a}", {})[metric] = {"mean": mean, "standard_error": se}
    return out


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cold(arm: dict) -> str:
    """Cold events and their Recall@K; "-" for a reference arm, which answers warm users only."""
    if arm.get("kind") == "reference":
        return "-"
    return f"{arm['cold']['events']:,} ({fmt(arm['cold'][f'recall@{K}'])})"


def summary_markdown(summary: dict) -> str:
    r, n = f"recall@{K}", f"ndcg@{K}"
    how = ("bootstrap v0001 ({bootstrap_epochs} epochs), the other {scored:,} scored before they are applied "
           "(chunks of {chunk}; online: a cycle every {every_events:,} events, {epochs} epoch(s) each, margin {margin})")
    if summary.get("in_process") == "signals-only":
        how = ("are applied first, the other {scored:,} scored before they are applied (chunks of {chunk}); only the "
               "arms that need no model (--signals-only)")
    elif summary.get("in_process"):
        how = ("bootstrap v0001 ({bootstrap_epochs} epochs, trained in this process), the other {scored:,} scored "
               "before they are applied (chunks of {chunk}); only the arms that run in this process (--in-process): "
               "the trainer's cycles too, a fine-tune every {every_events:,} events, {epochs} epoch(s) each, no "
               "guardrail (diagnostic, exact-blend), beside v0001 kept frozen (frozen-diagnostic, frozen-blend)")
    lines = [
        f"Prequential Recall@{K} / NDCG@{K} on {summary['dataset']}: {summary['log_events']:,} events, the first "
        f"{summary['bootstrap_events']:,} " + how.format(scored=summary["scored_events"], **summary["config"]) + ".",
        "",
        f"| arm | warm events | Recall@{K} | NDCG@{K} | R@{K} 1st third | 2nd third | 3rd third | cold events (R@{K}) "
        "| versions | cycles (rejected) | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arm in summary["arms"].items():
        t = arm["thirds"]
        lines.append(
            f"| {name} | {arm['events']:,} | {fmt(arm[r])} | {fmt(arm[n])} | {fmt(t[0][r])} | {fmt(t[1][r])} | "
            f"{fmt(t[2][r])} | {_cold(arm)} | "
            + ("- | - | - |" if arm.get("kind") != "live" and not arm.get("cycles") else
               f"{len(arm['versions']) or 1} | {arm['cycles']} ({arm['rejected']}) | {arm['train_s']:.0f} |"))
    lines += ["", "Warm events by item: *new* = no event in the bootstrap part (v0001 never saw it used).", "",
              f"| arm | new-item events | R@{K} | N@{K} | old-item events | R@{K} | N@{K} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, arm in summary["arms"].items():
        new, old = arm["new_items"], arm["old_items"]
        lines.append(f"| {name} | {new['events']:,} | {fmt(new[r])} | {fmt(new[n])} | {old['events']:,} | "
                     f"{fmt(old[r])} | {fmt(old[n])} |")
    if summary.get("gap"):
        lines += ["", "Paired gaps over the same warm events (mean ± one standard error):", "",
                  f"| gap | R@{K} | N@{K} |", "|---|---:|---:|"]
        for pair, g in summary["gap"].items():
            lines.append(f"| {pair} | {g[r]['mean']:+.4f} ± {g[r]['standard_error']:.4f} | "
                         f"{g[n]['mean']:+.4f} ± {g[n]['standard_error']:.4f} |")
    best = summary.get("best_baseline")
    if best:
        ratio = "-" if best["online_over_best"] is None else f"{best['online_over_best']:.2f}"
        lines += ["", f"Best simple streaming baseline (DESIGN §7a): {best['baseline']} R@{K} {fmt(best[r])}; "
                      f"online / best = {ratio} (the target: ≥ 1.2)."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, summary: dict, records: dict[str, list[dict]], cycles: dict[str, list[dict]],
                  window: int) -> dict[str, Path]:
    """Per arm: events (CSV), windows (JSONL + CSV) and cycles (JSONL); summary.json / summary.md; plot.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, recs in records.items():
        pd.DataFrame(recs).to_csv(out / f"{name}_events.csv", index=False)
        wins = windows(recs, window)
        pd.DataFrame(wins).assign(versions=lambda f: f["versions"].str.join(" ")).to_csv(out / f"{name}_windows.csv", index=False)
        (out / f"{name}_windows.jsonl").write_text("".join(json.dumps(w) + "\n" for w in wins))
        (out / f"{name}_cycles.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cycles.get(name, [])))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    paths["table"] = out / "summary.md"
    paths["table"].write_text(summary_markdown(summary))
    after = cycles.get("online", [])[1:]  # the first cycle is the bootstrap, drawn as its own line
    paths["plot"] = plot(records, [c["position"] for c in after if c["published"]],
                         [c["position"] for c in after if not c["published"]], out / "plot.png", window=window,
                         bootstrap_events=summary["bootstrap_events"], title=f"prequential, {summary['dataset']}: "
                         "frozen after the bootstrap vs online fine-tuning vs the simple baselines")
    return paths
