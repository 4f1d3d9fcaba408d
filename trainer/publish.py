"""Train on a whole log, publish a versioned checkpoint, and load one back ready to serve.

A version holds ``model.safetensors`` (every weight and buffer: item content, codes, codebook),
``items.json`` (item ids and categories in index order) and a manifest with the model kind,
config, codebook description, training metrics and the parent version (the latest before it).
The registry (store.registry) adds the sha256 of every file and verifies them on load.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from model.hymirec import HyMiRec, HyMiRecConfig
from model.retrieval import TopK, topk_items
from model.sasrec import SASRec, SASRecConfig
from store.registry import ModelRegistry
from trainer.data import Catalogue, build_sequences, load_catalogue, pad_left

FORMAT = 1
WEIGHTS = "model.safetensors"
ITEMS = "items.json"


def _state_bytes(module: torch.nn.Module) -> bytes:
    # clone(): safetensors refuses tensors that share storage (tied or sliced views)
    return save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()})


def train_and_publish(args, settings: Settings):
    """Fit ``args.model`` on the whole log and publish it → (ModelVersion, the trained Recommender)."""
    from trainer.offline import RUNS, _device, _seed, build, item_encoder_name, read_log

    interactions, items = read_log(args.interactions, args.items)
    catalogue = load_catalogue(interactions, items)
    sequences = build_sequences(interactions, catalogue)
    seed = args.seed if args.seed is not None else settings.seed
    _seed(seed)
    backbone = args.backbone or "tiny"
    item_encoder = item_encoder_name(args, settings)
    model = build(RUNS[args.model], catalogue, settings, _device(args.device), backbone, item_encoder, args.epochs,
                  progress=True)
    report = model.fit(sequences, None, progress=True)
    registry = ModelRegistry(settings)
    parent = registry.latest()
    manifest = {
        "format": FORMAT,
        "model": args.model,
        "kind": "sasrec" if args.model == "sasrec" else "hymirec",
        "config": asdict(model.config),
        "backbone": backbone,
        # what rebuilds the frozen content encoder (model.item_encoder.frozen_encoder) for new items
        "item_encoder": {"backbone": item_encoder, "hidden": settings.embedding_dim, "seed": settings.seed},
        "codebook": {**model.model.items.codebook.to_manifest(),
                     "bytes_per_item": report.extra["bytes_per_item"],
                     "reconstruction_cosine": round(report.extra["reconstruction_cosine"], 4)}
        if getattr(model.config, "use_codebook", False) and getattr(model.config, "use_coarse", False) else None,
        "metrics": {
            "final_loss": round(report.final_loss, 5),
            "epochs": report.epochs,
            "train_s": round(report.train_seconds, 1),
            "train_items_per_s": round(report.items_per_second),
        },
        "trained_on": {"interactions": str(args.interactions), "events": len(interactions),
                       "users": len(sequences), "items": catalogue.num_items, "seed": seed,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    files = {
        WEIGHTS: _state_bytes(model.model if manifest["kind"] == "hymirec" else torch.nn.ModuleList([model.model, model.scale])),
        ITEMS: json.dumps({"item_ids": catalogue.item_ids, "texts": catalogue.texts,
                           "category": catalogue.category.tolist(),
                           "category_names": catalogue.category_names}).encode("utf-8"),
    }
    return registry.publish(files, manifest, parent.version if parent else None), model


@dataclass
class LoadedModel:
    """A published version, ready to score: ``interests`` of histories and ``topk`` over items."""

    version: str
    manifest: dict
    catalogue: Catalogue
    module: torch.nn.Module  # HyMiRec or SASRec, eval mode
    _encoder: object = None  # the frozen content encoder, built on first use

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def codebook(self):
        """The CSRC codebook (HyMiRec with use_codebook), else None."""
        return getattr(self.module.items, "codebook", None) if self.kind == "hymirec" else None

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """[N+1, D] (row 0 = padding)."""
        return self.module.item_vectors().float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Items the model has not seen, by text → (vectors [n, D] from content alone: there is no
        ID embedding for them yet, codes [n, L], scales [n, L] of those vectors); codes/scales are
        None without a codebook. HyMiRec only."""
        from model.item_encoder import frozen_encoder

        if self.kind != "hymirec":
            raise HymirecError(f"model {self.version} ({self.manifest['model']}) has no content encoder")
        if self._encoder is None:
            spec = self.manifest["item_encoder"]
            self._encoder = frozen_encoder(spec["backbone"], self.catalogue.texts, spec["hidden"], spec["seed"])
        content = self._encoder.encode_all(texts)
        content = self.module.items.standardise(content * torch.as_tensor([bool(t.strip()) for t in texts])[:, None])
        vectors = self.module.items.content_vectors(content)
        if self.codebook is None:
            return vectors, None, None
        codes, scales = self.codebook.encode(vectors)
        return vectors, codes, scales

    def indices(self, item_ids: list[str]) -> np.ndarray:
        """Item ids → indices; unknown ids are dropped (a newer item the model has not seen)."""
        return np.array([self.catalogue.index[i] for i in item_ids if i in self.catalogue.index], dtype=np.int64)

    @torch.no_grad()
    def interests(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Histories as item-index arrays (oldest first) → [B, K, D]."""
        if self.kind == "hymirec":
            length = self.module.config.history_len
        else:
            length = self.module.config.max_len
        longest = max(1, min(length, max(len(h) for h in histories)))
        seq = torch.as_tensor(pad_left(histories, longest))
        if self.kind == "hymirec":
            return self.module(seq)
        return self.module.user_vectors(seq)

    @torch.no_grad()
    def topk(self, histories: list[np.ndarray], k: int = 10, exclude_seen: bool = True) -> TopK:
        """Top-k item *indices* per history (items = index; 0 never returned)."""
        vectors = self.item_vectors()[1:]
        exclude = [torch.as_tensor(np.unique(h) - 1) for h in histories] if exclude_seen else None
        top = topk_items(self.interests(histories), vectors, k, exclude)
        return TopK(top.scores, torch.where(top.items >= 0, top.items + 1, top.items), top.interest)


def load_version(settings: Settings, version: str | None = None) -> LoadedModel:
    """The given (default: latest) registry version as a ready model; every file sha256-verified."""
    registry = ModelRegistry(settings)
    if version is None:
        latest = registry.latest()
        if latest is None:
            raise HymirecError(f"no published model in {settings.lancedb_uri}; run `hymirec train` first")
        version = latest.version
    manifest, files = registry.load(version)
    if manifest.get("format") != FORMAT:
        raise HymirecError(f"model {version} has format {manifest.get('format')!r}; this build reads {FORMAT}")
    items = json.loads(files[ITEMS])
    catalogue = Catalogue(item_ids=items["item_ids"], texts=items["texts"],
                          category=np.asarray(items["category"], dtype=np.int64),
                          category_names=items["category_names"])
    state = load_safetensors(files[WEIGHTS])
    if manifest["kind"] == "hymirec":
        config = HyMiRecConfig.from_dict(manifest["config"])
        module = HyMiRec(config, torch.zeros(config.num_items + 1, config.content_dim))
        module.load_state_dict(state)
    else:
        config = SASRecConfig(**manifest["config"])
        module = SASRec(config)
        module.load_state_dict({k.removeprefix("0."): v for k, v in state.items() if k.startswith("0.")})
    return LoadedModel(version, manifest, catalogue, module.eval())
