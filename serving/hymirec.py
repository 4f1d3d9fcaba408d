"""A published HyMiRec version as the worker serves it (``serving.model.ServingModel``).

- **New items.** A published model knows the items it trained on (content rows, codes, ID
  embeddings). An item that arrives later is embedded from its text with the version's *content
  encoder* (the frozen item LLM), coded with its codebook, and appended to the model's item table
  without an ID embedding, so it can be retrieved and read in histories at once. Versions carry
  that encoder (tiny backbones: weights and tokenizer; pretrained ones: their name); for other
  versions it is rebuilt from the recipe and used only if it reproduces the stored content of a
  sample of items — otherwise new items wait for the next version.
- **Stored histories.** The coarse branch reads what the store keeps of a user: the packed codes of
  ``user_histories.history_codes``, decoded with this version's codebook; the refined branch reads
  the exact vectors of the recent items.
- **Fingerprints.** ``item_encoder_id`` hashes what item vectors are made of (content, projection,
  ID embeddings); ``codebook_id`` the codebook's centres and scale tables.

The trainer's ``trainer.serving_model.HyMiRecServing`` adds fine-tuning and publishing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from model import artifact
from model.catalogue import Catalogue, pad_left
from model.hymirec import length_groups
from model.item_encoder import ItemEncoder, encode_content, encoder_from_recipe
from serving.loader import LoadedModel, load_version
from serving.model import EncodedItems
from store.registry import ModelRegistry

log = logging.getLogger(__name__)

VERIFY_ITEMS = 16  # catalogue items re-encoded to check a rebuilt content encoder
VERIFY_COSINE = 0.999
INTERESTS_BATCH = 64
# Users × longest² per forward at most: the coarse branch's attention holds that many scores per head,
# and 64 users at 1,000 items were ~0.7 GB of the worker's peak.
INTERESTS_CELLS = 4_000_000


def digest(tensors: dict[str, torch.Tensor]) -> str:
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


# --- the served version -----------------------------------------------------------------------------
class ServedHyMiRec:
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
        self.item_encoder_id = "ie-" + digest({k: v for k, v in items.state_dict().items()
                                                if not k.startswith("codebook.") and k not in ("codes", "scales")})
        self.codebook_id = "cb-" + digest(items.codebook.state_dict()) if items.codebook is not None else None
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

    def _table(self) -> torch.Tensor:
        """The version's item vectors [N+1, D], computed once (again after items are added)."""
        if self._vectors is None:
            self._vectors = self.module.item_vectors()
        return self._vectors

    def _item_vectors(self) -> torch.Tensor:
        return self._table().float()

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
    def interests(self, histories: Sequence[Sequence[str]], codes: Sequence[bytes | None] | None = None) -> np.ndarray:
        """See ``ServingModel.interests``. A user's stored codes are read when they cover every id of
        the history (one block each) and the codebook is fitted; otherwise (no codes yet, an id this
        version does not know) the coarse branch reads the ids' codes from the model's item table."""
        index, cfg = self.catalogue.index, self.module.config
        codes = codes if codes is not None else [None] * len(histories)
        seqs = [np.array([index[i] for i in h if i in index], dtype=np.int64) for h in histories]
        out = np.zeros((len(histories), cfg.num_interests, cfg.dim), np.float32)
        # Batches of users of similar length: a batch costs what its longest history costs (the
        # coarse branch is quadratic in it), and one long history would make every short one pay;
        # the longer the histories, the fewer users per batch.
        for rows, longest in length_groups(torch.as_tensor([min(len(s), cfg.history_len) for s in seqs], dtype=torch.long)):
            step = max(1, min(INTERESTS_BATCH, INTERESTS_CELLS // longest**2))
            for start in range(0, len(rows), step):
                batch = rows[start : start + step].tolist()
                out[batch] = self._interests_of([histories[r] for r in batch], [seqs[r] for r in batch],
                                                [codes[r] for r in batch])
        return out

    def _interests_of(self, ids: Sequence[Sequence[str]], seqs: list[np.ndarray], blobs: Sequence[bytes | None]) -> np.ndarray:
        longest = max(1, min(self.module.config.history_len, max(len(s) for s in seqs)))
        seq = torch.as_tensor(pad_left(seqs, longest))
        tails = [self._stored_tail(h, s, blob, longest) for h, s, blob in zip(ids, seqs, blobs)]
        history = None
        if any(tail is not None for tail in tails):
            history = self.module.items.history_inputs(seq, self._item_vectors()).clone()
            # One decode for the whole batch: per user it was a third of the serving thread's time.
            book = self.module.items.codebook
            decoded = book.decode_history(b"".join(tail for tail in tails if tail is not None))  # [sum n, D]
            at = 0
            for row, tail in enumerate(tails):
                if tail is not None:
                    n = len(tail) // book.bytes_per_item
                    history[row, longest - n:] = decoded[at : at + n]
                    at += n
        return self.module(seq, history=history, item_vectors=self._table()).float().numpy()

    def _stored_tail(self, ids: Sequence[str], seq: np.ndarray, blob: bytes | None, longest: int) -> bytes | None:
        """The packed codes of the last ``longest`` items of a stored history, or None (not usable)."""
        book = self.module.items.codebook
        if blob is None or book is None or not self.module.items.codebook_ready or len(seq) != len(ids):
            return None
        if len(ids) == 0 or len(blob) != len(ids) * book.bytes_per_item:
            return None
        tail = min(longest, len(ids))
        return blob[(len(ids) - tail) * book.bytes_per_item :]

    @classmethod
    def load(cls, settings: Settings, version: str) -> ServedHyMiRec:
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
        return cls(loaded, settings, encoder, files, recipe)


def _verified_rebuild(loaded: LoadedModel, recipe: dict) -> ItemEncoder | None:
    """The content encoder rebuilt from its recipe, if it reproduces the stored content of a sample
    of items (a tiny tokenizer is trained on the catalogue's texts: they must be the same)."""
    try:
        encoder = encoder_from_recipe(recipe, loaded.catalogue.texts)
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
