"""LanceDB on s3:// against the project's own S3 server (versitygw, `store.s3server`): the store and the
registry round trip, two writers racing on one table, the worker, a trainer cycle and `hymirec topk` end
to end, and the secret kept out of every repr, listing and log.

The server's buckets are plain folders under ``s3_home/data``: a test that finds a table's files there
knows the bytes went through S3, not to a local directory.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import private_worker, produce, running_worker, tail, wait_for, worker_env
from hymirec.cli import main
from hymirec.procs import worker_health
from hymirec.settings import Settings
from store import CorruptArtifact, ModelRegistry, Store
from store.objectstore import bucket_and_prefix, s3_filesystem, storage_options
from store.schemas import HISTORIES, REGISTRY, shard_table
from store.tables import connect

RACE_ROUNDS = 20
RACE_USERS = 3  # each writer's own new users per round, besides the one user both write


def served_folder(settings: Settings) -> Path:
    """The folder the local server keeps ``settings.lancedb_uri`` in."""
    bucket, prefix = bucket_and_prefix(settings.lancedb_uri)
    return Path(settings.s3_home) / "data" / bucket / prefix


def secret(settings: Settings) -> str:
    return settings.s3_secret_access_key.get_secret_value()


# --- settings ------------------------------------------------------------------------------------
def test_storage_options_follow_the_settings(monkeypatch, capsys):
    s = Settings(lancedb_uri="s3://b/db", s3_endpoint="http://127.0.0.1:7070/", s3_access_key_id="k",
                 s3_secret_access_key="s3cr3t-value")
    assert storage_options(s) == {"aws_region": "us-east-1", "aws_endpoint": "http://127.0.0.1:7070",
                                  "allow_http": "true", "aws_access_key_id": "k", "aws_secret_access_key": "s3cr3t-value"}
    # AWS itself: no endpoint, no keys given -> only what lance cannot find out alone
    assert storage_options(Settings(lancedb_uri="s3://b/db")) == {}
    assert storage_options(Settings(lancedb_uri="s3://b/db", s3_endpoint="https://s3.example.com",
                                    s3_region="eu-west-1")) == {"aws_region": "eu-west-1", "aws_endpoint": "https://s3.example.com"}
    assert storage_options(s.model_copy(update={"lancedb_uri": "data/lancedb"})) == {}
    with pytest.raises(ValueError, match="http:// or https://"):
        Settings(s3_endpoint="127.0.0.1:7070")

    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(s)
    monkeypatch.setenv("HYMIREC_S3_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert main(["settings"]) == 0
    listing = capsys.readouterr().out
    assert "HYMIREC_S3_SECRET_ACCESS_KEY=**********" in listing and "s3cr3t-value" not in listing


def test_s3_bucket_with_keys_the_running_server_refuses_is_one_line(s3_settings: Settings, capsys, monkeypatch):
    """`hymirec s3 start` again with a new secret while the first server runs (it keeps its keys)."""
    monkeypatch.setenv("HYMIREC_LANCEDB_URI", s3_settings.lancedb_uri)
    monkeypatch.setenv("HYMIREC_S3_ENDPOINT", s3_settings.s3_endpoint)
    monkeypatch.setenv("HYMIREC_S3_ACCESS_KEY_ID", s3_settings.s3_access_key_id)
    monkeypatch.setenv("HYMIREC_S3_SECRET_ACCESS_KEY", "not-the-servers-secret")
    assert main(["s3", "bucket"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "refused HYMIREC_S3_ACCESS_KEY_ID / HYMIREC_S3_SECRET_ACCESS_KEY" in err and "hymirec s3 stop" in err
    assert "not-the-servers-secret" not in err and secret(s3_settings) not in err


# --- store and registry --------------------------------------------------------------------------
def test_store_round_trip_on_s3(s3_settings: Settings):
    store = Store(s3_settings)
    rows = [{"user_id": f"u{i}", "history_item_ids": [str(i), str(i + 1)], "recent_item_ids": [str(i + 1)]}
            for i in range(5)]
    assert store.upsert_histories(1, rows, position=41) == 6  # and the shard's position row
    store.upsert_items([{"item_id": str(i), "text": f"item {i}"} for i in range(6)])

    again = Store(s3_settings)  # a fresh connection reads what the first wrote
    got, position = again.get_histories_and_position([f"u{i}" for i in range(5)], 1)
    assert position == 41
    assert {u: r["history_item_ids"] for u, r in got.items()} == {f"u{i}": [str(i), str(i + 1)] for i in range(5)}
    assert again.table_counts() == {shard_table(HISTORIES, 1): 5, "items": 6}
    assert (served_folder(s3_settings) / f"{shard_table(HISTORIES, 1)}.lance" / "_versions").is_dir()


def test_registry_round_trip_on_s3(s3_settings: Settings):
    registry = ModelRegistry(s3_settings)
    v1 = registry.publish({"weights.bin": b"\x01" * 1000, "config.json": b"{}"}, {"model": "test"})
    v2 = registry.publish({"weights.bin": b"\x02" * 1000, "config.json": b"{}"}, {"model": "test"}, parent=v1.version)
    assert (v1.version, v2.version, v2.parent) == ("v0001", "v0002", "v0001")
    assert v2.path == f"{s3_settings.lancedb_uri}/models/v0002"

    reader = ModelRegistry(s3_settings)
    assert reader.latest() == v2 and [v.version for v in reader.list()] == ["v0001", "v0002"]
    manifest, files = reader.load("v0002")
    assert files == {"weights.bin": b"\x02" * 1000, "config.json": b"{}"} and manifest["parent"] == "v0001"
    assert Store(s3_settings).table_counts()[REGISTRY] == 2

    # Overwritten through S3 by someone else: the registry reads it back and refuses it.
    assert (served_folder(s3_settings) / "models" / "v0001" / "weights.bin").read_bytes() == b"\x01" * 1000
    with s3_filesystem(s3_settings).open_output_stream(f"{s3_settings.lancedb_uri[5:]}/models/v0001/weights.bin") as out:
        out.write(b"\x03" * 1000)
    with pytest.raises(CorruptArtifact, match="weights.bin does not match its sha256"):
        reader.load("v0001")


# --- two writers, one table ----------------------------------------------------------------------
def _race_writer(overrides: dict, writer: str, barrier, errors) -> None:
    """One racing process: each round, at the barrier, one merge_insert of its own new users and a new
    user both write, plus the shard's position row when ``overrides`` asks for it (as the worker's
    batches have)."""
    try:
        with_position = overrides.pop("with_position")
        store = Store(Settings(**overrides))
        for r in range(RACE_ROUNDS):
            rows = [{"user_id": f"{writer}-{r}-{i}", "history_item_ids": [writer]} for i in range(RACE_USERS)]
            rows.append({"user_id": f"both-{r}", "history_item_ids": [writer]})
            barrier.wait(timeout=60)
            store.upsert_histories(0, rows, position=r if with_position else None)
    except BaseException as exc:  # reported to the test, which fails on it
        errors.put(f"{writer}: {type(exc).__name__}: {exc}")
        raise


def race(settings: Settings, writer, **extra) -> list[str]:
    """Run two ``writer`` processes (spawned: lancedb's runtime does not survive a fork); their errors."""
    overrides = {"lancedb_uri": settings.lancedb_uri, "s3_endpoint": settings.s3_endpoint,
                 "s3_access_key_id": settings.s3_access_key_id, "s3_secret_access_key": secret(settings), **extra}
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(dict(overrides), name, barrier, errors)) for name in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(240)
        if proc.is_alive():
            proc.kill()
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found + [f"exit {proc.exitcode}" for proc in procs if proc.exitcode != 0]


def raced_shard(settings: Settings, with_position: bool) -> list[str]:
    """Race two writers on shard 0 (created beforehand: creating is not what is raced); its user ids."""
    Store(settings).upsert_histories(0, [{"user_id": "first"}], position=-1 if with_position else None)
    errors = race(settings, _race_writer, with_position=with_position)
    assert not errors, errors
    ids = connect(settings).open_table(shard_table(HISTORIES, 0)).to_arrow().column("user_id").to_pylist()
    for writer in "ab":  # a lost commit would lose one round of one writer's users
        assert {i for i in ids if i.startswith(f"{writer}-")} == {
            f"{writer}-{r}-{i}" for r in range(RACE_ROUNDS) for i in range(RACE_USERS)}
    assert {i for i in ids if i.startswith("both-")} == {f"both-{r}" for r in range(RACE_ROUNDS)}
    return ids


def test_two_writers_of_worker_batches_lose_no_commit_and_duplicate_no_user(s3_settings: Settings):
    """Both processes commit every round at once. The server's conditional PUT of the manifest makes
    one of them retry on the other's version (no lost commit); updating the same existing row (the
    shard's position, in every batch) makes the two commits conflict, so the retry re-plans against
    the other's rows and sees its new users too (no duplicate)."""
    ids = raced_shard(s3_settings, with_position=True)
    dupes = [key for key, n in Counter(ids).items() if n > 1]
    assert not dupes, f"{len(dupes)} users twice: {dupes[:5]}"
    _, position = Store(s3_settings).get_histories_and_position([], 0)
    assert position == RACE_ROUNDS - 1
    table = connect(s3_settings).open_table(shard_table(HISTORIES, 0))
    assert len(table.list_versions()) >= 1 + 2 * RACE_ROUNDS  # every merge_insert committed a version


def test_two_writers_inserting_only_new_keys_store_each_once(s3_settings: Settings):
    """Two merge_inserts that only insert commit as two appends touching no common fragment, so
    lance's fragment check alone lets both through with the same new key (lance #4585). The store
    declares the key lance's primary key and joins without the key's index (``store.tables.merge``):
    lance then records the inserted keys and the second commit conflicts and is planned again."""
    ids = raced_shard(s3_settings, with_position=False)
    dupes = [key for key, n in Counter(ids).items() if n > 1]
    assert not dupes, f"{len(dupes)} users twice: {dupes[:5]}"


# --- end to end ----------------------------------------------------------------------------------
def test_worker_trainer_and_topk_on_s3(topic_settings: Settings, s3_settings: Settings, tmp_path: Path):
    """A real broker and worker writing to s3://, `hymirec topk` reading it, a trainer cycle publishing
    into the registry there and the worker hot-swapping to it; the secret in no log."""
    s = private_worker(topic_settings, tmp_path, popularity_refresh_s=1.0, codebook_size=16, codebook_levels=2,
                       trainer_epochs=1, trainer_bootstrap_epochs=1,
                       **{k: getattr(s3_settings, k) for k in
                          ("lancedb_uri", "s3_endpoint", "s3_access_key_id", "s3_secret_access_key", "s3_home")})
    log_file = tmp_path / "worker.log"
    items = [(s.topic_items, str(i).encode(), json.dumps({"item_id": str(i), "text": f"item {i}"}).encode())
             for i in range(30)]
    # Everybody but u0 saw 5, 6 and 7 (and a few of 10..29): the popular items, which u0 has not seen.
    log = [("u0", str(i)) for i in range(3)] + [
        (f"u{n}", str(i)) for n in range(1, 13) for i in (5, 6, 7, *((n * 5 + k) % 20 + 10 for k in range(5)))]
    events = [(s.topic_interactions, u.encode(), json.dumps({"user_id": u, "item_id": i, "ts": 1_000 + n}).encode())
              for n, (u, i) in enumerate(log)]

    def topk(user: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "hymirec.cli", "topk", user, "--k", "3", "--json"],
                             capture_output=True, text=True, env=worker_env(s), timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    with running_worker(s, log_file) as proc:
        produce(s, items + events)
        store = Store(s)
        rows = wait_for("every user's history on s3://", lambda: (lambda got: got if len(got) == 13 else None)(
            store.get_histories([u for u, _ in log])), proc, log_file, deadline_s=90)
        assert rows["u0"]["history_item_ids"] == ["0", "1", "2"]
        assert any((served_folder(s) / f"{shard_table(HISTORIES, p)}.lance").is_dir() for p in range(s.partitions))
        wait_for("topk u0 from the popular items on s3://",
                 lambda: {item["item_id"] for item in topk("u0")["items"]} == {"5", "6", "7"}, proc, log_file,
                 deadline_s=90, interval=2)

        trainer = subprocess.run([sys.executable, "-m", "hymirec.cli", "trainer", "--once", "--margin", "1"],
                                 capture_output=True, text=True, env=worker_env(s), timeout=300)
        assert trainer.returncode == 0, trainer.stderr[-2000:]
        assert (served_folder(s) / "models" / "v0001" / "manifest.json").is_file()
        wait_for("the worker to serve v0001 from s3://", lambda: (worker_health(s) or {}).get("model_version") == "v0001",
                 proc, log_file, deadline_s=120)
        answer = topk("u0")
        assert answer["model_version"] == "v0001" and answer["fallback"] is None and len(answer["items"]) == 3
    logs = log_file.read_text(errors="replace") + trainer.stdout + trainer.stderr
    assert secret(s) not in logs, "the S3 secret is in a log"
    assert secret(s) not in tail(Path(s.s3_home) / "server.out", 200)
