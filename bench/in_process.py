"""`hymirec simulate --signals-only / --in-process`: the arms that need no broker or worker, in this
process, on the live arms' protocol — for choosing settings on a validation slice in minutes.

With the model (``--in-process``), the trainer's cycles run here too (``Versions``): v0001 trained as
the online trainer's first cycle trains it (the newest events held out), then a fine-tune every
``every_events`` applied events, each on the trainer's split of the exact histories and published
without the guardrail. The model is scored alone (*diagnostic*) and in the worker's blend
(*exact-blend*), following those versions, and so is v0001 kept frozen (*frozen-diagnostic*,
*frozen-blend*): exact-blend − frozen-blend is what online fine-tuning adds, measured on the same
v0001, which two runs do not share (training is not bit-reproducible on CPU threads).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from bench.arms import SimConfig, baseline_arms, blend_step, categories_of, diagnostic_step, read_log
from bench.diagnostic import FROZEN_BLEND, FROZEN_DIAGNOSTIC, Diagnostic, ExactBlend, SignalsOnly, events_of, exact_histories
from bench.oracle import HINDSIGHT, hindsight_arm, oracle_arms
from bench.prequential import K
from bench.simulate_report import gaps, summarise
from hymirec.settings import Settings
from store.logs import read_items
from trainer.online import CycleData, split_stream
from trainer.serving_model import HyMiRecServing, bootstrap


class Versions:
    """The online trainer's cycles, in this process, on ``histories`` (the users' exact histories, grown
    in place): ``first`` trains v0001, ``fine_tune`` the next version from the newest."""

    def __init__(self, settings: Settings, catalogue: pd.DataFrame, config: SimConfig):
        self.settings, self.catalogue, self.config = settings, catalogue, config
        self.trained: dict[str, int] = {}  # per user: events the newest version learnt from
        self.newest: HyMiRecServing | None = None
        self.cycles: list[dict] = []

    def first(self, histories: dict[str, list[str]]) -> HyMiRecServing:
        data = self._split(histories)
        self.newest = bootstrap(self.settings, data.items, data.sequences, self.config.bootstrap_epochs,
                                self.config.backbone)
        return self.newest

    def fine_tune(self, histories: dict[str, list[str]], position: int) -> HyMiRecServing:
        data = self._split(histories)
        self.newest = self.newest.fine_tune(data.items, data.sequences, self.config.epochs)
        # What the report reads of a cycle: where it switched, what it published, how long it trained.
        self.cycles.append({"position": position, "published": f"cycle {len(self.cycles) + 1}",
                            "train_s": self.newest.manifest["trained_on"].get("train_s", 0.0)})
        return self.newest

    def _split(self, histories: dict[str, list[str]]) -> CycleData:
        frame = pd.DataFrame({"user_id": list(histories), "history_item_ids": list(histories.values()),
                              "event_count": [len(h) for h in histories.values()]})
        data = split_stream(frame, self.catalogue, self.trained, self.settings.trainer_holdout)
        self.trained = data.trained
        return data


def run_in_process(settings: Settings, interactions: Path, items: Path, *, config: SimConfig, dataset: str,
                   limit: int | None = None, model: bool = False) -> dict:
    """The baselines and the signals-only blend; with ``model``, also the model's four arms (the module
    doc). Returns the summary, with the gaps of the blend arms to the best baseline, exact-blend −
    signals-only (the model's share) and the online − frozen gaps."""
    log, boot = read_log(interactions, limit, config)
    n = len(log)
    catalogue = read_items(items)
    categories = categories_of(catalogue)
    records = baseline_arms(log, boot, config, categories)
    records |= oracle_arms(log, boot, config, interactions.parent)
    records[HINDSIGHT] = hindsight_arm(log, boot, config)
    exact, bootstrap_items = exact_histories(log, boot), set(log["item_id"].iloc[:boot])
    applied = events_of(log.iloc[:boot])
    arms, diagnostics = [SignalsOnly(exact, settings.recent_len, applied, categories=categories)], {}
    if model:
        versions = Versions(settings, catalogue, config)
        first = Diagnostic(versions.first(exact), catalogue)
        diagnostics = {Diagnostic.name: first, FROZEN_DIAGNOSTIC: first}
        online = ExactBlend(exact, settings.recent_len, applied, first, categories=categories)
        arms += [online, ExactBlend(exact, settings.recent_len, applied, first, name=FROZEN_BLEND, categories=categories)]
    records |= {name: [] for name in [*diagnostics, *(arm.name for arm in arms)]}
    since = 0
    for start in range(boot, n, config.chunk):
        chunk = log.iloc[start : start + config.chunk]
        for name, diagnostic in diagnostics.items():
            records[name] += diagnostic_step(diagnostic, exact, chunk, start, bootstrap_items)
        for name, scored in blend_step(arms, exact, chunk, start, bootstrap_items).items():
            records[name] += scored
        since += len(chunk)
        if model and since >= config.every_events and start + config.chunk < n:
            diagnostics[Diagnostic.name] = online.model = Diagnostic(versions.fine_tune(exact, start + len(chunk)), catalogue)
            since = 0
    cycles = {Diagnostic.name: versions.cycles, ExactBlend.name: versions.cycles} if model else {}
    summary = summarise(records, cycles, dataset=dataset, log_events=n, bootstrap_events=boot, config=asdict(config))
    best = max((a for a in summary["arms"] if summary["arms"][a]["kind"] == "baseline"),
               key=lambda a: summary["arms"][a][f"recall@{K}"] or 0.0)
    pairs = [(best, arm.name) for arm in arms]
    if model:
        pairs += [(SignalsOnly.name, ExactBlend.name), (FROZEN_BLEND, ExactBlend.name), (FROZEN_DIAGNOSTIC, Diagnostic.name)]
    summary["gap"] |= gaps(records, pairs)
    return {**summary, "in_process": "with the model" if model else "signals-only"}
