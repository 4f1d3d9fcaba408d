"""Several workers in one consumer group, on the real broker and one LanceDB directory.

Three workers over 12 partitions (sharing a LanceDB directory, or a bucket of the project's own S3
server) serve a published model while a log is replayed; the worker that
writes the shared tables (the owner of the catalogue topic's one partition) is killed with kill -9
mid-replay, new catalogue items arrive after it died, and a fourth worker joins later. Then:
every user's history equals the log, the items and item-vector tables hold each item once (the new
items included, so the role was handed over), and every live worker gives the same answer for any
user, whichever shard holds that user.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from hymirec.procs import ManagedProcess, settings_env, worker_health
from hymirec.settings import Settings
from serving.reader import open_own, ready_versions
from store import Store
from store.schemas import ITEMS, item_vectors_schema

from helpers import http_get, model_settings, private_worker, produce, publish, wait_for, world  # noqa: F401 — world: fixture
from test_exactness import assert_exact, replaying, topics_for
from test_reliability import applied, event, expected_histories, wait, worker

pytestmark = [pytest.mark.reliability, pytest.mark.broker]

WORKERS = 3
NEW_ITEMS = 12


def member(s: Settings, tmp_path: Path, name: str) -> Settings:
    """Another worker of the group: its own web port and Faust state."""
    return s.model_copy(update={"web_port": private_worker(s, tmp_path).web_port, "worker_dir": tmp_path / name})


def item_records(s: Settings, rows: list[dict]) -> list[tuple]:
    return [(s.topic_items, r["item_id"].encode(), json.dumps(r).encode()) for r in rows]


def duplicates(values: list[str]) -> list[str]:
    return sorted({v for v in values if values.count(v) > 1})


@pytest.mark.parametrize("lancedb", ["directory", "s3"])
def test_three_workers_one_killed_a_fourth_joining_lose_nothing_and_share_one_writer(broker_settings, world, tmp_path,
                                                                                     lancedb, request):
    overrides = model_settings("").model_dump(include={"codebook_size", "codebook_levels", "num_interests"})
    if lancedb == "s3":  # the project's own S3 server: no volume shared between the workers
        overrides |= request.getfixturevalue("s3_settings").model_dump(
            include={"lancedb_uri", "s3_endpoint", "s3_region", "s3_access_key_id", "s3_secret_access_key"})
    s = topics_for(broker_settings, tmp_path, 12).model_copy(update=overrides)
    publish(s, world["m1"])
    catalogue = world["items"][["item_id", "text", "category"]].to_dict("records")
    produce(s, item_records(s, catalogue))
    rng = random.Random(5)
    item_ids = [r["item_id"] for r in catalogue]
    events = [event(f"u{rng.randrange(90)}", rng.choice(item_ids), 1_700_000_000_000 + i, f"e{i}") for i in range(4000)]
    log_file = tmp_path / "log.jsonl"
    log_file.write_text("".join(json.dumps(e) + "\n" for e in events))
    fresh = [{"item_id": f"fresh-{j}", "text": f"{catalogue[j]['text']} deluxe", "category": None} for j in range(NEW_ITEMS)]

    members = [s] + [member(s, tmp_path, f"w{i}") for i in range(1, WORKERS + 1)]
    with ExitStack() as stack:
        procs = [stack.enter_context(worker(m, tmp_path / f"w{i}.log")) for i, m in enumerate(members[:WORKERS])]
        live = dict(zip(range(WORKERS), procs))
        wait("every worker serving v0001",
             lambda: all((worker_health(members[i]) or {}).get("model_version") == "v0001" for i in live), procs[0])

        with replaying(s, log_file, rate=120):  # ~33 s: the joiner comes while events still arrive
            wait("a quarter of the replay applied", lambda: sum(applied(members[i]) for i in live) >= len(events) // 4,
                 procs[0])
            writers = [i for i in live if worker_health(members[i])["writes_catalogue"]]
            assert len(writers) == 1, f"catalogue writers: {writers}"
            victim = live.pop(writers[0])
            os.killpg(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait(10)
            produce(s, item_records(s, fresh))  # only a new writer can embed these
            joiner = stack.enter_context(worker(members[WORKERS], tmp_path / "joiner.log"))
            live[WORKERS] = joiner
            wait_for("the fourth worker owning partitions", lambda: (worker_health(members[WORKERS]) or {}).get(
                "partitions"), joiner.proc, joiner.log_path)
            joined_at = sum(applied(members[i]) for i in live)

        assert joined_at < len(events), "the replay ended before the fourth worker joined"
        survivor = next(iter(live.values()))
        assert_exact(s, survivor, events, 0)
        assert sum(1 for i in live if worker_health(members[i])["writes_catalogue"]) == 1

        store = Store(s)
        items = store.table(ITEMS).to_arrow()["item_id"].to_pylist()
        assert not duplicates(items) and set(items) == set(item_ids) | {r["item_id"] for r in fresh}
        vectors = open_own(store.db, ready_versions(store)["v0001"]["vectors_table"],
                           item_vectors_schema(s.embedding_dim))
        wait("the new items' vectors", lambda: vectors.count_rows("item_id LIKE 'fresh-%'") == NEW_ITEMS, survivor)
        ids = vectors.to_arrow()["item_id"].to_pylist()
        assert not duplicates(ids) and set(ids) == set(items)

        # The writer recounts the blend's signals on a timer and the shard owners refresh interests,
        # so answers agree once a moment passes without either.
        users = sorted(expected_histories(events))[:8]

        def agreed() -> list[dict] | None:
            answers = [[json.loads(http_get(members[i], f"/recommend/{u}?k=5")) for u in users] for i in live]
            return answers[0] if all(got == answers[0] for got in answers) else None

        first = wait("every worker giving the same answers", agreed, survivor)
        assert all(a["model_version"] == "v0001" and len(a["items"]) == 5 for a in first)


def test_a_catalogue_topic_of_several_partitions_is_refused(broker_settings, tmp_path):
    """A topic created before the catalogue had one partition: several workers would write the shared
    tables, so the worker stops with what to do instead of starting."""
    suffix = uuid.uuid4().hex[:10]
    s = private_worker(broker_settings, tmp_path, app_id=f"hymirec-legacy-{suffix}",
                       **{name: f"{name.removeprefix('topic_')}-{suffix}" for name in
                          ("topic_interactions", "topic_items", "topic_model_versions", "topic_dead_letter")})
    admin = KafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(s.topic_items, num_partitions=4, replication_factor=1)])
    finally:
        admin.close()
    faust = str(Path(sys.executable).with_name("faust"))
    with ManagedProcess([faust, "-A", "stream.app", "worker", "-l", "info"], log_path=tmp_path / "w.log",
                        env=settings_env(s)) as proc:
        proc.proc.wait(120)
        assert proc.proc.returncode != 0
        assert f"topic {s.topic_items!r} has more than one partition" in proc.tail(200)
