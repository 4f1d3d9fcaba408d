"""store.layout: a LanceDB directory keeps the partition count its user shards were written with."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hymirec import cli
from hymirec.errors import HymirecError
from hymirec.settings import Settings
from store import Store
from store.layout import check_layout, claim_layout, recorded_partitions

from helpers import worker_env

ROOT = Path(__file__).resolve().parents[1]


def store_of(tmp_path: Path, partitions: int) -> Store:
    return Store(Settings(lancedb_uri=str(tmp_path / "db"), partitions=partitions))


def write_shards(store: Store, shards: range, *, interests: bool = False) -> None:
    """One user and the applied position in each shard (or one user's interests)."""
    for shard in shards:
        if interests:
            store.upsert_interests(shard, [{"user_id": f"u{shard}", "interests": [[1.0] * store.settings.embedding_dim]}])
        else:
            store.upsert_histories(shard, [{"user_id": f"u{shard}", "history_item_ids": ["i1"], "event_count": 1}],
                                   position=0)


def layout_error(store: Store) -> str:
    with pytest.raises(HymirecError) as raised:
        check_layout(store)
    return str(raised.value)


def test_a_fresh_store_passes_and_the_first_claim_records_the_count(tmp_path):
    store = store_of(tmp_path, 4)
    check_layout(store)
    assert recorded_partitions(store) is None
    claim_layout(store)
    assert recorded_partitions(store) == 4


def test_the_same_count_passes(tmp_path):
    claim_layout(store_of(tmp_path, 4))
    write_shards(store_of(tmp_path, 4), range(4))
    claim_layout(store_of(tmp_path, 4))
    assert recorded_partitions(store_of(tmp_path, 4)) == 4


def test_another_count_is_refused_with_both_counts_and_the_fix(tmp_path):
    claim_layout(store_of(tmp_path, 4))
    write_shards(store_of(tmp_path, 4), range(4))
    store = store_of(tmp_path, 12)
    message = layout_error(store)
    assert f"LanceDB at {tmp_path / 'db'}" in message
    assert "4 partitions (p000..p003)" in message and "HYMIREC_PARTITIONS is 12" in message
    assert "run with HYMIREC_PARTITIONS=4" in message and "empty LanceDB directory" in message
    with pytest.raises(HymirecError):
        claim_layout(store)
    assert recorded_partitions(store) == 4  # a refused claim records nothing
    assert "HYMIREC_PARTITIONS is 2" in layout_error(store_of(tmp_path, 2))


def test_partitions_without_shards_yet_are_told_apart_from_fewer_partitions(tmp_path):
    """Shards p000..p001 under 12 partitions: the rest had no events yet. The record says so."""
    claim_layout(store_of(tmp_path, 12))
    write_shards(store_of(tmp_path, 12), range(2))
    check_layout(store_of(tmp_path, 12))
    message = layout_error(store_of(tmp_path, 4))
    assert "12 partitions (p000..p001)" in message and "HYMIREC_PARTITIONS=12" in message


def test_before_any_user_shard_the_count_may_change(tmp_path):
    claim_layout(store_of(tmp_path, 12))
    store_of(tmp_path, 12).upsert_items([{"item_id": "i1"}])  # not user state
    claim_layout(store_of(tmp_path, 4))
    assert recorded_partitions(store_of(tmp_path, 4)) == 4


def test_a_store_without_a_record_is_judged_by_its_shards(tmp_path):
    """Written before the record existed: a shard beyond the count gives it away, interests too."""
    write_shards(store_of(tmp_path, 12), range(3))
    write_shards(store_of(tmp_path, 12), range(11, 12), interests=True)
    message = layout_error(store_of(tmp_path, 4))
    assert "at least 12 partitions (p000..p011)" in message and "HYMIREC_PARTITIONS is 4" in message
    claim_layout(store_of(tmp_path, 12))
    assert recorded_partitions(store_of(tmp_path, 12)) == 12


def test_a_shard_beyond_the_record_is_refused(tmp_path):
    """The topic grew under a worker of the recorded count: its users are split already."""
    claim_layout(store_of(tmp_path, 4))
    write_shards(store_of(tmp_path, 4), range(6))
    assert "at least 6 partitions" in layout_error(store_of(tmp_path, 4))


def test_hymirec_status_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    claim_layout(store_of(tmp_path, 4))
    write_shards(store_of(tmp_path, 4), range(4))
    monkeypatch.setenv("HYMIREC_LANCEDB_URI", str(tmp_path / "db"))
    monkeypatch.setenv("HYMIREC_PARTITIONS", "12")
    monkeypatch.setenv("HYMIREC_KAFKA_BOOTSTRAP", "127.0.0.1:9")  # refused: the layout is checked first
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hymirec: error: LanceDB at") and "HYMIREC_PARTITIONS=4" in err[0]


def test_the_worker_refuses_to_start(tmp_path):
    """`faust -A stream.app worker` exits at import, before it contacts a broker (about 5 s)."""
    claim_layout(store_of(tmp_path, 4))
    write_shards(store_of(tmp_path, 4), range(4))
    settings = Settings(lancedb_uri=str(tmp_path / "db"), partitions=12, worker_dir=tmp_path / "worker",
                        kafka_bootstrap="127.0.0.1:9")
    faust = str(Path(sys.executable).with_name("faust"))
    result = subprocess.run([faust, "-A", "stream.app", "worker"], cwd=ROOT, env=worker_env(settings),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("hymirec worker: error: LanceDB at")
    assert "Traceback" not in result.stderr


ROUNDS = 6
CLAIMER = """
import sys, time
from hymirec.settings import Settings
from store import Store
from store.layout import claim_layout
for round in range(int(sys.argv[3])):  # each round a new directory, all claimers at the same moment
    time.sleep(max(0.0, float(sys.argv[2]) + round * 0.5 - time.time()))
    claim_layout(Store(Settings(lancedb_uri=f"{sys.argv[1]}/db{round}", partitions=12)))
"""


def test_workers_starting_together_all_claim_the_layout(tmp_path):
    """A group's workers start at once: the losers of LanceDB's commit race check again, none fails
    (without the retry, about one round in three failed here)."""
    start = time.time() + 4.0  # after every interpreter has imported lancedb
    claimers = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path), str(start), str(ROUNDS)], cwd=ROOT,
                                 env=worker_env(Settings()), stderr=subprocess.PIPE, text=True) for _ in range(4)]
    failures = [err for proc in claimers if (err := proc.communicate(timeout=120)[1]) and proc.returncode != 0]
    assert not failures, failures[0][-2000:]
    assert all(recorded_partitions(Store(Settings(lancedb_uri=str(tmp_path / f"db{r}")))) == 12 for r in range(ROUNDS))
