"""HLLM-style item encoder: instruction + item text + a learnable ``[ITEM]`` token → causal LM →
the last-layer hidden state at ``[ITEM]`` → a linear projection = the item's content embedding.

The ``[ITEM]`` token is an extra input embedding (not a vocabulary entry), so any backbone works
unchanged. Batches may come padded on either side: rows are repacked to left padding, ``[ITEM]`` is
appended after the last real token, and position ids count real tokens only, so a row's embedding
does not depend on what else is in its batch.

HyMiRec trains this encoder first, then freezes it and stores every item's embedding
(``encode_all``, cached on disk by ``cached_item_embeddings``).

With ``word_buckets`` > 0 the embedding also carries the text's words, hashed into that many buckets
(``hashed_words``). A tiny backbone is random: its [ITEM] state keeps little of which words an item
has (on the synthetic log only 33 % of an item's 10 nearest items shared its topic), while the
model's learnt projection of the hashed words is a learnt word embedding — items that share words
(a topic's vocabulary, a genre) get close vectors, and so does an item released after training.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from model.backbone import Backbone, load_backbone

log = logging.getLogger(__name__)

INSTRUCTION = "Compress the following item into one embedding: "
WORD = re.compile(r"\w+")


def hashed_words(texts: list[str], buckets: int) -> torch.Tensor:
    """texts → [B, buckets]: each lower-cased word adds 1/sqrt(words in the text) to bucket
    crc32(word) % buckets (crc32, not ``hash``: the same in every process, so a version's stored
    content can be reproduced)."""
    out = torch.zeros(len(texts), buckets)
    for row, text in enumerate(texts):
        words = WORD.findall(text.lower())
        for word in words:
            out[row, zlib.crc32(word.encode("utf-8")) % buckets] += len(words) ** -0.5
    return out


class ItemEncoder(nn.Module):
    """texts (list of B strings) → content embeddings [B, dim + word_buckets]."""

    def __init__(self, backbone: Backbone, dim: int | None, instruction: str = INSTRUCTION, max_tokens: int = 64,
                 word_buckets: int = 0) -> None:
        """``dim`` None: no projection (a frozen encoder's raw [ITEM] states, projected downstream);
        ``word_buckets``: width of the hashed words appended to the embedding (0: none)."""
        super().__init__()
        self.llm = backbone.decoder
        self.tokenizer = backbone.tokenizer
        self.instruction = instruction
        self.max_tokens = max_tokens
        table = self.llm.get_input_embeddings().weight
        eos = getattr(self.tokenizer, "eos_token_id", None)
        # A pretrained LM reads an end-of-text embedding naturally; it is a deterministic start
        # (so frozen embeddings can be cached) that training then moves.
        start = table[eos].detach().clone() if eos is not None else torch.randn(table.size(1)) * 0.02
        self.item_token = nn.Parameter(start.float())
        self.word_buckets = word_buckets
        self.out_dim = (dim or backbone.hidden) + word_buckets
        self.proj = nn.Linear(backbone.hidden, dim) if dim else nn.Identity()

    def freeze_llm(self) -> ItemEncoder:
        for p in self.llm.parameters():
            p.requires_grad_(False)
        return self

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            [self.instruction + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def hidden_at_item(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] (padding on either side) → [ITEM] hidden states [B, H]."""
        device = self.item_token.device
        # Stable sort on the mask moves padding to the left and keeps the real tokens in order.
        order = torch.argsort(attention_mask, dim=1, stable=True)
        ids = input_ids.gather(1, order).to(device)
        mask = attention_mask.gather(1, order).to(device)
        emb = self.llm.get_input_embeddings()(ids)
        B = ids.size(0)
        emb = torch.cat([emb, self.item_token.to(emb.dtype).expand(B, 1, -1)], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state[:, -1]

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        states = self.proj(self.hidden_at_item(ids, mask).float())
        if not self.word_buckets:
            return states
        return torch.cat([states, hashed_words(texts, self.word_buckets).to(states.device)], dim=1)

    @torch.no_grad()
    def encode_all(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Embeddings of every text, [N, dim] float32, in eval mode; shortest texts batched together."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.out_dim)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="encode items", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            out[idx] = self([texts[i] for i in idx]).float().cpu()
        self.train(was_training)
        return out


def frozen_encoder(backbone: str, texts: list[str], hidden: int, seed: int, word_buckets: int = 0) -> ItemEncoder:
    """The content encoder HyMiRec uses: ``backbone``'s raw [ITEM] states (plus ``word_buckets``
    hashed words), frozen. Deterministic given its arguments (a tiny backbone's tokenizer is trained
    on ``texts``), so a published model can rebuild it to embed items it has not seen."""
    bb = load_backbone(backbone, texts=texts, hidden=hidden, seed=seed)
    return ItemEncoder(bb, None, word_buckets=word_buckets).freeze_llm().eval()


def encoder_from_recipe(recipe: dict, texts: list[str]) -> ItemEncoder:
    """``frozen_encoder`` from a version's ``item_encoder`` recipe (versions from before word features
    have no ``word_buckets``: none)."""
    return frozen_encoder(recipe["backbone"], texts, recipe["hidden"], recipe["seed"], recipe.get("word_buckets", 0))


def embedding_cache_key(backbone_name: str, texts: list[str], extra: str = "") -> str:
    h = hashlib.sha256()
    for part in (backbone_name, INSTRUCTION, extra, *texts):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def cached_item_embeddings(
    cache_dir: Path, backbone_name: str, texts: list[str], compute, progress: bool = False
) -> torch.Tensor:
    """Frozen pretrained encoders give the same embeddings every run: compute once, keep on disk.

    ``compute()`` → [N, H] tensor, called on a cache miss. The key covers the backbone name, the
    instruction and every text, so a changed catalogue never reads stale vectors.
    """
    path = Path(cache_dir) / "item_embeddings" / f"{embedding_cache_key(backbone_name, texts)}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu")
        if cached.shape[0] == len(texts):
            return cached
    vectors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(vectors, tmp)
    tmp.replace(path)
    log.info("cached %d item embeddings at %s", len(texts), path)
    return vectors


def zero_textless(vectors: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """vectors [n, C] of ``texts`` → the same with the rows of items without text zeroed: such an
    item has no content, it relies on its ID embedding."""
    has_text = torch.as_tensor([bool(t.strip()) for t in texts], dtype=torch.bool)[:, None]
    return vectors * has_text


def encode_content(encoder: ItemEncoder, texts: list[str]) -> torch.Tensor:
    """Content rows [n, C] of ``texts`` (an item without text is 0), as HyMiRec stores them before
    standardising."""
    vectors = encoder.encode_all(texts) if texts else torch.zeros(0, encoder.out_dim)
    return zero_textless(vectors, texts)
