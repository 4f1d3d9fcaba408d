"""A model version as the retrieval side sees it: what it makes of items and histories.

``ServingModel`` is what the worker needs of a loaded version; the trainer's models have more
(fine-tuning, publishing) and satisfy this protocol too. ``ItemIndex`` is the live version's item
codes, handed to the ingest agent as its encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from hymirec.settings import Settings


@dataclass
class EncodedItems:
    """What a model makes of catalogue rows: vectors [n, D] float32 and packed CSRC codes (None
    without a codebook) of the rows it could embed, ``item_ids`` naming them in order."""

    item_ids: list[str]
    vectors: np.ndarray
    codes: list[bytes | None]


class ServingModel(Protocol):
    """A loaded model version: exactly what the worker and the online trainer need of it.

    ``item_encoder_id`` / ``codebook_id`` fingerprint the item-vector function and the codebook: a
    version with both equal to the live one's reuses its item vectors and codes.
    """

    version: str
    parent: str | None
    manifest: dict
    item_encoder_id: str
    codebook_id: str | None

    def encode_items(self, items: pd.DataFrame) -> EncodedItems:
        """Catalogue rows (item_id, text, category) → their vectors and codes. Items the model did not
        train on are embedded from their text (and become known to ``interests``); an item it can
        embed neither way is left out of the result."""

    def interests(self, histories: Sequence[Sequence[str]], codes: Sequence[bytes | None] | None = None) -> np.ndarray:
        """Users' item-id histories (oldest first; unknown ids ignored) → unit interests [B, K, D].

        ``codes[i]``, where given, is user i's stored history: the packed CSRC codes aligned with
        ``histories[i]``, encoded with this model's codebook. The coarse branch then reads their
        reconstruction (what the store keeps); the refined branch reads the exact vectors of the
        recent ids either way."""


LoadModel = Callable[[Settings, str], ServingModel]  # raises CorruptArtifact on any bad byte


class ItemIndex:
    """The live version's item codes by id: the ingest agent's ``Encoder`` (``stream.ingest.Encoder``).

    ``version`` is the model version, so a history row says which version's codebook encoded it
    (the ingest agent re-encodes a row of another version on the user's next event).
    """

    def __init__(self, version: str, has_codebook: bool):
        self.version = version
        self._codes: dict[str, bytes] = {}
        self._has_codebook = has_codebook

    def add(self, item_ids: Iterable[str], codes: Iterable[bytes | None]) -> None:
        # Assignment of whole entries only: the ingest thread reads this dict concurrently.
        for item_id, code in zip(item_ids, codes):
            if code is not None:
                self._codes[item_id] = code

    def codes_for(self, item_ids: Sequence[str]) -> dict[str, bytes] | None:
        if not self._has_codebook:
            return None
        return {i: self._codes[i] for i in item_ids if i in self._codes}

    def __len__(self) -> int:
        return len(self._codes)


