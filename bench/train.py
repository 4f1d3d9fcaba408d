"""train: the online trainer's cycle time and training sequences/s, per backbone (tiny, SmolLM2).

For each backbone a fresh LanceDB directory gets a catalogue (``items``) and random users'
histories written as the ingest path leaves them (bench.harness.fill_histories); then the real
``trainer.online.OnlineTrainer.cycle`` runs twice:

1. **bootstrap**: no version yet: the content encoder embeds the catalogue, the codebook is fitted
   and HyMiRec trained from scratch; the guardrail scores it against the popular items; published.
2. **fine-tune**: every user gets ``NEW_EVENTS`` more events; the cycle scores the live version and
   a fine-tuned copy on the held-out ones and publishes: what runs every ``trainer_every_events``.

Each cycle is timed whole (histories read, prequential scoring of live and candidate, training,
publish). Sequences/s = user sequences × epochs / the training seconds in the version's manifest
(every phase of an epoch passes over every sequence).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench import Options
from bench.harness import catalogue, fill_histories
from bench.report import Result
from hymirec.settings import Settings
from store import Store
from store.registry import ModelRegistry

NEW_EVENTS = 3  # per user before the fine-tune cycle (the trainer holds out trainer_holdout of them)
EPOCHS = 1


def sizes(backbone: str, opts: Options) -> tuple[int, int, int]:
    """(users, events per user, items): SmolLM2 trains ~100× slower than the tiny backbone here."""
    if backbone == "smollm2":
        return (32, 50, 1000) if opts.full else (8, 30, 300)
    return (200, 50, 1000) if opts.quick else ((5000, 200, 5000) if opts.full else (1000, 100, 2000))


def cycle_row(settings: Settings, backbone: str, what: str, users: int, events: int) -> dict:
    from trainer.online import OnlineTrainer

    trainer = OnlineTrainer(settings, margin=1.0, epochs=EPOCHS, backbone=backbone, announce=False,
                            bootstrap_epochs=EPOCHS)
    started = time.perf_counter()
    result = trainer.cycle()
    seconds = time.perf_counter() - started
    trained = ModelRegistry(settings).get(result.published).manifest["trained_on"]
    return {
        "backbone": backbone, "cycle": what, "users": users, "events_per_user": events, "epochs": trained["epochs"],
        "cycle_s": round(seconds, 1), "train_s": trained["train_s"],
        "sequences_per_s": round(trained["users"] * trained["epochs"] / trained["train_s"], 1)
        if trained["train_s"] else None,
        "heldout_events": result.candidate["events"], "candidate_recall@10": round(result.candidate["recall@10"], 4),
        "version": result.published,
    }


def run_backbone(settings: Settings, workdir: Path, backbone: str, opts: Options) -> list[dict]:
    users, events, n_items = sizes(backbone, opts)
    s = settings.model_copy(update={"lancedb_uri": str(workdir / f"train-{backbone}"), "trainer_epochs": EPOCHS})
    store = Store(s)
    items = catalogue(n_items)
    store.upsert_items(items.to_dict("records"))
    rng = np.random.default_rng(settings.seed)
    ids = [f"u{j}" for j in range(users)]
    histories = [rng.integers(0, n_items, events) for _ in ids]
    fill_histories(store, ids, histories, items)
    rows = [cycle_row(s, backbone, "bootstrap", users, events)]
    fill_histories(store, ids, [np.concatenate([h, rng.integers(0, n_items, NEW_EVENTS)]) for h in histories], items)
    rows.append(cycle_row(s, backbone, "fine-tune", users, events + NEW_EVENTS))
    return rows


def backbones(opts: Options) -> tuple[str, ...]:
    """SmolLM2's cycles take minutes here: not in --quick."""
    return ("tiny",) if opts.quick else ("tiny", "smollm2")


def run(settings: Settings, opts: Options) -> Result:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-train-") as tmp:
        for backbone in backbones(opts):
            rows += run_backbone(settings, Path(tmp), backbone, opts)
    return Result(
        name="train", title="Training: online-trainer cycle time and sequences/s per backbone",
        params={"backbones": list(backbones(opts)), "epochs_per_cycle": EPOCHS, "new_events_per_user": NEW_EVENTS,
                "holdout": settings.trainer_holdout, "history_max_len": settings.history_max_len,
                "codebook": f"{settings.codebook_levels}×{settings.codebook_size}", "seed": settings.seed},
        rows=rows,
        notes=["cycle_s: one OnlineTrainer.cycle() whole: read the histories, score the live model (popular items "
               "for the bootstrap) and the candidate on the held-out events, train, publish.",
               "epochs: HyMiRec's phases counted separately (coarse branch, codebook adaptation, refined branch), "
               "each a pass over every user sequence; sequences_per_s = users × epochs / train_s.",
               "Histories are random items of a synthetic catalogue: the recall column shows the cycle ran, not "
               "model quality (see `hymirec eval`).",
               "SmolLM2-135M runs as both the item content encoder and the user backbone, on CPU in float32; "
               "its sizes are smaller so the benchmark ends in minutes; --quick leaves it out."],
    )
