"""topk: query latency and ANN recall@10 against exact search, flat vs indexed, in LanceDB.

Synthetic clustered vectors (unit centres in 64-d, Gaussian noise, normalised) go into the
product's ``items`` table through ``store.Store`` (the same schema and writer the worker uses), then
each configuration answers the same single-vector queries with cosine distance, as the serving
path does: flat (no index), IVF_HNSW_SQ (num_partitions = rows // 4096, the serving worker's rule)
and IVF_PQ, each with a few (nprobes, ef, refine_factor) settings. Exact neighbours come from numpy.
Each LanceDB configuration's queries run ``Options.repeat`` times: its latencies are the medians of
the runs' percentiles, with every run's p50 beside them (recall is the same in every run).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench import Options
from bench.report import Result, not_measured, percentiles, repeated, target
from hymirec.settings import Settings
from store import Store
from store.schemas import ITEMS

K = 10
CLUSTERS = 256
NOISE = 0.5  # norm of the noise added to a unit centre: cosine to its centre ≈ 0.9
WARM_UP = 5
TARGET_SIZE = 100_000
TARGET_P50_MS, TARGET_RECALL = 10.0, 0.95
# (label, query settings) per index; None = LanceDB's default for that index.
HNSW_QUERIES = [{}, {"nprobes": 4, "ef": 64}, {"nprobes": 12, "ef": 128}, {"nprobes": 4, "ef": 64, "refine_factor": 4}]
PQ_QUERIES = [{"nprobes": 10}, {"nprobes": 10, "refine_factor": 10}, {"nprobes": 40, "refine_factor": 10}]


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """n unit vectors [n, dim] float32 around random ``centres``."""
    x = centres[rng.integers(len(centres), size=n)] + NOISE * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Indices [Q, k] of the k highest cosines (vectors and queries are unit)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        s = queries @ vectors[start : start + chunk].T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def load(store: Store, vectors: np.ndarray, chunk: int = 100_000) -> float:
    """Write the vectors as items ``0..n-1`` (one merge_insert per chunk), then compact; seconds."""
    started = time.perf_counter()
    dim = vectors.shape[1]
    for start in range(0, len(vectors), chunk):
        part = vectors[start : start + chunk]
        ids = pa.array([str(i) for i in range(start, start + len(part))])
        store.upsert_items(pa.table({"item_id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), dim)}))
    store.optimize([ITEMS])
    return time.perf_counter() - started


def measure(table, queries: np.ndarray, truth: np.ndarray, query: dict) -> dict:
    """p50/p95 latency (ms) and mean recall@K of one query configuration."""
    latencies, recalls = [], []
    for i, q in enumerate(queries):
        started = time.perf_counter()
        builder = table.search(q).distance_type("cosine").limit(K).select(["item_id", "_distance"])
        for name, value in query.items():
            builder = getattr(builder, name)(value)
        found = builder.to_arrow()["item_id"].to_pylist()
        latencies.append(time.perf_counter() - started)
        recalls.append(len({int(x) for x in found} & set(truth[i].tolist())) / K)
    ms = percentiles([t * 1000 for t in latencies[WARM_UP:]], (50, 95))
    return {"p50_ms": round(ms["p50"], 2), "p95_ms": round(ms["p95"], 2), "recall@10": round(float(np.mean(recalls)), 4)}


def measure_repeated(table, queries: np.ndarray, truth: np.ndarray, query: dict, repeat: int) -> dict:
    """``measure`` ``repeat`` times: the medians of p50 and p95, each run's p50 (``p50_ms_runs``)."""
    runs = [measure(table, queries, truth, query) for _ in range(repeat)]
    return {"p50_ms": round(repeated(r["p50_ms"] for r in runs)["median"], 2),
            "p95_ms": round(repeated(r["p95_ms"] for r in runs)["median"], 2),
            "recall@10": runs[0]["recall@10"], "p50_ms_runs": [r["p50_ms"] for r in runs]}


def numpy_latency(vectors: np.ndarray, queries: np.ndarray) -> dict:
    latencies = []
    for q in queries:
        started = time.perf_counter()
        s = vectors @ q
        np.argpartition(-s, K)[:K]
        latencies.append(time.perf_counter() - started)
    ms = percentiles([t * 1000 for t in latencies[WARM_UP:]], (50, 95))
    return {"p50_ms": round(ms["p50"], 2), "p95_ms": round(ms["p95"], 2), "recall@10": 1.0}


def describe(query: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in query.items()) or "LanceDB defaults"


def bench_size(settings: Settings, workdir: Path, n: int, queries_n: int, seed: int,
               repeat: int = 1) -> tuple[list[dict], float]:
    """The rows of every configuration at n items, and the seconds to load (and compact) the table."""
    rng = np.random.default_rng(seed)
    dim = settings.embedding_dim
    centres = rng.standard_normal((CLUSTERS, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors, queries = clustered(n, dim, rng, centres), clustered(queries_n + WARM_UP, dim, rng, centres)
    truth = exact_topk(vectors, queries, K)
    store = Store(settings.model_copy(update={"lancedb_uri": str(workdir / f"topk-{n}")}))
    load_s = load(store, vectors)
    table = store.table(ITEMS)
    rows = [{"items": n, "index": "numpy exact (in-process reference)", "index_params": "", "query_params": "",
             "build_s": None, **numpy_latency(vectors, queries), "p50_ms_runs": []},
            {"items": n, "index": "flat (LanceDB, no index)", "index_params": "", "query_params": "",
             "build_s": None, **measure_repeated(table, queries, truth, {}, repeat)}]
    hnsw = {"index_type": "IVF_HNSW_SQ", "num_partitions": max(1, n // 4096), "m": 20, "ef_construction": 300}
    pq = {"index_type": "IVF_PQ", "num_partitions": max(1, int(np.sqrt(n))), "num_sub_vectors": dim // 4}
    for index, queries_cfg in ((hnsw, HNSW_QUERIES), (pq, PQ_QUERIES)):
        started = time.perf_counter()
        table.create_index(metric="cosine", vector_column_name="vector", replace=True, **index)
        build_s = round(time.perf_counter() - started, 1)
        params = ", ".join(f"{k}={v}" for k, v in index.items() if k != "index_type")
        for query in queries_cfg:
            rows.append({"items": n, "index": index["index_type"], "index_params": params, "query_params": describe(query),
                         "build_s": build_s, **measure_repeated(table, queries, truth, query, repeat)})
    return rows, load_s


def run(settings: Settings, opts: Options) -> Result:
    sizes = list(opts.sizes or [10_000, 100_000] + ([1_000_000] if opts.full else []))
    queries_n = 100 if opts.quick else 500
    rows: list[dict] = []
    load_s: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-topk-") as tmp:
        for n in sizes:
            size_rows, load_s[n] = bench_size(settings, Path(tmp), n, queries_n, settings.seed, opts.repeat)
            rows += size_rows

    at = [r for r in rows if r["items"] == TARGET_SIZE and r["index"] in ("IVF_HNSW_SQ", "IVF_PQ")]
    if at:
        good = [r for r in at if r["recall@10"] >= TARGET_RECALL]
        best = min(good, key=lambda r: r["p50_ms"]) if good else max(at, key=lambda r: r["recall@10"])
        which = f"{best['index']} ({best['index_params']}; {best['query_params']})"
        targets = [
            target("top-k p50 at 100k items", repeated(best["p50_ms_runs"]), TARGET_P50_MS, at_least=False, unit=" ms",
                   note=f"fastest config with recall@10 ≥ {TARGET_RECALL}: {which}" if good
                   else f"no config reached recall@10 {TARGET_RECALL}; best recall: {which}"),
            target("ANN recall@10 vs exact at 100k items", best["recall@10"], TARGET_RECALL, at_least=True, note=which),
        ]
    else:
        targets = [not_measured("top-k p50 / recall@10 at 100k items", f"100k not among the sizes run ({sizes})")]
    return Result(
        name="topk", title="Top-k: LanceDB query latency and ANN recall@10",
        params={"sizes": sizes, "dim": settings.embedding_dim, "clusters": CLUSTERS, "noise_norm": NOISE, "k": K,
                "queries": queries_n, "warm_up_queries": WARM_UP, "repeat": opts.repeat, "metric": "cosine",
                "seed": settings.seed},
        rows=rows, targets=targets,
        extra={"table_load_and_compaction_s": {n: round(t, 1) for n, t in load_s.items()}},
        notes=["One query vector per search (the serving path sends a user's K interests in one call).",
               "Latency is one search() round trip from Python, results as Arrow, after warm-up queries.",
               "build_s: time to build that index on the loaded table.",
               f"p50_ms / p95_ms: medians over {opts.repeat} runs of the queries (--repeat); p50_ms_runs: each run's "
               "p50 (the target's spread). The numpy reference runs once."],
    )
