"""Items' words in HyMiRec's content (model.item_encoder.hashed_words): hand-computed buckets, the
encoder's output, and the point of it — an item released after training is placed by its words."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from model.backbone import load_backbone
from model.item_encoder import ItemEncoder, hashed_words
from trainer.serving_model import bootstrap


def test_hashed_words_count_each_lower_cased_word_over_the_root_of_the_text_length():
    out = hashed_words(["Alpha beta ALPHA", "", "gamma"], 1 << 20)
    # crc32 spreads these three words over a million buckets without a collision
    assert sorted(out[0][out[0] > 0].tolist()) == pytest.approx([1 / math.sqrt(3), 2 / math.sqrt(3)])
    assert out[1].abs().sum() == 0  # no text, no words
    assert out[2].sum() == pytest.approx(1.0)
    assert torch.equal(out, hashed_words(["alpha beta alpha", "", "Gamma!"], 1 << 20))  # case and punctuation


def test_the_encoder_appends_the_hashed_words_to_its_item_state():
    texts = ["red apple pie", "green apple", "blue sky"]
    bb = load_backbone("tiny", texts=texts * 3, hidden=32)
    plain = ItemEncoder(bb, None).eval()
    worded = ItemEncoder(bb, None, word_buckets=8).eval()
    assert worded.out_dim == 32 + 8
    with torch.no_grad():
        out = worded(texts)
        assert torch.allclose(out[:, :32], plain(texts))
    assert torch.equal(out[:, 32:], hashed_words(texts, 8))


TOPICS = 8


def _topic_world(seed: int = 0) -> tuple[pd.DataFrame, dict[str, list[str]], dict[int, list[str]], pd.DataFrame]:
    """TOPICS topics, each with six words of its own; an item's text is three of its topic's words
    and a shared one. Each user reads one topic. → (catalogue, histories, each topic's users, one
    unseen item per topic)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]
    vocabulary = list(dict.fromkeys(a + b + c for a in syllables for b in syllables for c in syllables))
    rng.shuffle(vocabulary)
    words = [vocabulary[6 * t : 6 * t + 6] for t in range(TOPICS)]

    def text(t: int) -> str:
        return " ".join([*rng.sample(words[t], 3), "item"])

    rows = [{"item_id": f"t{t}-{j}", "text": text(t), "category": None} for t in range(TOPICS) for j in range(12)]
    histories, readers = {}, {t: [] for t in range(TOPICS)}
    for u in range(12 * TOPICS):
        t = u % TOPICS
        histories[f"u{u}"] = rng.sample([r["item_id"] for r in rows if r["item_id"].startswith(f"t{t}-")], 8)
        readers[t].append(f"u{u}")
    fresh = pd.DataFrame([{"item_id": f"new-{t}", "text": text(t), "category": None} for t in range(TOPICS)])
    return pd.DataFrame(rows), histories, readers, fresh


def test_an_item_released_after_training_is_placed_by_its_words(db_settings):
    """Each topic's readers rank that topic's new item (embedded on arrival, no ID embedding, never
    trained on) first among the TOPICS new ones."""
    catalogue, histories, readers, fresh = _topic_world()
    settings = db_settings.model_copy(update={"item_word_buckets": 256, "train_negatives": 0})
    model = bootstrap(settings, catalogue, histories, epochs=8)
    encoded = model.encode_items(fresh)
    assert encoded.item_ids == fresh["item_id"].tolist()
    vectors = encoded.vectors / np.linalg.norm(encoded.vectors, axis=1, keepdims=True)
    own_first = []
    for t, users in readers.items():
        best = (model.interests([histories[u] for u in users]) @ vectors.T).max(axis=1)  # [B, TOPICS]
        own_first += (best.argmax(axis=1) == t).tolist()
    assert np.mean(own_first) > 0.9
