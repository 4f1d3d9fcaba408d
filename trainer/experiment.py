"""`hymirec eval`: fit every named run on the leave-one-out training part (early stopping on
validation Recall@10), then full-ranking test metrics, top-10 diversity and timings, per seed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from trainer.data import Split, leave_one_out, read_log
from trainer.evaluate import evaluate, reference_vectors
from trainer.models import item_content
from trainer.recipes import ALL, RUNS, build, item_encoder_name
from trainer.results import METRIC_COLUMNS, across_seeds, cell, markdown_table, plot_results
from trainer.runtime import seed_everything, select_device

log = logging.getLogger(__name__)


def run_eval(split: Split, names: list[str], settings: Settings, *, backbone: str = "tiny",
             item_encoder: str | None = None, epochs: int | None = None, seed: int = 0,
             device: torch.device | None = None, progress: bool = False) -> list[dict]:
    """Fit and test every named run on one split → one result dict per run."""
    device = device or select_device(None)
    item_encoder = item_encoder or backbone
    reference = reference_vectors(split.train, split.catalogue.num_items)
    content = None
    phase1_cache: dict = {}
    results = []
    for name in names:
        run = RUNS[name]
        seed_everything(seed)
        if run.kind in ("hymirec", "choice") and content is None:
            content = item_content(split.catalogue, item_encoder, settings, progress)
        model = build(run, split.catalogue, settings, device, backbone, item_encoder, epochs, content, progress,
                      phase1_cache)
        report = model.fit(split.train, split.valid, progress)
        started = time.perf_counter()
        metrics = evaluate(model, split.test, reference=reference, category=split.catalogue.category)
        results.append({
            "model": name,
            **{k: round(v, 4) for k, v in metrics.items()},
            "valid_recall@10": round(report.valid_recall10, 4),
            "epochs": report.epochs,
            "best_epoch": report.best_epoch,
            "train_s": round(report.train_seconds, 1),
            "train_items_per_s": round(report.items_per_second),
            "eval_users_per_s": round(len(split.test.target) / max(1e-9, time.perf_counter() - started)),
            "seed": seed,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in report.extra.items()},
        })
        log.info("%s", json.dumps(results[-1]))
    return results


def eval_runs(settings: Settings, *, interactions: Path, items: Path, models: str, seeds: list[int],
              backbone: str | None = None, item_encoder: str | None = None, epochs: int | None = None,
              device: str | None = None, json_lines: bool = False, out: Path | None = None) -> int:
    """``models``: run names, comma-separated, or "all". Prints each run's metrics per seed (one JSON
    object a line with ``json_lines``), then with several seeds the mean ± sd; ``out``: also writes
    results.json, results.md and results.png there."""
    names = ALL if models == "all" else [n.strip() for n in models.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise HymirecError(f"unknown model {unknown[0]!r}; expected one of {', '.join(RUNS)} or all")
    split = leave_one_out(*read_log(interactions, items))
    results = []
    for seed in seeds:
        runs = run_eval(split, names, settings, backbone=backbone or "tiny",
                        item_encoder=item_encoder_name(item_encoder, backbone, settings), epochs=epochs, seed=seed,
                        device=select_device(device), progress=not json_lines)
        for r in runs:
            if json_lines:
                print(json.dumps(r), flush=True)
            else:
                print(f"{r['model']} (seed {seed}): " + "  ".join(f"{k} {r[k]}" for k in METRIC_COLUMNS if k in r),
                      flush=True)
        results += runs
    table = across_seeds(results) if len(seeds) > 1 else results
    if len(seeds) > 1 and not json_lines:
        for r in table:
            print(f"{r['model']} (mean ± sd of {r['seeds']} seeds): "
                  + "  ".join(f"{k} {cell(r, k)}" for k in METRIC_COLUMNS if k in r))
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(markdown_table(table) + "\n")
        plot_results(table, out / "results.png")
        if not json_lines:
            print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0
