"""A published version loaded back from the registry, every file's sha256 verified (store.registry),
ready to score: ``interests`` of histories and ``topk`` over its items. Any kind of model the
trainer publishes (HyMiRec, SASRec, popularity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from model import artifact
from model.catalogue import Catalogue, pad_left
from model.item_encoder import encode_content, encoder_from_recipe
from model.retrieval import TopK, topk_items
from store.registry import ModelRegistry


@dataclass
class LoadedModel:
    """A published version, ready to score: ``interests`` of histories and ``topk`` over items."""

    version: str
    manifest: dict
    catalogue: Catalogue
    module: torch.nn.Module  # HyMiRec or SASRec, eval mode
    _encoder: object = None  # the frozen content encoder, built on first use

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def codebook(self):
        """The CSRC codebook (HyMiRec with use_codebook), else None."""
        return getattr(self.module.items, "codebook", None) if self.kind == "hymirec" else None

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """[N+1, D] (row 0 = padding)."""
        return self.module.item_vectors().float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Items the model has not seen, by text → (vectors [n, D] from content alone: there is no
        ID embedding for them yet, codes [n, L], scales [n, L] of those vectors); codes/scales are
        None without a codebook. HyMiRec only."""
        if self.kind != "hymirec":
            raise HymirecError(f"model {self.version} ({self.manifest['model']}) has no content encoder")
        if self._encoder is None:
            self._encoder = encoder_from_recipe(self.manifest["item_encoder"], self.catalogue.texts)
        content = self.module.items.standardise(encode_content(self._encoder, texts))
        vectors = self.module.items.content_vectors(content)
        if self.codebook is None:
            return vectors, None, None
        codes, scales = self.codebook.encode(vectors)
        return vectors, codes, scales

    def indices(self, item_ids: list[str]) -> np.ndarray:
        """Item ids → indices; unknown ids are dropped (a newer item the model has not seen)."""
        return np.array([self.catalogue.index[i] for i in item_ids if i in self.catalogue.index], dtype=np.int64)

    @torch.no_grad()
    def interests(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Histories as item-index arrays (oldest first) → [B, K, D]."""
        if self.kind == "hymirec":
            length = self.module.config.history_len
        else:
            length = self.module.config.max_len
        longest = max(1, min(length, max(len(h) for h in histories)))
        seq = torch.as_tensor(pad_left(histories, longest))
        if self.kind == "hymirec":
            return self.module(seq)
        return self.module.user_vectors(seq)

    @torch.no_grad()
    def topk(self, histories: list[np.ndarray], k: int = 10, exclude_seen: bool = True) -> TopK:
        """Top-k item *indices* per history (items = index; 0 never returned)."""
        vectors = self.item_vectors()[1:]
        exclude = [torch.as_tensor(np.unique(h) - 1) for h in histories] if exclude_seen else None
        top = topk_items(self.interests(histories), vectors, k, exclude)
        return TopK(top.scores, torch.where(top.items >= 0, top.items + 1, top.items), top.interest)


def load_version(settings: Settings, version: str | None = None) -> LoadedModel:
    """The given (default: latest) registry version as a ready model; every file sha256-verified."""
    registry = ModelRegistry(settings)
    if version is None:
        latest = registry.latest()
        if latest is None:
            raise HymirecError(f"no published model in {settings.lancedb_uri}; run `hymirec train` first")
        version = latest.version
    manifest, files = registry.load(version)
    module, items = artifact.from_files(version, manifest, files)
    return LoadedModel(version, manifest, Catalogue(**items), module)
