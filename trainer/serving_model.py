"""The trainer's HyMiRec version: the served one (serving.hymirec.ServedHyMiRec) plus what only the
trainer does with it.

- **Fine-tuning.** ``fine_tune`` grows the catalogue (old items keep their index), keeps the codebook
  (so stored history codes stay valid: same ``codebook_id``), copies every weight that still fits
  (ID embeddings row by row) and trains a few epochs.
- **Publishing.** ``to_files`` gives the version's files and manifest (model.artifact).
- **The first version.** ``bootstrap`` trains the content encoder's table, codebook and model from scratch.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from hymirec.settings import Settings
from model import artifact
from model.catalogue import Catalogue
from model.codebook import CodebookConfig
from model.item_encoder import encode_content, encoder_from_recipe
from serving.hymirec import ServedHyMiRec
from serving.loader import LoadedModel
from trainer.data import Sequences
from trainer.models import HyMiRecModel, encoder_recipe
from trainer.runtime import seed_everything, select_device


class HyMiRecServing(ServedHyMiRec):
    """A HyMiRec version the online trainer fine-tunes and publishes."""

    def fine_tune(self, items: pd.DataFrame, sequences: dict[str, list[str]], epochs: int) -> HyMiRecServing:
        """A new model: this one's weights and codebook on the grown catalogue, trained ``epochs`` more."""
        old = self.module
        cat = _catalogue(items, sequences, base=self.catalogue)
        content = torch.zeros(cat.num_items + 1, old.config.content_dim)
        content[: old.items.content.size(0)] = old.items.content
        changed = [j for j, i in enumerate(cat.item_ids)
                   if j >= len(self.catalogue.item_ids) or self.catalogue.texts[j] != cat.texts[j]]
        if changed and self.encoder is not None:
            content[torch.as_tensor(changed) + 1] = old.items.standardise(
                encode_content(self.encoder, [cat.texts[j] for j in changed]))
        # The architecture stays (on the grown catalogue); how to train follows today's settings.
        config = asdict(old.config)
        overrides = {k: v for k, v in config.items() if k not in ("num_items", "content_dim")}
        overrides["codebook"] = CodebookConfig(**config["codebook"])
        model = HyMiRecModel(cat, select_device(None), self.settings, epochs=epochs, content=content, **overrides)
        model.name = "hymirec"
        new = model.model
        state = new.state_dict()
        for name, value in old.state_dict().items():
            if name in ("items.content", "items.has_content", "items.codes", "items.scales"):
                continue
            if name == "items.id_emb.weight":
                state[name][: value.size(0)] = value.to(state[name].device)
            elif name in state and state[name].shape == value.shape:
                state[name] = value.to(state[name].device)
        new.load_state_dict(state)
        if new.items.codebook is not None:  # the old codebook, so histories keep their codes
            with torch.no_grad():  # it quantises item vectors (what fit_codebook saw), not raw content
                codes, scales = new.items.codebook.encode(new.items.vectors())
            new.items.codes.copy_(codes)
            if scales is not None:
                new.items.scales.copy_(scales)
        report = model.fit(Sequences(list(sequences), [_indices(cat, s) for s in sequences.values()]), None, False)
        manifest = {**self.manifest, "parent": self.version,
                    "trained_on": {**(self.manifest.get("trained_on") or {}), "users": len(sequences),
                                   "items": cat.num_items, "epochs": report.epochs,
                                   "final_loss": round(report.final_loss, 5), "train_s": round(report.train_seconds, 1)}}
        loaded = LoadedModel(None, manifest, cat, new.cpu().eval())
        return HyMiRecServing(loaded, self.settings, self.encoder, self.encoder_files, self.encoder_recipe)

    def to_files(self, metrics: dict) -> tuple[dict[str, bytes], dict]:
        manifest = artifact.manifest(
            model="hymirec", kind="hymirec", config=asdict(self.module.config), backbone=self.manifest.get("backbone"),
            item_encoder=self.encoder_recipe, codebook=_codebook(self.module), metrics=metrics,
            trained_on=self.manifest.get("trained_on"), item_encoder_id=self.item_encoder_id, codebook_id=self.codebook_id,
        )
        return artifact.to_files(self.module, self.catalogue, self.encoder_files), manifest


def _codebook(module: nn.Module) -> dict:
    codebook = module.items.codebook
    return codebook.to_manifest() if codebook is not None else {}


def _catalogue(items: pd.DataFrame, sequences: dict[str, list[str]], base: Catalogue | None = None) -> Catalogue:
    """Catalogue rows of ``items`` (plus ids only seen in ``sequences``); ``base``'s items keep their index."""
    seen = list(dict.fromkeys(i for seq in sequences.values() for i in seq))
    frame = items[["item_id", "text", "category"]].astype({"item_id": str})
    if base is not None:
        prior = pd.DataFrame({"item_id": base.item_ids, "text": base.texts,
                              "category": [base.category_names[c - 1] if c > 0 else None for c in base.category[1:]]})
        update = frame.set_index("item_id")
        prior = prior.set_index("item_id")
        prior.update(update)
        frame = pd.concat([prior.reset_index(), frame[~frame["item_id"].isin(prior.index)]], ignore_index=True)
    return Catalogue.from_frame(frame, extra_ids=seen)


def _indices(cat: Catalogue, seq: list[str]) -> np.ndarray:
    return np.array([cat.index[i] for i in seq if i in cat.index], dtype=np.int64)


def bootstrap(settings: Settings, items: pd.DataFrame, sequences: dict[str, list[str]], epochs: int,
              backbone: str = "tiny") -> HyMiRecServing:
    """The first model: content encoder, codebook and HyMiRec trained from scratch on ``sequences``."""
    seed_everything(settings.seed)
    cat = _catalogue(items, sequences)
    recipe = encoder_recipe(backbone, settings)
    encoder = encoder_from_recipe(recipe, cat.texts)
    content = torch.cat([torch.zeros(1, encoder.out_dim), encode_content(encoder, cat.texts)])
    model = HyMiRecModel(cat, select_device(None), settings, backbone=backbone, epochs=epochs, content=content)
    model.name = "hymirec"
    report = model.fit(Sequences(list(sequences), [_indices(cat, s) for s in sequences.values()]), None, False)
    files, recipe = artifact.encoder_files(encoder, recipe)
    manifest = artifact.manifest(
        model="hymirec", kind="hymirec", config=asdict(model.config), backbone=backbone, item_encoder=recipe,
        codebook=_codebook(model.model), metrics={}, parent=None,
        trained_on={"users": len(sequences), "items": cat.num_items, "seed": settings.seed, "epochs": report.epochs,
                    "final_loss": round(report.final_loss, 5), "train_s": round(report.train_seconds, 1),
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    loaded = LoadedModel(None, manifest, cat, model.model.cpu().eval())
    return HyMiRecServing(loaded, settings, encoder, files, recipe)


load_model = HyMiRecServing.load
