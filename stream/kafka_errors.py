"""Why a Kafka client could not reach the broker, in one line a user can act on.

kafka-python and aiokafka retry a refused login, an untrusted certificate or a plaintext hello to a
TLS port until their deadline and then report only a timeout; this looks at the connection itself.
"""

from __future__ import annotations

import socket
import ssl

from hymirec.settings import Settings, kafka_ssl_context

PROBE_TIMEOUT_S = 5.0


def connection_problem(settings: Settings) -> str:
    """Called after a client failed to connect: what about the first bootstrap server explains it."""
    bootstrap = settings.kafka_bootstrap
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return f"no Kafka broker answers at {bootstrap}; start the local one with `hymirec kafka start`"
    with sock:
        if settings.kafka_sasl:
            try:
                kafka_ssl_context(settings).wrap_socket(sock, server_hostname=host).close()
            except ssl.SSLCertVerificationError as exc:
                return (f"the Kafka broker at {bootstrap} presents a certificate these settings do not trust "
                        f"({exc.verify_message}): HYMIREC_KAFKA_SSL_CAFILE={settings.kafka_ssl_cafile} must hold "
                        f"the CA that signed it")
            except (ssl.SSLError, OSError) as exc:
                return (f"no TLS handshake with the Kafka broker at {bootstrap} ({getattr(exc, 'reason', None) or exc}): "
                        f"does it listen with SASL_SSL there?")
            return (f"the Kafka broker at {bootstrap} accepted TLS but not the {settings.kafka_sasl_mechanism} login of "
                    f"{settings.kafka_sasl_username!r} in time: check HYMIREC_KAFKA_SASL_USERNAME and "
                    f"HYMIREC_KAFKA_SASL_PASSWORD (the broker's log names a refused login)")
        probe = ssl.create_default_context()
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE  # only asking whether TLS is spoken, not trusting anything
        try:
            probe.wrap_socket(sock, server_hostname=host).close()
        except (ssl.SSLError, OSError):
            return f"the Kafka broker at {bootstrap} did not answer in time"
        return (f"the Kafka broker at {bootstrap} expects TLS: set HYMIREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL with "
                f"HYMIREC_KAFKA_SASL_USERNAME, HYMIREC_KAFKA_SASL_PASSWORD and HYMIREC_KAFKA_SSL_CAFILE")
