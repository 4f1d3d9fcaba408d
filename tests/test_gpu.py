"""HyMiRec on a CUDA device: the same weights give the same interests and losses as on the CPU,
the codebook fits there, and the offline trainer trains and ranks there end to end.

Skipped where torch sees no CUDA device (CI has none); bench/gpu.sh runs these on a lent GPU."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from hymirec.settings import Settings
from model.hymirec import cut_points
from test_model import N, histories, make_model
from model.catalogue import pad_left
from trainer.data import leave_one_out

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    # TF32 matmuls would differ from the CPU by ~1e-3: compare full float32 arithmetic.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("overrides", [{}, {"use_codebook": False}, {"use_coarse": False, "use_codebook": False}])
def test_same_weights_give_the_same_interests_and_losses_on_cuda(overrides):
    cpu = make_model(**overrides)
    gpu = copy.deepcopy(cpu).to(CUDA)
    seq = torch.as_tensor(pad_left(histories([30, 12, 3, 25]), 30))
    with torch.no_grad():
        assert torch.allclose(cpu(seq), gpu(seq.to(CUDA)).cpu(), atol=1e-4)
        if cpu.config.use_coarse:
            assert torch.allclose(cpu.coarse_user(seq), gpu.coarse_user(seq.to(CUDA)).cpu(), atol=1e-4)
    cuts = cut_points(seq, cpu.objective.cuts)  # drawn once: both devices see the same cut points
    loss_cpu, _ = cpu.loss(seq, cuts)
    loss_gpu, _ = gpu.loss(seq.to(CUDA), cuts.to(CUDA))
    assert loss_gpu.device.type == "cuda" and torch.isfinite(loss_gpu)
    assert abs(loss_cpu.item() - loss_gpu.item()) < 1e-3 * max(1.0, abs(loss_cpu.item()))
    loss_gpu.backward()
    grads = [p.grad for p in gpu.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device.type == "cuda" and torch.isfinite(g).all() for g in grads)


def test_negatives_drawn_by_popularity_stay_on_cuda_and_train():
    from model.losses import draw_negatives

    counts = torch.arange(N + 1, dtype=torch.float32)
    moved = make_model(negatives=10, negatives_popular=0.9)
    moved.set_item_counts(counts)
    assert moved.to(CUDA).negative_probs.device.type == "cuda"  # the buffer travels with the model
    gpu = make_model(negatives=10, negatives_popular=0.9).to(CUDA)
    gpu.set_item_counts(counts)  # after the move, as HyMiRecModel.fit does
    assert gpu.negative_probs.device.type == "cuda"
    neg = draw_negatives(gpu.item_vectors(), 10, gpu.negative_probs)
    assert neg.ids.device.type == "cuda" and neg.log_weight.device.type == "cuda"
    assert len(neg.ids) <= 10 and torch.all(neg.log_weight >= 0)
    seq = torch.as_tensor(pad_left(histories([30, 12, 3, 25]), 30)).to(CUDA)
    phase1, _ = gpu.coarse_loss(seq)
    phase2, _ = gpu.loss(seq, cut_points(seq, gpu.objective.cuts))
    assert torch.isfinite(phase1) and torch.isfinite(phase2)
    (phase1 + phase2).backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_codebook_fits_on_cuda_as_well_as_on_the_cpu():
    cpu = make_model()
    gpu = copy.deepcopy(cpu).to(CUDA)
    quality_cpu = cpu.items.fit_codebook()
    quality_gpu = gpu.items.fit_codebook()
    assert gpu.items.codes.device.type == "cuda"
    assert gpu.items.history_table.device.type == "cuda"
    # k-means on another device may break ties differently: same quality, not necessarily same codes
    assert abs(quality_cpu["reconstruction_cosine"] - quality_gpu["reconstruction_cosine"]) < 0.02


def test_offline_trainer_trains_and_ranks_on_cuda():
    from trainer.evaluate import evaluate
    from trainer.recipes import RUNS, build

    rng = np.random.default_rng(0)
    users, items = 80, 40
    rows = [(f"u{u}", f"i{(u % 4) * 10 + rng.integers(10)}", t) for u in range(users) for t in range(12)]
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    catalogue = pd.DataFrame({"item_id": [f"i{i}" for i in range(items)], "text": [f"item {i}" for i in range(items)],
                              "category": [f"c{i // 10}" for i in range(items)]})
    split = leave_one_out(log, catalogue)
    settings = Settings(embedding_dim=16, codebook_levels=2, codebook_size=8, history_max_len=20, recent_len=4)
    torch.manual_seed(0)
    model = build(RUNS["hymirec"], split.catalogue, settings, CUDA, "tiny", "tiny", 6, torch.randn(items + 1, 16))
    report = model.fit(split.train, split.valid, progress=False)
    assert all(p.device.type == "cuda" for p in model.model.parameters())
    assert report.epochs > 0 and np.isfinite(report.final_loss)
    metrics = evaluate(model, split.test)
    # Each user keeps to one block of 10 items: a model that learned anything beats chance (10/40).
    assert metrics["recall@10"] > 0.25
