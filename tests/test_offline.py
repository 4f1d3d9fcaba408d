"""Leave-one-out split, `hymirec eval` / `hymirec train` through the CLI, and reloading a version."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from hymirec.cli import main
from hymirec.errors import HymirecError
from hymirec.settings import Settings
from trainer.data import leave_one_out


def frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])


ITEMS = pd.DataFrame({"item_id": list("abcdefg"), "text": [f"item {c}" for c in "abcdefg"],
                      "category": ["x", "x", "y", "y", "z", None, "z"]})


def test_leave_one_out_is_stable_drops_short_users_and_excludes_whole_history():
    log = frame([
        ("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 5),
        ("u1", "c", 3), ("u1", "d", 3),  # a tie: file order decides, d is after c
        ("u1", "e", 3),
        ("u2", "b", 6),  # u2 has 2 interactions: dropped
        ("u3", "g", 9), ("u3", "f", 1), ("u3", "a", 4), ("u3", "f", 10),  # repeat of f as the test item
    ])
    split = leave_one_out(log, ITEMS)
    idx = split.catalogue.index
    assert split.dropped_users == 1
    assert split.train.user_ids == ["u1", "u3"]
    u1 = [idx[c] for c in "abcde"]
    assert split.train.items[0].tolist() == u1[:-2]
    assert split.valid.target[0] == idx["d"] and split.test.target[0] == idx["e"]
    # the exclusion set is the whole prior history, not a model window
    assert sorted(split.test.exclude[0].tolist()) == sorted(u1[:-1])
    assert sorted(split.valid.exclude[0].tolist()) == sorted(u1[:-2])
    # u3 sorted by ts: f(1) a(4) g(9) f(10); the repeated test item f stays rankable
    assert split.test.target[1] == idx["f"]
    assert idx["f"] not in split.test.exclude[1].tolist()
    assert sorted(split.test.exclude[1].tolist()) == sorted([idx["a"], idx["g"]])
    # categories: items without one map to 0
    assert split.catalogue.category[idx["f"]] == 0 and split.catalogue.category[idx["a"]] > 0


def test_missing_columns_are_a_clear_error():
    with pytest.raises(HymirecError, match="ts"):
        leave_one_out(pd.DataFrame({"user_id": ["u"], "item_id": ["a"]}), ITEMS)


def test_hymirec_batches_mix_users_of_every_history_length():
    # Batches of users of similar length (less padding) made every batch one kind of user and cost
    # the coarse branch 0.03 test Recall@10 on ml-100k: an epoch must be a random partition.
    from trainer.models import HyMiRecModel

    log = frame([("u", "a", 1), ("u", "b", 2), ("u", "c", 3)])
    split = leave_one_out(log, ITEMS)
    model = HyMiRecModel(split.catalogue, torch.device("cpu"), Settings(), content=torch.randn(8, 16))
    seqs = [np.arange(1, n + 1) for n in range(1, 129)]  # lengths 1..128, in length order
    batches = model._batches(seqs, 16)
    torch.manual_seed(0)
    epochs = [batches(epoch) for epoch in range(2)]
    for epoch in epochs:
        drawn = sorted(len(s) for batch, _ in epoch for s in batch)
        assert drawn == list(range(1, 129))  # every user once per epoch
        assert all(n == sum(len(s) for s in batch) for batch, n in epoch)
        spread = np.mean([max(map(len, batch)) - min(map(len, batch)) for batch, _ in epoch])
        assert spread > 64  # length-sorted batches would span ~15
    assert [len(s) for s in epochs[0][0][0]] != [len(s) for s in epochs[1][0][0]]


def test_phase1_runs_to_early_stopping_with_validation_and_to_a_cosine_budget_without():
    # A 40-epoch cosine schedule ended phase 1 while ml-100k validation was still rising; eval can stop
    # on validation, so it trains at a constant lr for as long as that helps. Train and the online
    # trainer have no validation set: their epochs stay a budget that the lr decays over.
    from trainer.fit import FitConfig, lr_schedule
    from trainer.models import COARSE_MAX_EPOCHS, HYMIREC_EPOCHS, HyMiRecModel

    split = leave_one_out(frame([("u", "a", 1), ("u", "b", 2), ("u", "c", 3)]), ITEMS)

    def configs(validated, epochs=None, **overrides):
        model = HyMiRecModel(split.catalogue, torch.device("cpu"), Settings(), content=torch.randn(8, 16),
                             epochs=epochs, **overrides)
        return model.fit_configs(validated)

    coarse, refine = configs(validated=True)
    assert (coarse.schedule, coarse.epochs) == ("constant", COARSE_MAX_EPOCHS)
    assert refine.epochs == HYMIREC_EPOCHS // 3  # phase 2 keeps its share of the default budget
    coarse, refine = configs(validated=False)
    assert (coarse.schedule, coarse.epochs, refine.epochs) == ("cosine", HYMIREC_EPOCHS * 2 // 3, HYMIREC_EPOCHS // 3)
    coarse, refine = configs(validated=True, epochs=6)  # given epochs cap phase 1 with validation too
    assert (coarse.schedule, coarse.epochs, refine.epochs) == ("constant", 4, 2)
    coarse, refine = configs(validated=True, use_coarse=False, use_codebook=False)  # "multi": one phase
    assert refine.epochs == HYMIREC_EPOCHS

    constant = lr_schedule(FitConfig(epochs=10, batch_size=1, lr=1.0, schedule="constant"), 100)
    cosine = lr_schedule(FitConfig(epochs=10, batch_size=1, lr=1.0), 100)
    assert {constant(step) for step in range(100)} == {1.0}
    assert cosine(0) < cosine(10) == 1.0 and cosine(99) < 0.01


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert main(["datasets", "export", "synthetic", "--out", str(out), "--users", "60", "--items", "60",
                 "--interests", "4", "--events-per-user", "15", "--seed", "1"]) == 0
    return out / "interactions.jsonl", out / "items.jsonl"


def _eval_json(capsys, synthetic, *extra):
    inter, items = synthetic
    code = main(["eval", "--interactions", str(inter), "--items", str(items), "--json", *extra])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return code, lines


@pytest.mark.parametrize("model", ["pop", "sasrec"])
def test_eval_cli_prints_metrics(capsys, synthetic, model):
    code, lines = _eval_json(capsys, synthetic, "--model", model, "--epochs", "1")
    assert code == 0 and len(lines) == 1
    result = lines[0]
    assert result["model"] == model
    for key in ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "recall@200", "ndcg@200", "ild@10",
                "coverage@10", "train_s", "train_items_per_s"):
        assert key in result
    assert 0.0 <= result["ndcg@10"] <= result["recall@10"] <= result["recall@50"] <= result["recall@200"] <= 1.0


@pytest.mark.parametrize("name", ["hymirec-k1", "hymirec-nocodebook", "hymirec-dmil-pooled", "multi"])
def test_ablation_runs_build_their_variant(name):
    from trainer.recipes import RUNS, build

    split = leave_one_out(frame([(f"u{u}", c, t) for u in range(4) for t, c in enumerate("abcde")]), ITEMS)
    settings = Settings(embedding_dim=16, codebook_levels=2, codebook_size=4, history_max_len=10, recent_len=3)
    model = build(RUNS[name], split.catalogue, settings, torch.device("cpu"), "tiny", "tiny", 1, torch.randn(8, 16))
    config = model.model.config
    assert model.name == name
    assert (config.num_interests == 1) == (name == "hymirec-k1")
    assert config.use_codebook == (name in ("hymirec-k1", "hymirec-dmil-pooled"))
    assert config.use_coarse == (name != "multi")
    assert model.model.objective.coarse_dmil_pooled_only == (name == "hymirec-dmil-pooled")


def test_hymirec_and_sasrec_train_on_the_settings_negatives():
    from trainer.recipes import RUNS, build

    split = leave_one_out(frame([(f"u{u}", c, t) for u in range(4) for t, c in enumerate("abcde")]), ITEMS)
    settings = Settings(embedding_dim=16, codebook_levels=2, codebook_size=4, history_max_len=10, recent_len=3,
                        train_negatives=3, train_negatives_popular=0.25)
    hymirec = build(RUNS["hymirec"], split.catalogue, settings, torch.device("cpu"), "tiny", "tiny", 1, torch.randn(8, 16))
    sasrec = build(RUNS["sasrec"], split.catalogue, settings, torch.device("cpu"), "tiny", "tiny", 1)
    assert hymirec.model.objective.negatives == sasrec.negatives == 3
    assert hymirec.model.objective.negatives_popular == sasrec.negatives_popular == 0.25
    report = sasrec.fit(split.train, None, False)
    assert math.isfinite(report.final_loss)
    hymirec.fit(split.train, None, False)
    # the draw follows the training counts: a, b, c (1..3) were read in training (d and e are each
    # user's validation and test items), the rest is drawn only through the uniform share
    assert hymirec.model.negative_probs[:3].min() > hymirec.model.negative_probs[3:].max()


class _Fixed:
    """A candidate with a fixed validation score that records the first random number it drew."""

    def __init__(self, name, valid, seconds):
        from trainer.fit import FitReport

        self.name, self.draw = name, torch.rand(1).item()
        self.report = FitReport(valid_recall10=valid, train_seconds=seconds, items_seen=10, extra={"mine": name})

    def fit(self, train, valid, progress):
        return self.report

    def item_vectors(self):
        return torch.full((3, 2), float(len(self.name)))


def test_a_choice_run_keeps_the_candidate_that_validates_best_each_from_the_same_seed():
    from trainer.models import ChosenOnValidation

    made = []

    def candidate(name, valid, seconds):
        return name, lambda: made.append(_Fixed(name, valid, seconds)) or made[-1]

    chooser = ChosenOnValidation([candidate("k4", 0.20, 3.0), candidate("k1", 0.25, 2.0), candidate("kx", 0.22, 1.0)],
                                 seed=7)
    report = chooser.fit(None, "a validation set", False)
    assert chooser.chosen is made[1] and report.extra["chosen"] == "k1" and report.extra["mine"] == "k1"
    assert report.valid_recall10 == 0.25 and report.train_seconds == 6.0 and report.items_seen == 30
    assert {k: v for k, v in report.extra.items() if k.startswith("valid_")} == {
        "valid_recall10_k4": 0.20, "valid_recall10_k1": 0.25, "valid_recall10_kx": 0.22}
    assert len({m.draw for m in made}) == 1  # every candidate built from the eval's seed
    assert torch.equal(chooser.item_vectors(), made[1].item_vectors())
    with pytest.raises(HymirecError, match="validation set"):
        ChosenOnValidation([candidate("k4", 0.2, 1.0)], seed=7).fit(None, None, False)


def test_kval_chooses_between_k4_and_k1_through_the_cli(capsys, synthetic):
    code, lines = _eval_json(capsys, synthetic, "--model", "hymirec-kval", "--epochs", "1")
    (row,) = lines
    scores = {k: row[f"valid_recall10_{k}"] for k in ("hymirec", "hymirec-k1")}
    assert code == 0 and row["model"] == "hymirec-kval"
    assert row["chosen"] == max(scores, key=lambda k: (scores[k], k == "hymirec"))
    assert row["valid_recall@10"] == scores[row["chosen"]]


def test_eval_cli_runs_a_comma_list_of_models_writes_the_table_and_rejects_unknown_names(tmp_path, capsys, synthetic):
    out = tmp_path / "results"
    code, lines = _eval_json(capsys, synthetic, "--model", "pop,sasrec", "--epochs", "1", "--out", str(out))
    assert code == 0 and [r["model"] for r in lines] == ["pop", "sasrec"]
    assert [r["model"] for r in json.loads((out / "results.json").read_text())] == ["pop", "sasrec"]
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | recall@10") and len(table) == 4
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    inter, items = synthetic
    assert main(["eval", "--interactions", str(inter), "--items", str(items), "--model", "pop,nope"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_eval_cli_several_seeds_reports_mean_and_spread(tmp_path, capsys, synthetic):
    out = tmp_path / "results"
    code, lines = _eval_json(capsys, synthetic, "--model", "sasrec", "--epochs", "1", "--seeds", "0,1", "--out", str(out))
    assert code == 0 and [(r["model"], r["seed"]) for r in lines] == [("sasrec", 0), ("sasrec", 1)]
    assert lines[0]["recall@200"] != lines[1]["recall@200"] or lines[0]["ndcg@200"] != lines[1]["ndcg@200"]
    row = (out / "results.md").read_text().splitlines()[2].split(" | ")
    assert row[0] == "| sasrec" and row[1] == "2"
    mean = (lines[0]["recall@10"] + lines[1]["recall@10"]) / 2
    assert row[2].startswith(f"{mean:.4f} ± ")


def test_across_seeds_mean_and_sample_sd():
    from trainer.results import across_seeds

    rows = across_seeds([{"model": "a", "recall@10": 0.1}, {"model": "b", "recall@10": 0.5},
                         {"model": "a", "recall@10": 0.3}])
    assert [r["model"] for r in rows] == ["a", "b"] and rows[0]["seeds"] == 2
    assert rows[0]["recall@10"] == pytest.approx(0.2) and rows[0]["recall@10_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["recall@10_sd"] == 0.0


def test_eval_cli_rejects_bad_input(tmp_path, capsys, synthetic):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u", "item_id": "a"}\n')
    code = main(["eval", "--interactions", str(bad), "--items", str(synthetic[1]), "--model", "pop"])
    assert code == 1
    assert capsys.readouterr().err.startswith("hymirec: error:")


def test_train_publishes_versions_and_load_reproduces_scores(tmp_path, monkeypatch, capsys, synthetic):
    from serving.loader import load_version
    from trainer.publish import train_and_publish

    inter, items = synthetic
    small = {"HYMIREC_LANCEDB_URI": str(tmp_path / "lancedb"), "HYMIREC_CODEBOOK_SIZE": "16",
             "HYMIREC_EMBEDDING_DIM": "32", "HYMIREC_HISTORY_MAX_LEN": "40"}
    for name, value in small.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--interactions", str(inter), "--items", str(items), "--epochs", "1"]) == 0
    assert "published v0001" in capsys.readouterr().out

    settings = Settings()  # the same environment
    version, trained = train_and_publish(settings, interactions=inter, items=items, model="hymirec", epochs=1, seed=2,
                                         device="cpu")
    assert version.version == "v0002" and version.parent == "v0001"
    manifest = version.manifest
    assert manifest["files"]["model.safetensors"]["sha256"]
    assert manifest["codebook"]["bytes_per_item"] > 0 and 0 < manifest["codebook"]["reconstruction_cosine"] <= 1
    assert manifest["config"]["num_interests"] == settings.num_interests

    loaded = load_version(settings)
    assert loaded.version == "v0002"
    histories = [np.array([1, 2, 3]), np.array([5, 9, 4, 7, 2, 8])]
    assert torch.allclose(loaded.interests(histories), trained.interests(histories), atol=1e-5)
    assert torch.allclose(loaded.item_vectors(), trained.item_vectors(), atol=1e-6)
    top = loaded.topk(histories, k=5)
    assert top.items.shape == (2, 5) and not set(top.items[1].tolist()) & {5, 9, 4, 7, 2, 8}
    assert load_version(settings, "v0001").version == "v0001"
    # a new item is embedded by the rebuilt content encoder; a known text gets its stored content part
    vectors, codes, scales = loaded.encode_texts([loaded.catalogue.texts[0], loaded.catalogue.texts[3]])
    items = loaded.module.items
    assert torch.allclose(vectors, items.content_vectors(items.content[[1, 4]]), atol=1e-5)
    decoded = loaded.codebook.decode(codes, scales)
    assert torch.nn.functional.cosine_similarity(decoded, vectors).min() > 0.5


def test_fit_loop_validates_and_keeps_the_moving_average_of_the_weights():
    from trainer.fit import FitConfig, fit_loop

    module = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    raw, seen = [], []

    def loss_fn(batch):
        raw.append(module.weight.item())  # the weights this step starts from: training runs on the raw ones
        return -module.weight.sum(), {}

    def validate():
        seen.append(module.weight.item())
        return [0.1, 0.3, 0.2, 0.2][len(seen) - 1]  # best after epoch 1; the start counts as a candidate

    cfg = FitConfig(epochs=3, batch_size=1, lr=0.1, weight_decay=0.0, schedule="constant", ema=0.5, grad_clip=0.0)
    report = fit_loop(module, lambda epoch: [(None, 1), (None, 1)], loss_fn, cfg, validate)
    trajectory = raw[1:] + [raw[-1] + 0.1]  # the weights after each of the 6 steps (Adam moves a constant gradient by lr)
    average, expected = 0.0, []
    for step, w in enumerate(trajectory, 1):
        decay = min(0.5, step / (9 + step))  # ramps up: 0.1, 0.18, ... then 0.5
        average = decay * average + (1 - decay) * w
        if step % 2 == 0:
            expected.append(average)
    assert raw[2] == pytest.approx(0.2, abs=1e-4)  # training went on from the raw weights, not the average
    assert seen == pytest.approx([0.0, *expected], abs=1e-4)
    assert report.best_epoch == 1 and module.weight.item() == pytest.approx(expected[0], abs=1e-4)
