"""SASRec (Kang & McAuley 2018), as in pmixer/SASRec.pytorch: learned item + position embeddings,
causal pre-norm self-attention blocks with point-wise feed-forward, trained on every position.

The baseline HyMiRec is measured against; its defaults are the published ones (d=50, 2 blocks,
1 head, dropout 0.2, max length 50). Scores are dot products of the last hidden state with the
shared item embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    num_items: int  # N; item indices are 1..N, 0 is padding
    dim: int = 50
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50


class PointWiseFeedForward(nn.Module):
    """[B, T, D] → [B, T, D]: two 1×1 convolutions (= linear layers) with ReLU, as in SASRec."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.relu(self.fc1(x)))))


class CausalBlock(nn.Module):
    """Pre-norm self-attention + feed-forward. x [B, T, D]; mask [B·heads, T, T] bool (True = blocked)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = PointWiseFeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


def causal_mask(pad: torch.Tensor, heads: int) -> torch.Tensor:
    """pad [B, T] bool (True = padding) → [B·heads, T, T] bool attention mask (True = blocked).

    Causal, and padded keys are blocked so outputs do not depend on what padding holds; the
    diagonal stays open so an all-padding row does not produce NaNs.
    """
    T = pad.size(1)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=pad.device), diagonal=1)
    eye = torch.eye(T, dtype=torch.bool, device=pad.device)
    mask = future | (pad[:, None, :] & ~eye)
    return mask.repeat_interleave(heads, dim=0)


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.num_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(CausalBlock(config.dim, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=1e-8)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, T] item indices, left-padded with 0 (T ≤ max_len) → hidden states [B, T, D]."""
        T = seq.size(1)
        pad = seq == 0
        # sqrt(d) scaling of item embeddings as in the reference implementation.
        x = self.item_emb(seq) * self.config.dim**0.5
        # Positions count from the right so the newest item always has the same position id.
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=seq.device)
        x = self.drop(x + self.pos_emb(pos)).masked_fill(pad.unsqueeze(-1), 0.0)
        mask = causal_mask(pad, self.config.heads)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def item_vectors(self) -> torch.Tensor:
        """[N + 1, D] scoring table (row 0 = padding)."""
        return self.item_emb.weight

    def user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, T] → [B, 1, D]: the last position's state, as a one-interest 'user'."""
        return self.forward(seq)[:, -1:, :]
