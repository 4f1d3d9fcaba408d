"""The Faust app's Kafka credentials, from the same client options as every other client."""

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
