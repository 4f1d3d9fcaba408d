"""Kafka SASL (SCRAM-SHA-512) over TLS: the project's own broker with a SASL_SSL listener and a CA made for
this test, and every kind of client the project has — the CLI's admin, replay's producer, a consumer, the
trainer's announcement and a Faust worker — working with the right settings and refused, in one clear line,
without credentials, with a wrong password or without the broker's CA.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import SecretStr

from conftest import local_broker_settings, start_or_unavailable
from helpers import private_worker, produce, running_worker, wait_for, worker_env
from hymirec.errors import HymirecError
from hymirec.settings import Settings, kafka_client_options
from store import Store
from stream.broker import LocalKafka, create_topics
from stream.broker_tls import BrokerTls
from stream.replay import replay

pytestmark = pytest.mark.broker

USER, PASSWORD = "hymirec-app", "p@ss:w0rd!#%&-Z9"


@pytest.fixture(scope="module")
def sasl_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("kafka-sasl") / "kafka"
    settings = local_broker_settings(home, kafka_security_protocol="SASL_SSL", kafka_sasl_username=USER,
                                     kafka_sasl_password=PASSWORD, kafka_ssl_cafile=str(home / "tls" / "ca.pem"))
    local = LocalKafka(settings, die_with_parent=True)
    start_or_unavailable(local)
    try:
        yield settings
    finally:
        local.stop()


@pytest.fixture
def sasl_topics(sasl_settings: Settings) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return sasl_settings.model_copy(update={
        "topic_interactions": f"interactions-{suffix}", "topic_items": f"items-{suffix}",
        "topic_model_versions": f"model-versions-{suffix}", "topic_dead_letter": f"dead-letter-{suffix}",
        "app_id": f"hymirec-sasl-{suffix}",
    })


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hymirec.cli", *args], capture_output=True, text=True,
                          env=worker_env(settings), timeout=120)


def read_all(settings: Settings, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=5_000, **kafka_client_options(settings))
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records, deadline = [], time.monotonic() + 60
        while len(records) < expected and time.monotonic() < deadline:
            records.extend((m.key, m.value) for m in consumer)
        return records
    finally:
        consumer.close()


# --- with the right settings -----------------------------------------------------------------------------
def test_broker_serves_sasl_ssl_only(sasl_settings: Settings):
    home = Path(sasl_settings.kafka_home)
    props = dict(line.split("=", 1) for line in (home / "server.properties").read_text().splitlines())
    assert props["listeners"].startswith("SASL_SSL://127.0.0.1:") and "PLAINTEXT" not in props["listener.security.protocol.map"]
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    # The password reaches the broker's storage only (never its config, its log or its command lines).
    for name in ("server.properties", "server.log", "server.out"):
        assert PASSWORD not in (home / name).read_text(errors="replace"), name
    for path in (home / "server.properties", home / "tls" / "broker.pem", home / "tls" / "broker.password"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_cli_topics_replay_consumer_and_trainer_announce(sasl_topics: Settings, tmp_path: Path):
    s = sasl_topics
    result = cli(s, "kafka", "topics")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"topics: {', '.join(s.topics)}"

    log = tmp_path / "log.jsonl"
    events = [{"user_id": f"u{i % 3}", "item_id": str(i), "ts": 1_000 + i, "event_id": f"e{i}"} for i in range(12)]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    replay(s, log, progress=False)
    read = read_all(s, s.topic_interactions, len(events))
    assert sorted(json.loads(value)["event_id"] for _, value in read) == sorted(e["event_id"] for e in events)
    assert all(key.decode() == json.loads(value)["user_id"] for key, value in read)

    from trainer.online import announce

    assert announce(s, {"version": "v0042", "parent": None})
    assert [json.loads(value)["version"] for _, value in read_all(s, s.topic_model_versions, 1)] == ["v0042"]


def test_worker_ingests_over_sasl_ssl(sasl_topics: Settings, tmp_path: Path):
    s = private_worker(sasl_topics, tmp_path)
    create_topics(s)
    log_file = tmp_path / "worker.log"
    events = [(f"u{i % 4}", str(i % 5), 2_000 + i) for i in range(20)]
    with running_worker(s, log_file) as proc:
        produce(s, [(s.topic_items, str(i).encode(), json.dumps({"item_id": str(i), "text": f"item {i}"}).encode())
                    for i in range(5)]
                + [(s.topic_interactions, user.encode(), json.dumps({"user_id": user, "item_id": item, "ts": ts}).encode())
                   for user, item, ts in events])
        store = Store(s)
        want = {user: [item for u, item, _ in events if u == user] for user, _, _ in events}

        def applied():
            rows = store.get_histories(list(want))
            return rows if {u: r["history_item_ids"] for u, r in rows.items()} == want else None

        wait_for("the events in LanceDB", applied, proc, log_file)
    assert PASSWORD not in log_file.read_text(errors="replace")


# --- refused -----------------------------------------------------------------------------------------------
def other_ca(tmp_path: Path) -> str:
    tls = BrokerTls(tmp_path)
    tls.ensure()
    return str(tls.ca_file)


@pytest.mark.parametrize("case", ["no credentials", "wrong password", "another CA"])
def test_replay_is_refused_with_one_clear_error(sasl_settings: Settings, tmp_path: Path, case: str):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"user_id": "u", "item_id": "i", "ts": 1}) + "\n")
    settings, expected = {
        "no credentials": (Settings(kafka_bootstrap=sasl_settings.kafka_bootstrap),
                           "expects TLS: set HYMIREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
        "wrong password": (sasl_settings.model_copy(update={"kafka_sasl_password": SecretStr("not-it")}),
                           f"accepted TLS but not the SCRAM-SHA-512 login of '{USER}'"),
        "another CA": (sasl_settings.model_copy(update={"kafka_ssl_cafile": other_ca(tmp_path)}),
                       r"presents a certificate these settings do not trust \(unable to get local issuer certificate\)"),
    }[case]
    with pytest.raises(HymirecError, match=expected) as raised:
        replay(settings, log, connect_timeout_s=2.0, progress=False)
    assert "\n" not in str(raised.value)


def test_cli_with_a_wrong_password_is_one_line(sasl_settings: Settings):
    result = cli(sasl_settings.model_copy(update={"kafka_sasl_password": SecretStr("not-it")}), "kafka", "topics")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"hymirec: error: the Kafka broker at {sasl_settings.kafka_bootstrap} accepted TLS but not the SCRAM-SHA-512 "
        f"login of '{USER}' in time: check HYMIREC_KAFKA_SASL_USERNAME and HYMIREC_KAFKA_SASL_PASSWORD "
        f"(the broker's log names a refused login)"]
    assert "not-it" not in result.stdout + result.stderr


def test_worker_with_a_wrong_password_fails_clearly(sasl_topics: Settings, tmp_path: Path):
    s = private_worker(sasl_topics, tmp_path, kafka_sasl_password=SecretStr("not-it"))
    log_file = tmp_path / "worker.log"
    with pytest.raises(HymirecError, match="the worker exited"):  # rather than serving with no input
        with running_worker(s, log_file):
            pass
    logged = log_file.read_text(errors="replace")
    assert "[ERROR] Unable connect to" in logged and "invalid credentials with SASL mechanism SCRAM-SHA-512" in logged
    assert "not-it" not in logged


# --- settings and the local broker's own checks (no broker) ------------------------------------------------
def test_sasl_ssl_without_username_or_ca_is_one_line(tmp_path: Path):
    env = worker_env(Settings()) | {"HYMIREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "HYMIREC_KAFKA_SASL_USERNAME": "",
                                    "HYMIREC_KAFKA_SASL_PASSWORD": "x", "HYMIREC_KAFKA_SSL_CAFILE": ""}
    result = subprocess.run([sys.executable, "-m", "hymirec.cli", "kafka", "status"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hymirec: error: bad settings: HYMIREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs HYMIREC_KAFKA_SASL_USERNAME "
        "and HYMIREC_KAFKA_SSL_CAFILE"]


def test_client_options_never_show_the_password():
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username=USER, kafka_sasl_password=PASSWORD,
                 kafka_ssl_cafile="/no/such/ca.pem")
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    with pytest.raises(HymirecError, match="HYMIREC_KAFKA_SSL_CAFILE: no such file /no/such/ca.pem"):
        kafka_client_options(s)
    assert kafka_client_options(Settings()) == {"security_protocol": "PLAINTEXT"}


def test_local_broker_refuses_a_ca_file_clients_cannot_use(tmp_path: Path):
    tls = BrokerTls(tmp_path / "kafka")
    (tmp_path / "kafka").mkdir()
    tls.ensure()
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username=USER, kafka_sasl_password=PASSWORD,
                        kafka_ssl_cafile=other_ca(tmp_path / "other"))
    with pytest.raises(HymirecError, match=f"does not hold the local broker's CA: set it to {tls.ca_file}"):
        tls.check_clients_trust(settings)
    tls.check_clients_trust(settings.model_copy(update={"kafka_ssl_cafile": str(tls.ca_file)}))


def test_local_broker_formatted_without_sasl_refuses_sasl_ssl(make_broker_settings):
    settings = make_broker_settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username=USER,
                                    kafka_sasl_password=PASSWORD, kafka_ssl_cafile="ca.pem")
    data = Path(settings.kafka_home) / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("node.id=1\n")  # as a PLAINTEXT start left it
    with pytest.raises(HymirecError, match=f"formatted without the SCRAM user '{USER}'"):
        LocalKafka(settings).start(timeout=5)
