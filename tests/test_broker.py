"""The local broker: lifecycle, persistence across restarts, topics, and clear errors.

Lifecycle tests run a PRIVATE broker (own ports, own kafka_home) so that stopping it does not
disturb the session broker other tests share.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from stream import broker
from stream.broker import LocalKafka, create_topics

from conftest import broker_unavailable, free_ports


def produce(settings: Settings, topic: str, n: int) -> list[tuple[bytes, bytes]]:
    records = [(f"user-{i % 7}".encode(), f"value-{i}".encode()) for i in range(n)]
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value, partition=0)
        producer.flush(timeout=30)
    finally:
        producer.close()
    return records


def consume(settings: Settings, topic: str, n: int, timeout_s: float = 30.0) -> list:
    """The first n records of partition 0, read from the beginning."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        consumer.assign([TopicPartition(topic, 0)])
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def hymirec_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "hymirec"), *args]


def cli_env(settings: Settings) -> dict[str, str]:
    """This environment (PATH to java and mvn) plus the settings, as a `hymirec` process reads them."""
    return os.environ | {
        "HYMIREC_KAFKA_HOME": str(settings.kafka_home),
        "HYMIREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HYMIREC_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
        "HYMIREC_KAFKA_HEAP": settings.kafka_heap,
        "HYMIREC_CACHE_DIR": str(settings.cache_dir),
        "HYMIREC_PARTITIONS": str(settings.partitions),
    }


@pytest.mark.broker
def test_lifecycle_and_data_survive_restart(make_broker_settings):
    if broker.shutil.which("java") is None:
        broker_unavailable("`java` not found on PATH")
    settings = make_broker_settings(partitions=1)
    local = LocalKafka(settings, die_with_parent=True)
    pid_file = settings.kafka_home / "broker.pid"
    assert not local.status().running
    cli = subprocess.Popen(hymirec_cmd("kafka", "start", "--no-topics"), env=cli_env(settings),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # A second start while the CLI's broker is still coming up waits for it: one broker, not two.
        deadline = time.monotonic() + 120
        while not pid_file.exists() and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first = local.start(timeout=120)
        out, err = cli.communicate(timeout=180)
        assert cli.returncode == 0, err
        assert first.running and first.already_running and f"kafka running (pid {first.pid})" in out
        assert (settings.kafka_home / "data" / "meta.properties").exists()

        again = local.start(timeout=120)  # no-op on a running broker
        assert again.already_running and again.pid == first.pid
        assert "already running" in again.describe()
        status = local.status()
        assert status.running and status.pid == first.pid and str(first.pid) in status.describe()

        topic = create_topics(settings)[0]
        sent = produce(settings, topic, 50)
        # A fresh broker has no group coordinator until the first lookup creates its offsets topic.
        fresh = subprocess.run(hymirec_cmd("status"), env=cli_env(settings) | {"HYMIREC_LANCEDB_URI": settings.lancedb_uri},
                               capture_output=True, text=True, timeout=120)
        assert fresh.returncode == 0, fresh.stderr
        assert "total lag 50 events" in fresh.stdout, fresh.stdout

        assert local.stop() is True
        assert not local.status().running and not pid_file.exists()
        assert "not running" in local.status().describe()
        assert local.stop() is False
        cli_status = subprocess.run(hymirec_cmd("kafka", "status"), env=cli_env(settings),
                                    capture_output=True, text=True, timeout=60)
        assert cli_status.returncode == 3 and "not running" in cli_status.stdout

        second = local.start(timeout=120)
        assert second.running and second.pid != first.pid and second.start_seconds is not None
        got = consume(settings, topic, 50)
        assert [r.offset for r in got] == list(range(50))
        assert [(r.key, r.value) for r in got] == sent
    finally:
        if cli.poll() is None:
            cli.kill()
        local.stop()


@pytest.mark.broker
def test_create_topics_is_idempotent_and_checks_partitions(broker_settings):
    suffix = uuid.uuid4().hex[:8]
    settings = broker_settings.model_copy(update={
        name: f"{name}-{suffix}" for name in
        ("topic_interactions", "topic_items", "topic_model_versions", "topic_dead_letter")})
    assert create_topics(settings, partitions=3) == settings.topics
    assert create_topics(settings, partitions=3) == settings.topics

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(settings.topics)}
    finally:
        admin.close()
    # The catalogue keeps one partition whatever the count: its one consumer is the shared tables' writer.
    assert described == {name: 1 if name == settings.topic_items else 3 for name in settings.topics}

    with pytest.raises(HymirecError, match="exists with 3 partitions, not 2"):
        create_topics(settings, partitions=2)


@pytest.mark.broker
def test_session_broker_round_trip(topic_settings):
    assert LocalKafka(topic_settings).status().running
    sent = produce(topic_settings, topic_settings.topic_interactions, 5)
    got = consume(topic_settings, topic_settings.topic_interactions, 5)
    assert [(r.key, r.value) for r in got] == sent


def test_create_topics_without_broker_is_one_line_error(make_broker_settings):
    settings = make_broker_settings()  # free ports: nothing listens there
    with pytest.raises(HymirecError) as err:
        create_topics(settings)
    assert settings.kafka_bootstrap in str(err.value) and "\n" not in str(err.value)


def test_missing_java_is_one_line_error(make_broker_settings, monkeypatch):
    monkeypatch.setattr(broker.shutil, "which", lambda name: None)
    with pytest.raises(HymirecError) as err:
        LocalKafka(make_broker_settings()).start(timeout=5)
    assert "`java` not found" in str(err.value) and "\n" not in str(err.value)


def test_missing_maven_is_one_line_error(make_broker_settings, tmp_path, monkeypatch):
    real_which = broker.shutil.which
    monkeypatch.setattr(broker.shutil, "which", lambda name: None if name == "mvn" else real_which(name))
    if real_which("java") is None:
        pytest.skip("needs java on PATH to get past the java check")
    # An empty jar cache, so ensure_jars really needs Maven.
    local = LocalKafka(make_broker_settings(cache_dir=tmp_path / "cache"))
    with pytest.raises(HymirecError) as err:
        local.ensure_jars()
    assert "`mvn`" in str(err.value) and "\n" not in str(err.value)


def test_old_java_is_refused(make_broker_settings, tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    java = fake_bin / "java"
    java.write_text('#!/bin/sh\necho \'openjdk version "11.0.21" 2023-10-17\' >&2\n')
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(fake_bin))
    with pytest.raises(HymirecError, match="is Java 11: the local Kafka broker needs Java 17"):
        LocalKafka(make_broker_settings()).start(timeout=5)


def test_port_taken_by_another_process(make_broker_settings):
    settings = make_broker_settings()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.kafka_port))
        squatter.listen()
        local = LocalKafka(settings)
        status = local.status()
        assert not status.running and status.port_taken
        assert "another process accepts" in status.describe()
        with pytest.raises(HymirecError, match=f"port {settings.kafka_port} .* already in use"):
            local.start(timeout=5)


@pytest.mark.broker
def test_broker_dying_at_start_reports_its_output(make_broker_settings):
    if broker.shutil.which("java") is None:
        broker_unavailable("needs java: the JVM itself must start and then exit")
    settings = make_broker_settings(kafka_heap="lots")  # the JVM refuses this -Xmx and exits
    local = LocalKafka(settings)
    with pytest.raises(HymirecError, match="exited with code") as err:
        local.start(timeout=60)
    assert "Invalid maximum heap size" in str(err.value)
    assert not (settings.kafka_home / "broker.pid").exists()


def test_cli_reports_missing_java_in_one_line(tmp_path):
    port, controller_port = free_ports(2)
    venv_bin = Path(sys.executable).parent
    env = {
        "PATH": str(venv_bin),  # the venv's python and `hymirec`, but no java
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "HYMIREC_KAFKA_HOME": str(tmp_path / "kafka"),
        "HYMIREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "HYMIREC_KAFKA_CONTROLLER_PORT": str(controller_port),
    }
    proc = subprocess.run([str(venv_bin / "hymirec"), "kafka", "start"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("hymirec: error:") and "java" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_maven_failure_names_the_error_and_the_log(make_broker_settings, tmp_path):
    if broker.shutil.which("java") is None or broker.shutil.which("mvn") is None:
        pytest.skip("needs java and mvn on PATH")
    local = LocalKafka(make_broker_settings(kafka_version="0.0.1-nonexistent", cache_dir=tmp_path / "cache"))
    with pytest.raises(HymirecError) as err:
        local.ensure_jars()
    message = str(err.value)
    assert message.startswith("Maven could not fetch the Kafka 0.0.1-nonexistent jars: ")
    assert "\n" not in message and "[Help" not in message
    log_file = Path(message.rsplit("(full log: ", 1)[1].rstrip(")"))
    assert log_file.is_file() and "0.0.1-nonexistent" in log_file.read_text()
    assert not (local.jar_root / "libs.done").exists()


def test_start_refuses_a_remote_bootstrap(make_broker_settings):
    settings = make_broker_settings(kafka_bootstrap="kafka.example.com:9092")
    with pytest.raises(HymirecError, match="serves 127.0.0.1 only"):
        LocalKafka(settings).start(timeout=5)


def test_the_readme_kafka_tool_commands_work_against_the_local_broker(topic_settings):
    """The README's console-producer and consumer-groups commands, as written but for this test's
    broker address, topic and group: the jars `hymirec kafka install` resolves include kafka-tools."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    producer_cmd = next(line for line in readme.splitlines() if "tools.ConsoleProducer" in line)
    groups_cmd = next(line for line in readme.splitlines() if "ConsumerGroupCommand" in line)
    libs = str(broker.LocalKafka(topic_settings).ensure_jars())

    def as_here(command: str) -> str:
        return (command.replace('"$HOME/.cache/hymirec/kafka/4.1.2/libs/*"', f'"{libs}/*"')
                .replace("127.0.0.1:9092", topic_settings.kafka_bootstrap)
                .replace("--topic interactions", f"--topic {topic_settings.topic_interactions}")
                .replace("--group hymirec", f"--group {topic_settings.app_id}"))

    produced = subprocess.run(["bash", "-c", as_here(producer_cmd)], capture_output=True, text=True, timeout=120)
    assert produced.returncode == 0, produced.stderr[-2000:]
    consumer = KafkaConsumer(topic_settings.topic_interactions, bootstrap_servers=topic_settings.kafka_bootstrap,
                             group_id=topic_settings.app_id, auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    try:
        got = [(m.key, json.loads(m.value)) for m in consumer]
        consumer.commit()
    finally:
        consumer.close()
    assert got == [(b"u42", {"user_id": "u42", "item_id": "242", "ts": 1764201600000})]

    described = subprocess.run(["bash", "-c", as_here(groups_cmd)], capture_output=True, text=True, timeout=120)
    assert described.returncode == 0, described.stderr[-2000:]
    assert topic_settings.topic_interactions in described.stdout and "LAG" in described.stdout, described.stdout
