"""Benchmarks apart from tests: `hymirec bench {ingest,freshness,topk,codebook,train,memory,all} [--quick|--full] [--out DIR]`.

One module per benchmark, each with ``run(settings, options) -> bench.report.Result``; the runner
(``bench.runner``) prints each result and writes it as JSON and Markdown, with the machine, the
versions, the parameters and the DESIGN §7 targets (met / missed by how much). A timed figure judged
against a target is the median of ``Options.repeat`` runs, its min–max beside it; the load around each
benchmark is recorded with it and a busy machine flagged (``bench.loadwatch``).

Also here, as it drives the whole system the same way: ``bench.simulate`` (`hymirec simulate`), the
prequential frozen-vs-online experiment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    quick: bool = False  # small sizes: every benchmark in a few minutes on 2 cores
    full: bool = False  # the largest sizes (topk at 1M items, longer streams, memory at 100k users)
    sizes: tuple[int, ...] | None = None  # topk: item counts instead of the defaults
    repeat: int = 3  # runs of each timed figure judged against a DESIGN §7 target (the median is judged)
