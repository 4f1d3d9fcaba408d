"""The Faust app's Kafka credentials, from the same client options as every other client, and the
options every Faust app of the project starts with (the worker's and the Faust-ceiling benchmark's)."""

from __future__ import annotations

import faust

from hymirec.settings import Settings, kafka_client_options


def broker_credentials(settings: Settings) -> faust.SASLCredentials | None:
    """SASL over TLS for the app's consumer, producer and topic creation; None for PLAINTEXT."""
    options = kafka_client_options(settings)
    if options["security_protocol"] != "SASL_SSL":
        return None
    return faust.SASLCredentials(username=options["sasl_plain_username"], password=options["sasl_plain_password"],
                                 mechanism=options["sasl_mechanism"], ssl_context=options["ssl_context"])


def app_options(settings: Settings) -> dict:
    """faust.App keyword arguments: the brokers and credentials, the web server, the data directory
    (created: faust creates only its last level), reading a new group's partitions from the start."""
    settings.worker_dir.mkdir(parents=True, exist_ok=True)
    return {"broker": [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
            "broker_credentials": broker_credentials(settings), "web_host": settings.web_host,
            "web_bind": settings.web_host, "web_port": settings.web_port,
            "datadir": str(settings.worker_dir / settings.app_id), "consumer_auto_offset_reset": "earliest",
            "topic_disable_leader": True}
