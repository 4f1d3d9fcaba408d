"""HyMiRec: a lightweight coarse branch over the long history + an LLM refined branch (DESIGN §2).
(One file for the whole model, as nanoGPT's model.py: its modules are read together, top to bottom.)

    item i ─► content_i (frozen item-encoder embedding, standardised)
           ─► item vector e_i = proj(content_i) + id_i ─────────────► scoring table, recent inputs
                     │ (after training phase 1: frozen into CSRC codes, a few bytes per item)
                     ▼
    long history ─► codes ─► decoded ê_i ─► CoarseBranch: causal transformer over ≤ 1,000 items
                                            → last state + M attention-pooled coarse interests
                                                          │
    RefinedBranch (user LLM, inputs_embeds): [coarse ; recent N exact e's ; K query tokens]
        → outputs at the K query positions → head (+ skip from the coarse state)
        → L2-normalised interests [B, K, D]

An item's score for a user is the max cosine over the K interests. The coarse branch reads only what
a stored history holds: each item's CSRC codes (plus quantised scales), decoded. The recent items
are read exactly (their ids are kept, DESIGN §1).

Training runs in two phases (trainer.models.HyMiRecModel drives them):
1. ``coarse_loss``: the item table and the coarse branch learn next-item prediction at (up to 200
   random) positions of every user's long history, SASRec's objective, over the exact item
   vectors; with K > 1 its first K coarse interests (last state + K-1 pooled) also learn the next
   W items at C random cut points with DMIL plus an InfoNCE of the next item on the max-over-K
   score (``_multi_interest_loss``), so phase 1 already yields K distinct interests that rank
   together. Then ``ItemTable.fit_codebook`` freezes the item vectors into codes and the coarse
   branch adapts briefly to reading their reconstruction.
2. ``loss``: with the item table and coarse branch frozen, the refined branch learns, at C random
   cut points per user, the same multi-interest loss (DMIL + max-over-K). Refined interest k starts
   as an identity map of coarse interest k (see ``RefinedBranch``), so it refines a trained
   multi-interest model. (Starting all K from the last state left them copies of each other:
   the matching had nothing to pair, docs/offline_results.md.)

The architecture (``HyMiRecConfig``, stored with a version) is apart from the training objective
(``HyMiRecObjective``: loss weights, targets, cut points, negatives). Flags for the ablations:
``num_interests=1``; ``use_codebook=False`` (the coarse branch reads the exact item vectors);
``use_coarse=False`` (= the "multi" baseline: HLLM-like user LLM over the recent items + K queries,
trained in one phase); the objective's ``disentangle_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbone import Backbone, load_backbone
from model.codebook import CodebookConfig, ResidualCodebook
from model.losses import LogitScale, Negatives, dmil_loss, draw_negatives, negative_distribution, sampled_softmax_loss
from model.sasrec import CausalBlock, causal_mask


@dataclass
class HyMiRecConfig:
    """The architecture: what a published version is (its manifest's ``config``)."""

    num_items: int  # N; item indices 1..N, 0 is padding
    content_dim: int  # width of the frozen content embeddings
    dim: int = 64  # item / interest width
    use_id_embedding: bool = True  # learned ID embedding added to exact item vectors
    # coarse branch over the long history
    use_coarse: bool = True
    use_codebook: bool = True
    history_len: int = 1000
    coarse_layers: int = 2
    coarse_heads: int = 1
    coarse_interests: int = 3  # M attention-pooled interests (plus the last state); M + 1 >= K
    dropout: float = 0.3  # coarse branch; with phase 1's weight average (trainer.models.COARSE_FIT), session 9
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    # refined branch
    user_backbone: str = "tiny"
    user_hidden: int = 64  # width of a tiny user backbone
    recent_len: int = 50  # N recent items, read exactly
    num_interests: int = 4  # K

    def __post_init__(self) -> None:
        if self.use_coarse and self.coarse_interests + 1 < self.num_interests:
            raise ValueError(f"coarse_interests + 1 ({self.coarse_interests + 1}) must be at least num_interests "
                             f"({self.num_interests}): refined interest k starts from coarse interest k")

    @classmethod
    def from_dict(cls, d: dict) -> HyMiRecConfig:
        """From a manifest's ``config``; versions published before the objective had its own
        dataclass carry its fields there too, which are not the architecture's and are left out."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["codebook"] = CodebookConfig(**d["codebook"])
        return cls(**d)


@dataclass
class HyMiRecObjective:
    """How a HyMiRec is trained: the losses and their negatives (not stored with a version; a
    fine-tune takes today's)."""

    coarse_dmil_weight: float = 1.0  # phase 1: the multi-interest loss on the coarse interests (K > 1)
    # Phase 1: DMIL pairs the target groups with the M pooled interests only; the last state learns
    # next-item prediction and the max-over-K term, as at K = 1 (docs/offline_results.md, session 6).
    coarse_dmil_pooled_only: bool = False
    targets: int = 16  # W: next items each cut point predicts (k-means needs > K of them to find groups)
    cuts: int = 8  # C cut points per user per step
    coarse_positions: int = 200  # phase 1: next-item loss at up to this many positions per user per step
    retrieval_weight: float = 1.0  # max-over-K InfoNCE of the next item beside DMIL (losses.sampled_softmax_loss over K)
    refined_dmil_weight: float = 1.0  # phase 2: DMIL's weight beside the max-over-K next-item term
    disentangle_weight: float = 0.0
    fn_threshold: float = 0.99
    negatives: int = 0  # per step (losses.draw_negatives); 0 = every item (full softmax)
    negatives_popular: float = 0.0  # share of the draw in proportion to popularity (set_item_counts); 0 = uniform


class ItemTable(nn.Module):
    """Item vectors e [N+1, D] = proj(content) + ID embedding (row 0 = padding = 0), and the
    coarse branch's inputs from codes.

    content: frozen [N+1, C] (row 0 and items without text = 0; those rely on their ID embedding).
    It is stored standardised per dimension: LLM hidden states share one dominant direction (mean
    pairwise cosine ≈ 0.96 for SmolLM2), which would make the codebook's reconstruction cosine
    meaningless and drown the differences between items. ``standardise`` applies the same shift and
    scale to items added later.
    """

    def __init__(self, config: HyMiRecConfig, content: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        N, D = config.num_items, config.dim
        content = content.float()
        present = content.abs().sum(-1) > 0
        rows = content[present] if present.any() else torch.zeros(1, content.size(1))
        self.register_buffer("content_shift", rows.mean(0))
        self.register_buffer("content_scale", rows.std(0, unbiased=False).clamp(min=1e-6) if len(rows) > 1
                             else torch.ones(content.size(1)))
        self.register_buffer("has_content", present.float()[:, None])
        self.register_buffer("content", self.standardise(content))
        self.content_norm = nn.LayerNorm(config.content_dim)
        self.proj = nn.Linear(config.content_dim, D)
        self.id_emb = nn.Embedding(N + 1, D, padding_idx=0) if config.use_id_embedding else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.02)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()
        self.codebook = ResidualCodebook(config.codebook, D) if config.use_codebook else None
        if self.codebook is not None:
            L = config.codebook.levels
            self.register_buffer("codes", torch.zeros(N + 1, L, dtype=torch.long))
            self.register_buffer("scales", torch.zeros(N + 1, L, dtype=torch.uint8))
            self.register_buffer("history_table", torch.zeros(N + 1, D))  # decoded codes, row 0 = 0

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw encoder outputs [..., C] → stored content; all-zero rows (no text) stay zero."""
        present = (raw.abs().sum(-1, keepdim=True) > 0).to(raw.dtype)
        return (raw - self.content_shift) / self.content_scale * present

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        """content [..., C] → [..., D]; zero content (no text / padding) stays zero."""
        present = (content.abs().sum(-1, keepdim=True) > 0).to(content.dtype)
        return self.proj(self.content_norm(content)) * present

    def vectors(self) -> torch.Tensor:
        """[N+1, D] exact item vectors (the scoring table and the refined branch's recent inputs)."""
        e = self.content_vectors(self.content)
        if self.id_emb is not None:
            e = e + self.id_emb.weight
        return e

    @property
    def codebook_ready(self) -> bool:
        return self.codebook is not None and bool(self.codebook.fitted)

    @torch.no_grad()
    def fit_codebook(self) -> dict:
        """Freeze the current item vectors into CSRC codes: fit the codebook on them, store every
        item's codes and their reconstruction, which the coarse branch reads from now on."""
        e = self.vectors().detach()
        self.codebook.fit(e[1:])
        codes, scales = self.codebook.encode(e)
        self.codes.copy_(codes)
        if scales is not None:
            self.scales.copy_(scales)
        self.history_table.copy_(self.codebook.decode(codes, scales))
        self.history_table[0].zero_()
        return {
            "bytes_per_item": self.codebook.bytes_per_item,
            "reconstruction_cosine": self.codebook.reconstruction_cosine(e[1:]),
        }

    def history_inputs(self, seq: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """seq [B, T] item indices (0 = pad) → coarse inputs [B, T, D]: the items' reconstruction
        from their codes once the codebook is fitted, else the exact vectors ``exact`` [N+1, D]."""
        return self.history_table[seq] if self.codebook_ready else exact[seq]


class CoarseBranch(nn.Module):
    """SASRec-style causal transformer over the long history plus M attention-pooling queries.

    forward: x [B, T, D], pad [B, T] → states [B, T, D] (state t summarises items ≤ t).
    interests: states, pad, ends [B, C] (the last history position of each cut) → [B, C, M+1, D]:
    the state at ``end`` and M pooled vectors over states ≤ end.
    """

    def __init__(self, config: HyMiRecConfig) -> None:
        super().__init__()
        D, M = config.dim, config.coarse_interests
        self.config = config
        self.pos_emb = nn.Embedding(config.history_len, D)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(CausalBlock(D, config.coarse_heads, config.dropout) for _ in range(config.coarse_layers))
        self.ln_f = nn.LayerNorm(D)
        self.queries = nn.Parameter(torch.randn(M, D) * D**-0.5)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """On the CPU rows run in groups of similar length, each cut to its own longest: a random
        training batch mixes a few heavy users with many light ones, and padding every row to the
        heaviest cost most of the compute. A GPU's step is bound by kernel launches, not by padded
        FLOPs, so there the batch runs whole (ml-100k phase 1 on an H100: 42-46 ms a step against
        67-73 ms grouped). Left padding is invisible to a row (tests), so nothing else changes."""
        groups = length_groups((~pad).sum(1), spread=2.0 if x.device.type == "cpu" else math.inf)
        if len(groups) == 1:
            return self._run(x[:, -groups[0][1] :], pad[:, -groups[0][1] :], x.size(1))
        rows = torch.cat([r for r, _ in groups])
        out = torch.cat([self._run(x[r, -n:], pad[r, -n:], x.size(1)) for r, n in groups])
        return out[rows.argsort()]

    def _run(self, x: torch.Tensor, pad: torch.Tensor, width: int) -> torch.Tensor:
        """x [b, n, D], pad [b, n] → states [b, width, D], left-padded with zeros to ``width``."""
        T = x.size(1)
        # Positions count back from the newest item, so the same item gets the same position
        # whatever the padded length of its batch.
        pos = torch.arange(T - 1, -1, -1, device=x.device).clamp(max=self.config.history_len - 1)
        x = self.drop(x + self.pos_emb(pos)).masked_fill(pad.unsqueeze(-1), 0.0)
        mask = causal_mask(pad, self.config.coarse_heads)
        for block in self.blocks:
            x = block(x, mask)
        return F.pad(self.ln_f(x).masked_fill(pad.unsqueeze(-1), 0.0), (0, 0, width - T, 0))

    def interests(self, states: torch.Tensor, pad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        B, T, D = states.shape
        last = states.gather(1, ends[..., None].expand(-1, -1, D))  # [B, C, D]
        scores = torch.einsum("md,btd->bmt", self.queries, self.key(states)) / D**0.5  # [B, M, T]
        t = torch.arange(T, device=states.device)
        blocked = (t[None, None, :] > ends[..., None]) | pad[:, None, :]  # [B, C, T]
        scores = scores[:, None].masked_fill(blocked[:, :, None], -math.inf)  # [B, C, M, T]
        pooled = torch.einsum("bcmt,btd->bcmd", scores.softmax(-1), self.value(states))
        return torch.cat([last[:, :, None], pooled], dim=2)


class RefinedBranch(nn.Module):
    """The user LLM over ``[coarse ; recent ; K queries]`` as inputs_embeds.

    coarse [B, M', D] or None, recent [B, N, D], recent_pad [B, N] bool → interests [B, K, D],
    L2-normalised. Padding may sit anywhere; position ids count real tokens only, and padded keys
    are masked, so padded slots do not change the outputs. Interest k also gets a learned map of
    coarse interest k (a skip path; coarse[:, 0] is the last state), so the LLM learns a refinement
    of the coarse branch's K interests.
    """

    def __init__(self, config: HyMiRecConfig, backbone: Backbone) -> None:
        super().__init__()
        H, D, K = backbone.hidden, config.dim, config.num_interests
        self.llm = backbone.decoder
        self.inp = nn.Linear(D, H)
        self.segment = nn.Parameter(torch.zeros(3, H))  # coarse / recent / query
        self.queries = nn.Parameter(torch.randn(K, H) * 0.02)
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, D))
        self.skip = nn.Linear(D, D) if config.use_coarse else None
        if self.skip is not None:
            # Start as the coarse branch's K interests (identity skip, silent LLM head): after the
            # coarse phase, training refines a good recommender instead of a random one.
            with torch.no_grad():
                self.skip.weight.copy_(torch.eye(D))
                self.skip.bias.zero_()
                self.head[-1].weight.zero_()
                self.head[-1].bias.zero_()

    def forward(self, coarse: torch.Tensor | None, recent: torch.Tensor, recent_pad: torch.Tensor) -> torch.Tensor:
        B = recent.size(0)
        K = self.queries.size(0)
        parts = [self.inp(recent) + self.segment[1]]
        masks = [~recent_pad]
        if coarse is not None:
            parts.insert(0, self.inp(coarse) + self.segment[0])
            masks.insert(0, torch.ones(coarse.shape[:2], dtype=torch.bool, device=recent.device))
        parts.append((self.queries + self.segment[2]).expand(B, -1, -1))
        masks.append(torch.ones(B, K, dtype=torch.bool, device=recent.device))
        x = torch.cat(parts, dim=1)
        mask = torch.cat(masks, dim=1).long()
        x = x * mask[..., None]  # padded slots hold zeros, so nothing leaks even if unmasked
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        dtype = next(self.llm.parameters()).dtype
        out = self.llm(inputs_embeds=x.to(dtype), attention_mask=mask, position_ids=positions).last_hidden_state
        interests = self.head(out[:, -K:].float())
        if self.skip is not None:
            interests = interests + self.skip(coarse[:, :K])
        return F.normalize(interests, dim=-1)


def window(seq: torch.Tensor, ends: torch.Tensor, size: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items seq[b, end + offset - size + 1 ... end + offset] for every cut.

    seq [B, T], ends [B, C] → (items [B, C, size], pad [B, C, size]); outside the sequence = pad.
    """
    T = seq.size(1)
    idx = ends[..., None] + offset - size + 1 + torch.arange(size, device=seq.device)
    inside = (idx >= 0) & (idx < T)
    items = seq[:, None, :].expand(-1, ends.size(1), -1).gather(2, idx.clamp(0, T - 1))
    items = items.masked_fill(~inside, 0)
    return items, items == 0


def length_groups(lengths: torch.Tensor, spread: float = 2.0) -> list[tuple[torch.Tensor, int]]:
    """Rows by length [B] → [(row indices, their longest length)], longest first; within a group
    the longest is at most ``spread`` × the shortest, so padding wastes less than half of a group."""
    order = lengths.argsort(descending=True)
    sizes = lengths[order].clamp(min=1).tolist()
    groups, start = [], 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] * spread < sizes[start]:
            groups.append((order[start:i], int(sizes[start])))
            start = i
    return groups


def cut_points(seq: torch.Tensor, cuts: int) -> torch.Tensor:
    """Random cut ends [B, cuts] in left-padded seq [B, T]: each has at least one history item
    before it (itself) and one target after it."""
    B, T = seq.shape
    lengths = (seq != 0).sum(1)
    span = (lengths - 1).clamp(min=1)
    return (T - lengths)[:, None] + (torch.rand(B, cuts, device=seq.device) * span[:, None]).long()


class HyMiRec(nn.Module):
    def __init__(self, config: HyMiRecConfig, content: torch.Tensor, user_backbone: Backbone | None = None,
                 objective: HyMiRecObjective | None = None) -> None:
        super().__init__()
        self.config = config
        self.objective = objective or HyMiRecObjective()
        self.items = ItemTable(config, content)
        self.coarse = CoarseBranch(config) if config.use_coarse else None
        backbone = user_backbone or load_backbone(config.user_backbone, hidden=config.user_hidden)
        self.refined = RefinedBranch(config, backbone)
        self.scale = LogitScale()
        self.register_buffer("negative_probs", None, persistent=False)

    def set_item_counts(self, counts: torch.Tensor) -> None:
        """counts [N+1] training interactions per item: sampled negatives are then drawn partly in
        proportion to them (``objective.negatives_popular``)."""
        self.negative_probs = negative_distribution(counts, self.objective.negatives_popular, self.scale.log_scale.device)

    def item_vectors(self) -> torch.Tensor:
        """[N+1, D] scoring table (row 0 = padding)."""
        return self.items.vectors()

    def freeze_coarse(self) -> None:
        """After phase 1: the item table and the coarse branch stay as they are; phase 2 trains the
        refined branch on top of them (and skips their backward pass)."""
        for module in (self.items, self.coarse):
            module.requires_grad_(False)

    @property
    def coarse_frozen(self) -> bool:
        return self.coarse is not None and not any(p.requires_grad for p in self.coarse.parameters())

    def _interests_at(self, seq: torch.Tensor, ends: torch.Tensor, exact: torch.Tensor,
                      history: torch.Tensor | None = None) -> torch.Tensor:
        """seq [B, T] left-padded, ends [B, C] → interests [B, C, K, D]; ``history`` [B, T, D]: the
        coarse branch's inputs as stored (decoded codes), else looked up from the item table."""
        B, C = ends.shape
        # No window is longer than the sequences: slots before their start would only be padding,
        # which changes no output but costs the LLM as much as an item (most users are short).
        recent, recent_pad = window(seq, ends, min(self.config.recent_len, seq.size(1)), 0)
        coarse = None
        if self.coarse is not None:
            pad = seq == 0
            inputs = self.items.history_inputs(seq, exact) if history is None else history.masked_fill(pad.unsqueeze(-1), 0.0)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.coarse_frozen):
                states = self.coarse(inputs, pad)
                coarse = self.coarse.interests(states, pad, ends).flatten(0, 1)
        recent_vecs = exact[recent.flatten(0, 1)]
        interests = self.refined(coarse, recent_vecs, recent_pad.flatten(0, 1))
        return interests.view(B, C, *interests.shape[1:])

    def forward(self, seq: torch.Tensor, history: torch.Tensor | None = None,
                item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """seq [B, T] left-padded histories (the whole history; the coarse branch reads its last
        ``history_len`` items, the refined branch the last ``recent_len``) → interests [B, K, D].
        ``history`` [B, T, D], aligned with seq: the coarse branch's inputs as the store keeps them
        (the users' history codes, decoded); without it they are the items' codes in the table.
        ``item_vectors`` [N+1, D]: ``item_vectors()`` as a caller that does not train holds it (a
        served version computes its table once, not once per batch of users)."""
        seq = seq[:, -self.config.history_len :]
        history = history[:, -self.config.history_len :] if history is not None else None
        ends = torch.full((seq.size(0), 1), seq.size(1) - 1, device=seq.device)
        exact = self.item_vectors() if item_vectors is None else item_vectors
        return self._interests_at(seq, ends, exact, history)[:, 0]

    @torch.no_grad()
    def coarse_user(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, T] left-padded → the coarse branch's first K interests [B, K, D], L2-normalised
        (what the coarse phase of training is validated on, and where the refined branch starts)."""
        seq = seq[:, -self.config.history_len :]
        pad = seq == 0
        states = self.coarse(self.items.history_inputs(seq, self.item_vectors()), pad)
        ends = torch.full((seq.size(0), 1), seq.size(1) - 1, device=seq.device)
        coarse = self.coarse.interests(states, pad, ends)[:, 0, : self.config.num_interests]
        return F.normalize(coarse, dim=-1)

    def _negatives(self, exact: torch.Tensor) -> Negatives:
        """Every item, or ``objective.negatives`` drawn ones (the positive itself is masked by id)."""
        return draw_negatives(exact, self.objective.negatives, self.negative_probs)

    def _next_item_loss(self, seq: torch.Tensor, states: torch.Tensor, exact: torch.Tensor, neg: Negatives,
                        positions: int) -> torch.Tensor:
        """SASRec's objective on the coarse states: state t predicts item t+1, at up to ``positions``
        random positions per user (0 = all). The same number per user, so heavy users do not
        dominate the loss (SASRec caps each user at its window for the same reason)."""
        nxt = F.pad(seq[:, 1:], (0, 1))
        valid = (seq != 0) & (nxt != 0)
        if positions and seq.size(1) > positions:
            noise = torch.rand(seq.shape, device=seq.device).masked_fill(~valid, -1.0)
            keep = noise.topk(positions, dim=1).indices
            valid = valid & torch.zeros_like(valid).scatter_(1, keep, True)
        return sampled_softmax_loss(
            states[valid], exact[nxt[valid]], neg.vectors, self.scale(), positive_ids=nxt[valid],
            negative_ids=neg.ids, fn_threshold=self.objective.fn_threshold, negative_log_weight=neg.log_weight,
        )

    def _multi_interest_loss(self, interests: torch.Tensor, seq: torch.Tensor, ends: torch.Tensor, exact: torch.Tensor,
                             neg: Negatives, matched_from: int = 0,
                             dmil_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Interests [B, C, K, D] at cut ends [B, C] of seq: (``dmil_weight``) DMIL of
        interests[:, :, matched_from:] against the next W items, plus (``retrieval_weight``) InfoNCE
        of the next item on the max-over-K retrieval score of all K; both against the step's ``neg``."""
        cfg = self.objective
        targets, target_pad = window(seq, ends, cfg.targets, cfg.targets)
        loss, stats = interests.new_zeros(()), {}
        if dmil_weight > 0:
            dmil, stats = dmil_loss(
                interests[:, :, matched_from:].flatten(0, 1),
                exact[targets.flatten(0, 1)],
                ~target_pad.flatten(0, 1),
                neg.vectors,
                self.scale(),
                target_ids=targets.flatten(0, 1),
                negative_ids=neg.ids,
                disentangle_weight=cfg.disentangle_weight,
                fn_threshold=cfg.fn_threshold,
                negative_log_weight=neg.log_weight,
            )
            loss = dmil_weight * dmil
        if cfg.retrieval_weight > 0:
            nxt = targets[..., 0].flatten()
            retrieval = sampled_softmax_loss(interests.flatten(0, 1), exact[nxt], neg.vectors, self.scale(), mask=nxt != 0,
                                             positive_ids=nxt, negative_ids=neg.ids, fn_threshold=cfg.fn_threshold,
                                             negative_log_weight=neg.log_weight)
            loss = loss + cfg.retrieval_weight * retrieval
            stats["retrieval"] = retrieval.item()
        return loss, stats

    def coarse_loss(self, seq: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training phase 1: the item table and coarse branch alone: next-item prediction on the
        states, plus (K > 1) DMIL on the first K coarse interests at random cut points.
        seq [B, T] left-padded training sequences → (loss, stats)."""
        cfg, K = self.objective, self.config.num_interests
        exact = self.item_vectors()
        pad = seq == 0
        states = self.coarse(self.items.history_inputs(seq, exact), pad)
        neg = self._negatives(exact)  # one draw a step, shared by both terms
        loss = self._next_item_loss(seq, states, exact, neg, cfg.coarse_positions)
        stats = {"aux": loss.item()}
        if K > 1 and cfg.coarse_dmil_weight > 0:
            ends = cut_points(seq, cfg.cuts)
            interests = self.coarse.interests(states, pad, ends)[:, :, :K]
            multi, multi_stats = self._multi_interest_loss(interests, seq, ends, exact, neg,
                                                           matched_from=int(cfg.coarse_dmil_pooled_only))
            loss = loss + cfg.coarse_dmil_weight * multi
            stats.update(multi=multi.item(), matched_cos=multi_stats["matched_cos"])
        stats["scale"] = self.scale().item()
        return loss, stats

    def loss(self, seq: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training phase 2 (or the only phase without a coarse branch): DMIL at the cut points.
        seq [B, T] left-padded training sequences, ends [B, C] cut positions (each with at least one
        history item before and one target after) → (loss, stats)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.coarse_frozen):
            exact = self.item_vectors()
        interests = self._interests_at(seq, ends, exact)
        loss, stats = self._multi_interest_loss(interests, seq, ends, exact, self._negatives(exact),
                                                dmil_weight=self.objective.refined_dmil_weight)
        stats["scale"] = self.scale().item()
        return loss, stats
