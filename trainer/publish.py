"""`hymirec train`: fit on a whole log for a fixed number of epochs and publish a registry version
(model.artifact: its files and manifest; the registry, store.registry, adds the sha256 of every
file). serving.loader loads one back.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from hymirec.settings import Settings
from model import artifact
from store.registry import ModelRegistry, ModelVersion
from trainer.data import build_sequences, load_catalogue, read_log
from trainer.evaluate import RankingModel
from trainer.models import encoder_recipe
from trainer.recipes import RUNS, build, item_encoder_name
from trainer.runtime import seed_everything, select_device


def train_and_publish(settings: Settings, *, interactions: Path, items: Path, model: str = "hymirec",
                      backbone: str | None = None, item_encoder: str | None = None, epochs: int | None = None,
                      seed: int | None = None, device: str | None = None) -> tuple[ModelVersion, RankingModel]:
    """Fit run ``model`` on the whole log and publish it → (the version, the trained model).
    Defaults: the tiny backbone, HYMIREC_ITEM_ENCODER or the backbone, the model's own epochs,
    HYMIREC_SEED, cuda when available."""
    events, item_rows = read_log(interactions, items)
    catalogue = load_catalogue(events, item_rows)
    sequences = build_sequences(events, catalogue)
    seed = settings.seed if seed is None else seed
    seed_everything(seed)
    item_encoder = item_encoder_name(item_encoder, backbone, settings)
    backbone = backbone or "tiny"
    trained = build(RUNS[model], catalogue, settings, select_device(device), backbone, item_encoder, epochs,
                    progress=True)
    report = trained.fit(sequences, None, progress=True)
    kind = "sasrec" if model == "sasrec" else "hymirec"
    config = trained.config
    codebook = None
    if getattr(config, "use_codebook", False) and getattr(config, "use_coarse", False):
        codebook = {**trained.model.items.codebook.to_manifest(), "bytes_per_item": report.extra["bytes_per_item"],
                    "reconstruction_cosine": round(report.extra["reconstruction_cosine"], 4)}
    manifest = artifact.manifest(
        model=model, kind=kind, config=asdict(config), backbone=backbone,
        item_encoder=encoder_recipe(item_encoder, settings),
        codebook=codebook,
        metrics={"final_loss": round(report.final_loss, 5), "epochs": report.epochs,
                 "train_s": round(report.train_seconds, 1), "train_items_per_s": round(report.items_per_second)},
        trained_on={"interactions": str(interactions), "events": len(events), "users": len(sequences),
                    "items": catalogue.num_items, "seed": seed, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    weights = trained.model if kind == "hymirec" else torch.nn.ModuleList([trained.model, trained.scale])
    registry = ModelRegistry(settings)
    parent = registry.latest()
    return registry.publish(artifact.to_files(weights, catalogue), manifest, parent.version if parent else None), trained
