"""Shared fixtures: a real local Kafka broker (the project's own `LocalKafka`), a real local S3 server
(the project's own `LocalS3`) and temp LanceDB dirs.

The broker starts lazily, once per session, only when a test asks for `broker_settings` (or
`topic_settings`), so pure unit tests never pay for a JVM; the S3 server likewise for `s3_settings`.
If one cannot start, its tests are skipped locally but FAIL in CI (CI=true), where a missing service
must not pass unnoticed.
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from hymirec.errors import HymirecError
from hymirec.settings import Settings

BROKER_START_TIMEOUT_S = 120.0


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 (held together while choosing, so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def local_broker_settings(kafka_home: Path, **overrides) -> Settings:
    """Settings for a private test broker: free ports, its own kafka_home, the machine's jar cache."""
    port, controller_port = free_ports(2)
    values = dict(
        kafka_bootstrap=f"127.0.0.1:{port}",
        kafka_controller_port=controller_port,
        kafka_home=kafka_home,
        kafka_heap="512m",
        partitions=2,
        lancedb_uri=str(kafka_home.parent / "lancedb"),
    )
    # cache_dir keeps its default (or HYMIREC_CACHE_DIR): the jars are fetched once per machine.
    return Settings(**(values | overrides))


def broker_unavailable(reason: str, service: str = "Kafka broker") -> None:
    """Skip a test of ``service`` locally; fail it in CI, where the service must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{service} unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"{service} unavailable: {reason}")


def start_or_unavailable(local, timeout: float = BROKER_START_TIMEOUT_S, service: str = "Kafka broker"):
    """Start a `LocalKafka` (or `LocalS3`); if it cannot start, skip (locally) or fail (CI) the test."""
    try:
        return local.start(timeout=timeout)
    except (HymirecError, OSError) as exc:
        reason = str(exc)
    local.stop()
    broker_unavailable(reason, service)  # outside the except: no chained traceback in the report


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a real broker started (once per session) by `stream.broker.LocalKafka`."""
    from stream.broker import LocalKafka

    settings = local_broker_settings(tmp_path_factory.mktemp("kafka-session") / "kafka")
    # die_with_parent: a pytest killed outright (no teardown) does not leave the JVM running.
    local = LocalKafka(settings, die_with_parent=True)
    start_or_unavailable(local)
    try:
        yield settings
    finally:
        local.stop()


@pytest.fixture
def make_broker_settings(tmp_path: Path):
    """Factory for settings of a PRIVATE broker (own free ports, own kafka_home under tmp_path),
    for tests that stop, kill or restart a broker without disturbing the session one."""
    def make(**overrides) -> Settings:
        home = Path(overrides.pop("kafka_home", tmp_path / f"kafka-{uuid.uuid4().hex[:6]}"))
        return local_broker_settings(home, **overrides)
    return make


@pytest.fixture
def topic_settings(broker_settings: Settings) -> Settings:
    """broker_settings with this test's own four topics (created) and its own Faust app id."""
    from stream.broker import create_topics

    suffix = uuid.uuid4().hex[:10]
    settings = broker_settings.model_copy(update={
        "topic_interactions": f"interactions-{suffix}",
        "topic_items": f"items-{suffix}",
        "topic_model_versions": f"model-versions-{suffix}",
        "topic_dead_letter": f"dead-letter-{suffix}",
        "app_id": f"hymirec-test-{suffix}",
    })
    create_topics(settings)
    return settings


@pytest.fixture
def db_settings(tmp_path: Path) -> Settings:
    """Settings with a fresh LanceDB directory and no broker."""
    return Settings(lancedb_uri=str(tmp_path / "lancedb"), kafka_home=tmp_path / "kafka")


S3_BUCKET = "hymirec-test"


@pytest.fixture(scope="session")
def s3_server_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a real S3 server started (once per session) by `store.s3server.LocalS3`,
    with a fresh random secret; the binary is built into the cache if `make test` has not."""
    from store.s3server import LocalS3

    home = tmp_path_factory.mktemp("s3-session")
    settings = Settings(s3_endpoint=f"http://127.0.0.1:{free_ports(1)[0]}", s3_access_key_id="hymirec-test",
                        s3_secret_access_key=secrets.token_urlsafe(24), s3_home=home / "s3",
                        lancedb_uri=f"s3://{S3_BUCKET}/session", kafka_home=home / "kafka")
    local = LocalS3(settings, die_with_parent=True)
    start_or_unavailable(local, timeout=60, service="local S3 server")
    try:
        yield settings
    finally:
        local.stop()


@pytest.fixture
def s3_settings(s3_server_settings: Settings) -> Settings:
    """s3_server_settings with this test's own LanceDB prefix in the bucket."""
    return s3_server_settings.model_copy(update={"lancedb_uri": f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:10]}"})
