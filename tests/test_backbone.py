"""Backbones load offline: tiny Llama / Qwen2 with a BPE tokenizer trained on the item texts, and the
bundled SmolLM2 GGUF (slow: ~1 min to convert on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from model.backbone import load_backbone, smollm2_path
from model.item_encoder import ItemEncoder

TEXTS = ["Toy Story (1995) | Animation Children's Comedy", "GoldenEye (1995) | Action Adventure Thriller",
         "Four Rooms (1995) | Thriller", "Get Shorty (1995) | Action Comedy Drama"] * 5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Any attempt to reach the hub would fail loudly instead of downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name, model_type", [("tiny", "llama"), ("tiny-qwen2", "qwen2")])
def test_tiny_backbone_loads_offline_with_trained_tokenizer(name, model_type):
    bb = load_backbone(name, texts=TEXTS, hidden=64)
    assert bb.model.config.model_type == model_type
    assert bb.hidden == 64 and bb.model.config.num_hidden_layers == 2
    assert bb.tokenizer.pad_token is not None
    # The tokenizer was trained on the texts: a frequent word is a single token.
    assert len(bb.tokenizer.tokenize(" Comedy")) == 1
    enc = bb.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    out = bb.decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert out.shape[:2] == enc["input_ids"].shape and out.shape[-1] == 64
    assert torch.isfinite(out).all()


def test_tiny_backbone_is_seeded():
    a = load_backbone("tiny", texts=TEXTS, seed=3).model.state_dict()
    b = load_backbone("tiny", texts=TEXTS, seed=3).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_hub_id_fails_without_downloading():
    from hymirec.errors import HymirecError

    with pytest.raises(HymirecError, match="offline"):
        load_backbone("no-such-org/no-such-model-hymirec")


@pytest.mark.slow
def test_smollm2_gguf_loads_and_embeds_items():
    assert smollm2_path().is_file()
    bb = load_backbone("smollm2")
    assert bb.hidden == 576 and bb.tokenizer.pad_token is not None
    encoder = ItemEncoder(bb, None).eval()
    with torch.no_grad():
        vecs = encoder(TEXTS[:3])
    assert vecs.shape == (3, 576) and torch.isfinite(vecs).all()
    # Different items get different embeddings.
    assert not torch.allclose(vecs[0], vecs[1])
