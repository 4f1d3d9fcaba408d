"""The online loop's view of a HyMiRec version (``serving.model.ServingModel``), over trainer.publish.

What the offline side leaves out and the online loop needs:

- **New items.** A published model knows the items it trained on (content rows, codes, ID
  embeddings). An item that arrives later is embedded from its text with the version's *content
  encoder* (the frozen item LLM), coded with its codebook, and appended to the model's item table
  without an ID embedding, so it can be retrieved and read in histories at once. Versions published
  here carry that encoder (tiny backbones: weights and tokenizer; pretrained ones: their name); for
  other versions it is rebuilt from the recipe and used only if it reproduces the stored content of
  a sample of items — otherwise new items wait for the next version.
- **Fine-tuning.** ``fine_tune`` grows the catalogue (old items keep their index), keeps the codebook
  (so stored history codes stay valid: same ``codebook_id``), copies every weight that still fits
  (ID embeddings row by row) and trains a few epochs.
- **Fingerprints.** ``item_encoder_id`` hashes what item vectors are made of (content, projection,
  ID embeddings); ``codebook_id`` the codebook's centres and scale tables.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from model import artifact
from model.codebook import CodebookConfig
from model.item_encoder import ItemEncoder, encode_content, frozen_encoder
from store.registry import ModelRegistry
from serving.model import EncodedItems
from trainer.data import Catalogue, Sequences, pad_left
from trainer.models import HyMiRecModel
from trainer.publish import LoadedModel, load_version
from trainer.runtime import seed_everything, select_device

log = logging.getLogger(__name__)

VERIFY_ITEMS = 16  # catalogue items re-encoded to check a rebuilt content encoder
VERIFY_COSINE = 0.999
INTERESTS_BATCH = 64


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- the content encoder (frozen item LLM) ----------------------------------------------------------
def _recipe(manifest: dict) -> dict:
    """How the version's content encoder was made: its ``item_encoder`` entry, or (older
    manifests) what trainer.models.item_content used: the backbone, width content_dim, the seed."""
    spec = manifest.get("item_encoder") or {}
    return {"backbone": spec.get("backbone", manifest.get("backbone", "tiny")),
            "hidden": spec.get("hidden", manifest["config"]["content_dim"]),
            "seed": spec.get("seed", (manifest.get("trained_on") or {}).get("seed", 0)), **spec}


# --- the adapter ------------------------------------------------------------------------------------
class HyMiRecServing:
    """A HyMiRec version as a ``serving.model.ServingModel`` (version None until published)."""

    def __init__(self, loaded: LoadedModel, settings: Settings, encoder: ItemEncoder | None,
                 encoder_files: dict[str, bytes], encoder_recipe: dict):
        """``encoder``: the frozen content encoder (None: new items cannot be embedded); its files
        and recipe go into every version published from this one."""
        if loaded.kind != "hymirec":
            raise HymirecError(f"model {loaded.version} is a {loaded.kind} model; the online loop serves hymirec models")
        self.loaded = loaded
        self.settings = settings
        self.encoder = encoder
        self.encoder_files = encoder_files
        self.encoder_recipe = encoder_recipe
        self.module.eval()
        items = self.module.items
        self.item_encoder_id = "ie-" + _digest({k: v for k, v in items.state_dict().items()
                                                if not k.startswith("codebook.") and k not in ("codes", "scales")})
        self.codebook_id = "cb-" + _digest(items.codebook.state_dict()) if items.codebook is not None else None
        self._vectors: torch.Tensor | None = None

    @property
    def version(self) -> str | None:
        return self.loaded.version

    @property
    def parent(self) -> str | None:
        return self.loaded.manifest.get("parent")

    @property
    def manifest(self) -> dict:
        return self.loaded.manifest

    @property
    def module(self):
        return self.loaded.module

    @property
    def catalogue(self) -> Catalogue:
        return self.loaded.catalogue

    # --- serving ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_items(self, items: pd.DataFrame) -> EncodedItems:
        ids = [str(i) for i in items["item_id"]]
        texts = ["" if pd.isna(t) else str(t) for t in items["text"]]
        index = self.catalogue.index
        fresh = [j for j, (i, t) in enumerate(zip(ids, texts)) if i not in index or self.catalogue.texts[index[i] - 1] != t]
        if fresh and self.encoder is not None:
            self._upsert_items([ids[j] for j in fresh], [texts[j] for j in fresh])
        known = [i for i in ids if i in index and (self.encoder is not None or i not in {ids[j] for j in fresh})]
        if not known:
            return EncodedItems([], np.zeros((0, self.module.config.dim), np.float32), [])
        rows = torch.as_tensor([index[i] for i in known])
        vectors = self._item_vectors()[rows].numpy()
        codebook = self.module.items.codebook
        codes = [None] * len(known)
        if codebook is not None:
            packed = codebook.pack(self.module.items.codes[rows], self.module.items.scales[rows])
            codes = [row.tobytes() for row in packed]
        return EncodedItems(known, vectors, codes)

    def _item_vectors(self) -> torch.Tensor:
        if self._vectors is None:
            self._vectors = self.module.item_vectors().float()
        return self._vectors

    def _upsert_items(self, ids: list[str], texts: list[str]) -> None:
        """Give new items (appended, no ID embedding) and changed ones their content and codes."""
        items, cat = self.module.items, self.catalogue
        content = items.standardise(encode_content(self.encoder, texts))  # stored content is standardised
        new = [i for i in dict.fromkeys(ids) if i not in cat.index]
        if new:
            n = len(new)
            cat.append(new)
            grow = {"content": torch.zeros(n, items.content.size(1)), "has_content": torch.zeros(n, 1)}
            if items.codebook is not None:
                grow |= {"codes": torch.zeros(n, items.codes.size(1), dtype=torch.long),
                         "scales": torch.zeros(n, items.scales.size(1), dtype=torch.uint8),
                         "history_table": torch.zeros(n, items.history_table.size(1))}
            for name, extra in grow.items():
                setattr(items, name, torch.cat([getattr(items, name), extra]))  # buffers stay buffers
            if items.id_emb is not None:
                weight = torch.cat([items.id_emb.weight.data, torch.zeros(n, items.id_emb.embedding_dim)])
                items.id_emb = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=0)
            self.module.config.num_items = items.config.num_items = len(cat.item_ids)
        rows = torch.as_tensor([cat.index[i] for i in ids])
        for i, t in zip(ids, texts):
            cat.texts[cat.index[i] - 1] = t
        items.content[rows] = content
        items.has_content[rows] = (content.abs().sum(-1, keepdim=True) > 0).float()
        if items.codebook is not None:
            # The codebook quantises item vectors (what fit_codebook saw), not raw content.
            codes, scales = items.codebook.encode(items.vectors()[rows])
            items.codes[rows] = codes
            if scales is not None:
                items.scales[rows] = scales
            items.history_table[rows] = items.codebook.decode(codes, scales)
        self._vectors = None

    @torch.no_grad()
    def interests(self, histories) -> np.ndarray:
        index, cfg = self.catalogue.index, self.module.config
        seqs = [np.array([index[i] for i in h if i in index], dtype=np.int64) for h in histories]
        out = []
        for start in range(0, len(seqs), INTERESTS_BATCH):
            batch = seqs[start : start + INTERESTS_BATCH]
            longest = max(1, min(cfg.history_len, max(len(s) for s in batch)))
            out.append(self.module(torch.as_tensor(pad_left(batch, longest))).float())
        return torch.cat(out).numpy() if out else np.zeros((0, cfg.num_interests, cfg.dim), np.float32)

    # --- training ---------------------------------------------------------------------------------
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
        config = asdict(old.config)
        # The draw of negatives is how to train, not what the model is: it follows today's settings.
        keep_settings = ("num_items", "content_dim", "codebook", "negatives", "negatives_popular")
        overrides = {k: v for k, v in config.items() if k not in keep_settings}
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
    recipe = {"backbone": backbone, "hidden": settings.embedding_dim, "seed": settings.seed}
    encoder = frozen_encoder(backbone, cat.texts, recipe["hidden"], recipe["seed"])
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


def load_model(settings: Settings, version: str) -> HyMiRecServing:
    """A published version, every byte verified (CorruptArtifact otherwise), ready to serve."""
    loaded = load_version(settings, version)
    if loaded.kind != "hymirec":
        raise HymirecError(f"model {version} is a {loaded.kind} model; the online loop serves hymirec models")
    recipe = _recipe(loaded.manifest)
    files: dict[str, bytes] = {}
    if recipe.get("files"):
        _, all_files = ModelRegistry(settings).load(version)
        files = {name: all_files[name] for name in recipe["files"]}
        encoder = artifact.encoder_from_files(recipe, files)
    else:
        encoder = _verified_rebuild(loaded, recipe)
    return HyMiRecServing(loaded, settings, encoder, files, recipe)


def _verified_rebuild(loaded: LoadedModel, recipe: dict) -> ItemEncoder | None:
    """The content encoder rebuilt from its recipe, if it reproduces the stored content of a sample
    of items (a tiny tokenizer is trained on the catalogue's texts: they must be the same)."""
    try:
        encoder = frozen_encoder(recipe["backbone"], loaded.catalogue.texts, recipe["hidden"], recipe["seed"])
    except HymirecError as exc:
        log.warning("model %s: no content encoder (%s); items it has not trained on wait for the next version",
                    loaded.version, exc)
        return None
    sample = [j for j, t in enumerate(loaded.catalogue.texts) if t.strip()][:VERIFY_ITEMS]
    if sample:
        again = loaded.module.items.standardise(encode_content(encoder, [loaded.catalogue.texts[j] for j in sample]))
        stored = loaded.module.items.content[torch.as_tensor(sample) + 1]
        cosine = torch.nn.functional.cosine_similarity(again, stored, dim=-1).min().item()
        if cosine < VERIFY_COSINE:
            log.warning("model %s: the rebuilt content encoder does not reproduce its items (min cosine %.4f); "
                        "items it has not trained on wait for the next version", loaded.version, cosine)
            return None
    return encoder
