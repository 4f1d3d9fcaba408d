"""A model version as files: what a version holds, how a module and its catalogue become bytes and
back. The registry (store.registry) stores the files with their sha256 and the manifest.

    model.safetensors        every weight and buffer (item content, codes, codebook)
    items.json               item ids, texts and categories in index order (index 0 is padding)
    item_encoder.safetensors the frozen content encoder's weights  } tiny backbones only: a pretrained
    item_tokenizer.json      its tokenizer                         } one is rebuilt from its recipe

The manifest says what the files are: the model kind and config, how the content encoder is made,
the codebook, training metrics and what the version was trained on.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hymirec.errors import HymirecError
from model.backbone import TINY_NAMES, Backbone, tiny_config
from model.hymirec import HyMiRec, HyMiRecConfig
from model.item_encoder import ItemEncoder
from model.sasrec import SASRec, SASRecConfig

FORMAT = 1
WEIGHTS = "model.safetensors"
ITEMS = "items.json"
ENCODER_WEIGHTS = "item_encoder.safetensors"
ENCODER_TOKENIZER = "item_tokenizer.json"


def state_bytes(module: nn.Module) -> bytes:
    # clone(): safetensors refuses tensors that share storage (tied or sliced views)
    return save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()})


def manifest(*, model: str, kind: str, config: dict, backbone: str, item_encoder: dict, codebook: dict | None,
             metrics: dict, trained_on: dict, **more) -> dict:
    """``item_encoder``: the recipe that rebuilds the content encoder (model.item_encoder.frozen_encoder);
    ``more``: anything else a version records (fingerprints, the parent)."""
    return {"format": FORMAT, "model": model, "kind": kind, "config": config, "backbone": backbone,
            "item_encoder": item_encoder, "codebook": codebook, "metrics": metrics, "trained_on": trained_on, **more}


def to_files(module: nn.Module, catalogue, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """``module``'s state and ``catalogue``'s items (anything with item_ids, texts, category [N+1]
    and category_names), plus ``extra`` files (the content encoder's)."""
    items = {"item_ids": catalogue.item_ids, "texts": catalogue.texts, "category": catalogue.category.tolist(),
             "category_names": catalogue.category_names}
    return {WEIGHTS: state_bytes(module), ITEMS: json.dumps(items).encode("utf-8"), **(extra or {})}


def from_files(version: str, manifest: dict, files: dict[str, bytes]) -> tuple[nn.Module, dict]:
    """→ (the HyMiRec or SASRec module in eval mode, the items as ``to_files`` wrote them, category
    an int64 array)."""
    if manifest.get("format") != FORMAT:
        raise HymirecError(f"model {version} has format {manifest.get('format')!r}; this build reads {FORMAT}")
    items = json.loads(files[ITEMS])
    items["category"] = np.asarray(items["category"], dtype=np.int64)
    state = load_safetensors(files[WEIGHTS])
    if manifest["kind"] == "hymirec":
        config = HyMiRecConfig.from_dict(manifest["config"])
        module = HyMiRec(config, torch.zeros(config.num_items + 1, config.content_dim))
        module.load_state_dict(state)
    else:  # SASRec is stored with its logit scale, as ModuleList([model, scale])
        module = SASRec(SASRecConfig(**manifest["config"]))
        module.load_state_dict({k.removeprefix("0."): v for k, v in state.items() if k.startswith("0.")})
    return module.eval(), items


def encoder_files(encoder: ItemEncoder, recipe: dict) -> tuple[dict[str, bytes], dict]:
    """→ (files, recipe) of a content encoder. A tiny one's weights and tokenizer (its tokenizer was
    trained on the bootstrap catalogue, which later versions outgrow, so the recipe alone would not
    rebuild it); a pretrained one needs only its recipe."""
    if recipe["backbone"] not in TINY_NAMES:
        return {}, recipe
    recipe = {**recipe, "arch": "qwen2" if recipe["backbone"] == "tiny-qwen2" else "llama",
              "vocab_size": len(encoder.tokenizer), "files": [ENCODER_WEIGHTS, ENCODER_TOKENIZER]}
    files = {ENCODER_WEIGHTS: state_bytes(encoder),
             ENCODER_TOKENIZER: encoder.tokenizer.backend_tokenizer.to_str().encode("utf-8")}
    return files, recipe


def encoder_from_files(recipe: dict, files: dict[str, bytes]) -> ItemEncoder:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(files[ENCODER_TOKENIZER].decode("utf-8")),
                                        pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = AutoModelForCausalLM.from_config(tiny_config(recipe["arch"], recipe["vocab_size"], recipe["hidden"]))
    encoder = ItemEncoder(Backbone(recipe["backbone"], model, tokenizer, recipe["hidden"]), None,
                          word_buckets=recipe.get("word_buckets", 0))
    encoder.load_state_dict(load_safetensors(files[ENCODER_WEIGHTS]))
    return encoder.freeze_llm().eval()
