"""The named runs of ``hymirec eval`` and ``hymirec train``: a model kind and its overrides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from model.catalogue import Catalogue
from trainer.evaluate import RankingModel
from trainer.models import ChosenOnValidation, HyMiRecModel, Popularity, SASRecModel


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
          progress: bool = False, phase1_cache: dict | None = None) -> RankingModel:
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
        def candidate(name: str) -> Callable[[], RankingModel]:
            return lambda: build(RUNS[name], catalogue, settings, device, backbone, item_encoder, epochs, content,
                                 progress, phase1_cache)

        model = ChosenOnValidation([(name, candidate(name)) for name in run.among], torch.initial_seed())
    else:
        raise HymirecError(f"unknown model {run.kind!r}; expected one of {', '.join(RUNS)}")
    model.name = run.name
    return model


def item_encoder_name(item_encoder: str | None, backbone: str | None, settings: Settings) -> str:
    """HyMiRec's content encoder: the one asked for, else HYMIREC_ITEM_ENCODER, else the backbone."""
    return item_encoder or settings.item_encoder or backbone or "tiny"
