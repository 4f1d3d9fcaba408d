"""HyMiRec modules on tiny sizes: shapes, padding invariance, [ITEM] position, ablation flags, and
that training lowers the loss."""

from __future__ import annotations

import math
from dataclasses import asdict, fields, replace

import pytest
import torch

from model.backbone import load_backbone
from model.codebook import CodebookConfig
from model.hymirec import HyMiRec, HyMiRecConfig, HyMiRecObjective, length_groups, window
from model.item_encoder import ItemEncoder
from model.sasrec import SASRec, SASRecConfig
from model.catalogue import pad_left

N, C, D = 40, 16, 32


def make_model(**overrides) -> HyMiRec:
    torch.manual_seed(0)
    config = HyMiRecConfig(
        num_items=N, content_dim=C, dim=D, history_len=30, recent_len=5, coarse_interests=3, num_interests=4,
        codebook=CodebookConfig(levels=2, size=8, kmeans_iters=5), dropout=0.0, user_hidden=32,
    )
    architecture = {f.name for f in fields(HyMiRecConfig)}
    config = replace(config, **{k: v for k, v in overrides.items() if k in architecture})
    objective = HyMiRecObjective(**{"targets": 3, "cuts": 2, **{k: v for k, v in overrides.items() if k not in architecture}})
    content = torch.cat([torch.zeros(1, C), torch.randn(N, C)])
    model = HyMiRec(config, content, objective=objective)
    # The LLM head starts silent (refined = coarse); give it weights so the tests see the LLM path.
    for p in model.refined.head[-1].parameters():
        torch.nn.init.normal_(p, std=0.1)
    if config.use_codebook:
        model.items.fit_codebook()
    return model.eval()


def histories(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, N + 1, (n,), generator=g).numpy() for n in lengths]


def test_branch_shapes_and_normalised_interests():
    model = make_model()
    seq = torch.as_tensor(pad_left(histories([12, 7, 20]), 20))
    pad = seq == 0
    states = model.coarse(model.items.history_inputs(seq, model.item_vectors()), pad)
    assert states.shape == (3, 20, D)
    ends = torch.tensor([[19, 10], [19, 15], [19, 5]])
    coarse = model.coarse.interests(states, pad, ends)
    assert coarse.shape == (3, 2, 1 + 3, D)  # last state + M pooled, per cut
    interests = model(seq)
    assert interests.shape == (3, 4, D)
    assert torch.allclose(interests.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    model.eval()  # (dropout off) a caller's table of item vectors gives what the model's own does
    with torch.no_grad():
        assert torch.equal(model(seq, item_vectors=model.item_vectors()), model(seq))


@pytest.mark.parametrize("overrides", [{}, {"use_codebook": False}, {"use_coarse": False, "use_codebook": False}])
def test_padding_does_not_change_outputs(overrides):
    model = make_model(**overrides)
    hs = histories([12, 7, 3])
    short = model(torch.as_tensor(pad_left(hs, 12)))
    long = model(torch.as_tensor(pad_left(hs, 25)))
    alone = torch.cat([model(torch.as_tensor(pad_left([h], len(h)))) for h in hs])
    assert torch.allclose(short, long, atol=1e-5)
    assert torch.allclose(short, alone, atol=1e-5)


def test_refined_branch_ignores_what_padded_slots_hold():
    model = make_model()
    coarse = torch.randn(2, 4, D)
    recent = torch.randn(2, 5, D)
    pad = torch.tensor([[True, True, False, False, False], [False, False, False, False, False]])
    garbage = recent.clone()
    garbage[pad] = 100.0
    with torch.no_grad():
        a = model.refined(coarse, recent, pad)
        b = model.refined(coarse, garbage, pad)
    assert torch.allclose(a, b, atol=1e-5)
    # ... while a real slot does change them
    changed = recent.clone()
    changed[0, 3] += 1.0
    with torch.no_grad():
        assert not torch.allclose(a[0], model.refined(coarse, changed, pad)[0], atol=1e-4)


def test_coarse_branch_is_causal():
    model = make_model()
    seq = torch.as_tensor(pad_left(histories([15]), 15))
    later = seq.clone()
    later[0, 10:] = torch.randint(1, N + 1, (5,))
    inputs = model.items.history_inputs
    with torch.no_grad():
        a = model.coarse(inputs(seq, model.item_vectors()), seq == 0)
        b = model.coarse(inputs(later, model.item_vectors()), later == 0)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-5)


def test_length_groups_partition_rows_of_similar_length():
    lengths = torch.tensor([3, 700, 40, 25, 1, 300, 41, 0])
    groups = length_groups(lengths)
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for r, longest in groups:
        assert longest == lengths[r].clamp(min=1).max()
        assert longest <= 2 * lengths[r].clamp(min=1).min()
    assert [n for _, n in groups] == [700, 300, 41, 3, 1]
    # the GPU path runs the batch whole
    whole = length_groups(lengths, spread=math.inf)
    assert [(r.tolist(), n) for r, n in whole] == [(lengths.argsort(descending=True).tolist(), 700)]


def test_coarse_branch_in_length_groups_matches_one_padded_batch():
    """Training and eval run the coarse branch in length groups; states and gradients must be those
    of the whole batch padded to its longest row."""
    model = make_model(history_len=60).train()
    seq = torch.as_tensor(pad_left(histories([50, 4, 13, 2, 26, 50]), 50))
    pad = seq == 0
    x = model.items.history_inputs(seq, model.item_vectors()).detach()
    assert len(length_groups((~pad).sum(1))) > 1
    grads = []
    for run in (lambda x: model.coarse(x, pad), lambda x: model.coarse._run(x, pad, x.size(1))):
        xi = x.clone().requires_grad_()
        states = run(xi)
        (states * torch.linspace(-1, 1, D)).sum().backward()
        grads.append((states.detach(), xi.grad, model.coarse.pos_emb.weight.grad.clone()))
        model.zero_grad()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_item_encoder_reads_the_item_token_under_any_padding():
    texts = ["a short one", "a much longer item text with many more words in it", "mid sized item text"]
    bb = load_backbone("tiny", texts=texts * 3, hidden=32)
    encoder = ItemEncoder(bb, 16).eval()
    with torch.no_grad():
        alone = torch.cat([encoder([t]) for t in texts])
        bb.tokenizer.padding_side = "left"
        left = encoder(texts)
        bb.tokenizer.padding_side = "right"
        right = encoder(texts)
    assert torch.allclose(alone, left, atol=1e-5)
    assert torch.allclose(alone, right, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])


def test_refined_branch_starts_as_the_coarse_prediction():
    config = replace(make_model().config)
    model = HyMiRec(config, torch.cat([torch.zeros(1, C), torch.randn(N, C)])).eval()
    model.items.fit_codebook()
    seq = torch.as_tensor(pad_left(histories([12, 7]), 12))
    interests = model(seq)
    coarse = model.coarse_user(seq)
    assert torch.allclose(interests, coarse.expand_as(interests), atol=1e-5)


def test_coarse_phase_trains_the_pooled_interests():
    model = make_model().train()
    seq = torch.as_tensor(pad_left(histories([12, 9, 15]), 15))
    loss, stats = model.coarse_loss(seq)
    loss.backward()
    assert "multi" in stats and torch.isfinite(loss)
    assert model.coarse.queries.grad is not None and model.coarse.queries.grad.abs().sum() > 0
    single = make_model(num_interests=1).train()  # K = 1: next-item only, the pooled queries untouched
    loss, stats = single.coarse_loss(seq)
    loss.backward()
    assert "multi" not in stats and single.coarse.queries.grad is None


@pytest.mark.parametrize("pooled_only", [False, True])
def test_phase_one_dmil_can_leave_the_last_state_out_of_the_matching(pooled_only):
    model = make_model(retrieval_weight=0.0, targets=8).train()
    seq = torch.as_tensor(pad_left(histories([20, 16, 18]), 20))
    ends = torch.tensor([[8, 10], [6, 9], [7, 11]])
    interests = torch.randn(3, 2, 4, D, requires_grad=True)
    exact = model.item_vectors().detach()
    loss, _ = model._multi_interest_loss(interests, seq, ends, exact, model._negatives(exact),
                                         matched_from=int(pooled_only))
    loss.backward()
    last, pooled = interests.grad[:, :, 0], interests.grad[:, :, 1:]
    assert pooled.abs().sum() > 0
    assert (last.abs().sum() == 0) == pooled_only


def test_phase_one_reads_the_pooled_only_flag():
    seq = torch.as_tensor(pad_left(histories([20, 16, 18]), 20))
    multi = {}
    for pooled_only in (False, True):
        model = make_model(coarse_dmil_pooled_only=pooled_only, targets=8).train()
        torch.manual_seed(1)  # same cut points and negatives for both
        loss, stats = model.coarse_loss(seq)
        assert torch.isfinite(loss)
        multi[pooled_only] = stats["multi"]
    assert multi[False] != pytest.approx(multi[True])


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_phase_two_weighs_dmil_beside_the_next_item_term(weight):
    model = make_model(refined_dmil_weight=weight, targets=8)
    model.freeze_coarse()
    seq = torch.as_tensor(pad_left(histories([20, 16, 18]), 20))
    ends = torch.tensor([[8, 10], [6, 9], [7, 11]])
    torch.manual_seed(1)
    loss, stats = model.loss(seq, ends)
    # DMIL's own part: what is left after the next-item term, at the weight given (none at 0)
    assert loss.item() - stats["retrieval"] == pytest.approx(weight * stats.get("infonce", 0.0), abs=1e-5)
    assert ("infonce" in stats) == (weight > 0)


def test_refined_interests_need_as_many_coarse_interests():
    with pytest.raises(ValueError, match="coarse_interests"):
        make_model(coarse_interests=2, num_interests=4)


def test_window_gathers_recent_items_and_targets():
    seq = torch.tensor([[0, 0, 5, 6, 7, 8]])
    ends = torch.tensor([[3, 4]])
    recent, pad = window(seq, ends, 3, 0)
    assert recent.tolist() == [[[0, 5, 6], [5, 6, 7]]]
    assert pad.tolist() == [[[True, False, False], [False, False, False]]]
    targets, _ = window(seq, ends, 2, 2)
    assert targets.tolist() == [[[7, 8], [8, 0]]]


@pytest.mark.parametrize("overrides", [
    {"num_interests": 1},
    {"use_codebook": False},
    {"use_coarse": False, "use_codebook": False},
    {"disentangle_weight": 0.1},
])
def test_ablation_flags_run(overrides):
    model = make_model(**overrides).train()
    seq = torch.as_tensor(pad_left(histories([12, 9]), 12))
    ends = torch.tensor([[4, 8], [5, 9]])
    loss, stats = model.loss(seq, ends)
    loss.backward()
    assert torch.isfinite(loss) and "scale" in stats
    assert model(seq).shape[1] == overrides.get("num_interests", 4)


def test_sampled_negatives_are_drawn_per_step_and_weighted():
    model = make_model(negatives=7)
    exact = model.item_vectors()
    first, second = model._negatives(exact), model._negatives(exact)
    assert len(first.ids) == 7 and first.log_weight == pytest.approx(math.log(N / 7))
    assert not torch.equal(first.ids, second.ids)
    assert len(make_model(negatives=N)._negatives(exact).ids) == N


def test_phase_one_draws_once_a_step_for_both_of_its_terms():
    model = make_model(negatives=7).train()  # K = 4: next-item and the multi-interest terms
    draws = []
    sample = model._negatives
    model._negatives = lambda exact: draws.append(sample(exact)) or draws[-1]
    loss, stats = model.coarse_loss(torch.as_tensor(pad_left(histories([20, 16, 18]), 20)))
    assert len(draws) == 1 and "multi" in stats and torch.isfinite(loss)


def test_item_counts_steer_the_draw_toward_popular_items():
    model = make_model(negatives=5, negatives_popular=1.0)
    assert model.negative_probs is None  # uniform until the trainer gives counts
    counts = torch.zeros(N + 1)
    counts[1:6] = 10.0  # only items 1..5 were read
    model.set_item_counts(counts)
    neg = model._negatives(model.item_vectors())
    assert set(neg.ids.tolist()) <= {1, 2, 3, 4, 5} and neg.log_weight.shape == neg.ids.shape
    assert "negative_probs" not in model.state_dict()  # training data, not part of a checkpoint


@pytest.mark.parametrize("negatives", [0, 8])
def test_training_steps_reduce_the_loss(negatives):
    model = make_model(negatives=negatives).train()
    # Two planted groups: users read items 1..10 or 11..20, so the next items are predictable.
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1 + 10 * (u % 2), 11 + 10 * (u % 2), (12,), generator=g).numpy() for u in range(16)]
    seq = torch.as_tensor(pad_left(seqs, 12))
    ends = torch.tensor([[3, 6, 8]] * 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = model.loss(seq, ends)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_sasrec_is_causal_and_padding_invariant():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=N, dim=16, max_len=20)).eval()
    hs = histories([8, 5])
    a = model.user_vectors(torch.as_tensor(pad_left(hs, 20)))
    b = torch.cat([model.user_vectors(torch.as_tensor(pad_left([h], 20))) for h in hs])
    assert a.shape == (2, 1, 16)
    assert torch.allclose(a, b, atol=1e-5)


def test_a_manifest_config_from_before_the_objective_split_loads_its_architecture():
    config = make_model().config
    older = {**asdict(config), "negatives": 512, "targets": 16, "fn_threshold": 0.99}  # how training was set then
    assert HyMiRecConfig.from_dict(older) == config
    assert "negatives" not in asdict(config)  # what a version stores now is the architecture alone
