"""`hymirec bench`: the fast benchmarks run end to end and write what they promise (JSON + Markdown
with machine, versions, parameters and DESIGN targets). Behaviour only: no speed thresholds here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import ingest_profile, loadwatch
from bench.freshness import histogram_quantiles
from bench.gpu_prepare import clear_previous
from bench.harness import catalogue, fill_histories, fresh
from bench.ingest import faust_ceiling, write_log
from bench.report import Result, repeated, reported, target, to_markdown, write
from hymirec.settings import Settings
from store import Store
from serving.reader import shard_hint

from helpers import produce

MACHINE_KEYS = {"cpu_model", "cores", "ram_gib", "load_average_1m", "noisy"}
VERSION_KEYS = {"python", "torch", "lancedb", "kafka_broker", "aiokafka", "faust-streaming"}


def bench(*args: str, out: Path) -> dict:
    """Run `hymirec bench ...` as a user would; the JSON it wrote."""
    cmd = [str(Path(sys.executable).parent / "hymirec"), "bench", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = args[0]
    assert (out / f"{name}.md").is_file()
    result = json.loads((out / f"{name}.json").read_text())
    assert result["name"] == name
    assert MACHINE_KEYS <= set(result["machine"]) and VERSION_KEYS <= set(result["versions"])
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith(f"# {result['title']}") and "## Targets (DESIGN §7)" in markdown
    assert all(key in markdown for key in result["rows"][0])  # the table's columns
    assert result["rows"][0]["data" if name == "codebook" else "index"] in proc.stdout  # and it was printed
    return result


def test_codebook_quick_reports_bytes_and_cosine(tmp_path: Path):
    result = bench("codebook", "--quick", out=tmp_path)
    synthetic = [r for r in result["rows"] if r["data"].startswith("clustered synthetic")]
    assert len(synthetic) >= 3
    for row in result["rows"]:
        per_item = row["levels"] * (1 if row["size"] <= 256 else 2) + (row["levels"] if row["scale_bits"] else 0)
        assert row["bytes_per_item"] == per_item
        assert row["float32_bytes"] == 4 * 64 and row["x_smaller_than_float32"] == pytest.approx(256 / per_item, abs=0.05)
        assert -1.0 <= row["cosine_heldout"] <= 1.0
    # More levels reconstruct better on the same data.
    by_levels = {r["levels"]: r["cosine_heldout"] for r in synthetic if r["size"] == 256 and r["scale_bits"] == 8}
    assert by_levels[2] < by_levels[4] < by_levels[8]
    verdicts = {t["what"]: t for t in result["targets"]}
    # Recall@10 without the codebook, then with the default (levels, size) and others, on one split.
    (heading, recall), = result["tables"].items()
    assert "Recall@10" in heading and f"## {heading}" in (tmp_path / "codebook.md").read_text()
    assert recall[0]["model"] == "hymirec-nocodebook" and recall[0]["levels"] is None
    assert [(r["levels"], r["size"]) for r in recall[1:]][:3] == [(4, 256), (2, 256), (8, 256)]
    for row in recall:
        assert 0.0 <= row["recall@10"] <= row["recall@50"] <= 1.0
    for row in recall[1:]:
        assert row["bytes_per_item"] == 2 * row["levels"] and 0 < row["reconstruction_cosine"] <= 1
    effect = next(t for w, t in verdicts.items() if "Recall@10" in w)
    assert effect["measured"] == pytest.approx(recall[1]["recall@10"] / recall[0]["recall@10"], abs=1e-3)
    ratio = next(t for w, t in verdicts.items() if "smaller than float32" in w)
    assert ratio["met"] == (synthetic[0]["x_smaller_than_float32"] >= 32)


def test_topk_tiny_compares_flat_and_indexed_against_exact(tmp_path: Path):
    result = bench("topk", "--quick", "--sizes", "1500", out=tmp_path)
    rows = result["rows"]
    assert {r["items"] for r in rows} == {1500}
    assert {r["index"] for r in rows} >= {"IVF_HNSW_SQ", "IVF_PQ"}
    flat = next(r for r in rows if r["index"].startswith("flat"))
    assert flat["recall@10"] >= 0.99  # a flat search is exact
    for row in rows:
        assert 0.0 <= row["recall@10"] <= 1.0 and 0 < row["p50_ms"] <= row["p95_ms"]
    assert all(r["index_params"] for r in rows if r["index"].startswith("IVF"))
    # 100k is not in this run: the target is reported as not measured, not guessed.
    assert [t["verdict"] for t in result["targets"]] == ["not measured"]
    assert result["params"]["sizes"] == [1500]


def test_target_verdicts():
    missed = target("ratio", 0.2, 0.3, at_least=True)
    assert missed["met"] is False and missed["verdict"] == "missed by 33%"
    met = target("p95", 1.5, 2.0, at_least=False, unit=" s")
    assert met["met"] is True and met["verdict"] == "met (margin 25%)" and met["target"] == "≤ 2 s"
    assert target("x", None, 1.0, at_least=True)["verdict"] == "not measured"
    shown = reported("trainer peak RSS (GiB)", 1.23456)
    assert shown["met"] is None and shown["measured"] == 1.2346 and shown["verdict"] == "reported (no target)"
    assert reported("x", None)["verdict"] == "not measured"


def test_filled_histories_read_back_as_the_ingest_path_writes_them(db_settings: Settings):
    """bench.harness.fill_histories (the memory benchmark's store) through the real Store."""
    settings = db_settings.model_copy(update={"partitions": 3, "recent_len": 4})
    store = Store(settings)
    items = catalogue(50)
    codes = np.arange(50 * 3, dtype=np.uint8).reshape(50, 3)  # 3 bytes per item, distinct per item
    rng = np.random.default_rng(0)
    users = [f"user-{j}" for j in range(40)]
    histories = [rng.integers(0, 50, n) for n in rng.integers(1, 12, len(users))]
    shards = fill_histories(store, users, histories, items, codes, "v0007", chunk=7)
    assert shards == {u: shard_hint(u, 3) for u in users} and len(set(shards.values())) == 3
    for user, history in zip(users, histories):
        row = store.get_histories([user], shard=shards[user])[user]
        ids = [str(i) for i in history]
        assert row["history_item_ids"] == ids and row["recent_item_ids"] == ids[-4:]
        assert row["history_codes"] == codes[history].tobytes() and row["codebook_version"] == "v0007"
        assert row["event_count"] == len(ids) and row["watermark_partition"] == shards[user]
        assert row["watermark_offset"] == -1 and row["recent_event_ids"] == []


def test_histogram_quantiles_interpolate_within_buckets():
    # 100 observations: 50 in (0, 0.5], 40 in (0.5, 1], 10 in (1, 2].
    samples = {"lag_bucket": [({"le": "0.5"}, 50.0), ({"le": "1.0"}, 90.0), ({"le": "2.0"}, 100.0), ({"le": "+Inf"}, 100.0)]}
    q = histogram_quantiles(samples, "lag")
    assert q["p50"] == pytest.approx(0.5)
    assert q["p95"] == pytest.approx(1.5)
    assert q["p99"] == pytest.approx(1.9)
    assert histogram_quantiles({}, "lag") == {"p50": None, "p95": None, "p99": None}


def test_gpu_prepare_rerun_removes_what_it_wrote_and_nothing_else(tmp_path: Path):
    written = ["whl/gguf-0.1-py3-none-any.whl", "data/ml-100k-interactions.parquet", "data/ml-100k-items.parquet",
               "cache/item_embeddings/abc.pt", "llm/smollm2-18.gguf"]
    kept = ["data/ml-100k/interactions.jsonl", "data/notes.txt", "cache/other.pt", "llm/mine.gguf", "exp/run.py"]
    for name in written + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    parts = clear_previous(tmp_path)
    assert sorted(parts) == ["cache", "data", "llm", "whl"] and all(p.is_dir() for p in parts.values())
    assert (tmp_path / "cache" / "item_embeddings").is_dir()
    assert not any((tmp_path / name).exists() for name in written)
    assert all((tmp_path / name).read_text() == "x" for name in kept)
    assert clear_previous(tmp_path / "fresh")["whl"].is_dir()  # a first run creates the folders


def test_repeated_figures_judge_the_median_and_show_the_spread():
    runs = repeated([0.31, 0.25, None, 0.4])  # a run that measured nothing is left out
    assert runs["median"] == pytest.approx(0.31) and (runs["min"], runs["max"], runs["runs"]) == (0.25, 0.4, 3)
    assert repeated([]) == {"median": None, "min": None, "max": None, "runs": 0, "values": []}
    assert repeated([2.0, 1.0])["median"] == pytest.approx(1.5)
    row = target("ratio", repeated([0.2, 0.5, 0.35]), 0.3, at_least=True)
    assert row["measured"] == 0.35 and row["met"] is True and row["spread"] == "0.2–0.5" and row["runs"] == 3
    # One slow run among three does not decide the verdict; the median does.
    assert target("p95", repeated([1.2, 9.0, 1.4]), 2.0, at_least=False, unit=" s")["met"] is True
    single = target("p95", 1.5, 2.0, at_least=False)
    assert single["spread"] == "" and single["runs"] == 1
    shown = reported("top-k p95 (s)", repeated([4.0, 5.0, 6.0]))
    assert shown["measured"] == 5.0 and shown["spread"] == "4–6" and shown["verdict"] == "reported (no target)"
    assert target("x", repeated([None]), 1.0, at_least=True)["verdict"] == "not measured"


def test_the_warning_rule_on_a_two_core_machine():
    quiet = loadwatch.record(2, (0.4, 0.6, 0.7), (1.9, 1.2, 0.9), {"before": 0.1, "during": 0.3, "after": 0.2})
    assert quiet["busy"] is False and quiet["warning"] == "" and quiet["cores"] == 2
    assert quiet["load_average_before"] == [0.4, 0.6, 0.7] and quiet["load_average_after"] == [1.9, 1.2, 0.9]
    # The load average before the run above half the cores.
    loaded = loadwatch.record(2, (1.3, 1.0, 1.0), (2.0, 1.5, 1.1), {"before": 0.1, "during": None, "after": 0.1})
    assert loaded["busy"] and "1-minute load average 1.30" in loaded["warning"]
    # Other processes (not this one's tree) took more than a quarter of the cores while it ran.
    others = loadwatch.record(2, (0.2, 0.2, 0.2), (0.9, 0.5, 0.3), {"before": 0.0, "during": 0.8, "after": 0.1})
    assert others["busy"] and others["warning"] == "other processes used 0.80 cores during the run > 0.25 × 2 cores"
    assert "busy if" in others["rule"]
    # pid 3 ended, pid 4 started between the two readings: all of its CPU time counts.
    assert loadwatch.others_cores({1: 10.0, 2: 5.0, 3: 1.0}, {1: 11.0, 2: 5.5, 4: 0.5}, 2.0) == pytest.approx(1.0)


def test_load_watch_counts_its_own_children_out(tmp_path: Path):
    """A child burning CPU inside the watch is this benchmark's own work, not another process's."""
    burn = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        assert burn.pid in loadwatch.own_pids()
        with loadwatch.LoadWatch(sample_s=0.5, every_s=0.5) as watch:
            assert burn.pid not in loadwatch.cpu_seconds_of_others()
    finally:
        burn.wait(10)
    load = watch.record
    assert set(load["others_cores"]) == {"before", "during", "after"} and load["cores"] >= 1
    assert len(load["load_average_before"]) == 3 and isinstance(load["busy"], bool)
    result = Result(name="demo", title="Demo", params={}, rows=[{"a": 1}],
                    targets=[target("ratio", repeated([0.1, 0.2, 0.3]), 0.3, at_least=True)],
                    machine={"cpu_model": "cpu", "cores": 2, "ram_gib": 1, "os": "os", "load_average_1m": 0.1,
                             "noisy": False}, load=load | {"busy": True, "warning": "w"},
                    attachments={"profile.txt": "top functions"})
    markdown = to_markdown(result)
    assert "Load average (1/5/15 min) before" in markdown and "**Warning: the machine was busy** (w)" in markdown
    assert "| spread" in markdown and "0.1–0.3" in markdown
    json_path, _ = write(result, tmp_path)
    written = json.loads(json_path.read_text())
    assert written["load"]["warning"] == "w" and written["attachments"] == ["demo_profile.txt"]
    assert (tmp_path / "demo_profile.txt").read_text() == "top functions"


def test_the_ingest_profile_names_where_the_time_goes(db_settings: Settings, tmp_path: Path):
    write_log(tmp_path / "log.jsonl", 600, seed=0)
    settings = db_settings.model_copy(update={"partitions": 2})
    events = ingest_profile.raw_events((tmp_path / "log.jsonl").read_bytes().splitlines(), settings.partitions)
    assert [e.offset for e in events if e.partition == events[0].partition][:3] == [0, 1, 2]
    assert all(e.partition == shard_hint(e.key.decode(), 2) for e in events)
    stats = ingest_profile.profile_ingest(settings, events, 100, tmp_path / "lancedb", flush_every=250)
    rows = ingest_profile.summary(stats, len(events))
    parts = [r for r in rows if r["part"].startswith(("reading", "writing", "validation"))]
    by_function = {r["function"]: r for r in parts}
    assert set(by_function) == {"get_histories_and_position", "upsert_histories", "_validate"}
    # 6 batches, each read through the cache; writes after 300 and 600 events (2 shards each).
    assert by_function["_validate"]["calls"] == 600 and by_function["upsert_histories"]["calls"] == 2 * 2
    assert by_function["get_histories_and_position"]["calls"] == 6 * 2
    within = [r for r in rows if r["part"].startswith("…")]
    assert [r["function"] for r in within] == ["get_histories_and_position", "execute"]
    assert within[0]["ms_per_1000_events"] <= by_function["get_histories_and_position"]["ms_per_1000_events"]
    total = rows[-1]
    assert total["part"].startswith("total") and total["ms_per_1000_events"] > 0 and total["share"] == 1.0
    assert sum(r["share"] for r in parts) + rows[-2]["share"] == pytest.approx(1.0, abs=0.01)
    text = ingest_profile.top_functions(stats, "heading")
    assert text.startswith("heading") and "prepare_interactions" in text and "write_interactions" in text
    assert Store(settings).get_histories_and_position([], 0)[1] is not None  # the events were written


@pytest.mark.broker
def test_the_faust_ceiling_app_reads_every_event_of_its_topic(broker_settings: Settings, tmp_path: Path):
    s = fresh(broker_settings, tmp_path, "ceiling", batch_size=100, batch_within_s=0.2)
    produce(s, [(s.topic_interactions, f"u{i % 7}".encode(), b'{"any": "bytes"}') for i in range(600)])
    # It returns once /count says all 600 came, in several batches (else no time between the first and last).
    rate = faust_ceiling(s, 600, tmp_path / "ceiling.log")
    assert rate is not None and rate > 0
