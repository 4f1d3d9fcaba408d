"""The training loop every offline model shares: AdamW, warm-up then cosine decay (or a constant lr),
gradient clipping, an optional moving average of the weights, early stopping on validation Recall@10."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm


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


def lr_schedule(cfg: FitConfig, total_steps: int):
    """Step → lr factor (torch LambdaLR) over ``total_steps``."""
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, cfg.epochs * len(first)))
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
