"""The local broker's SASL_SSL side (``HYMIREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL``): a CA made for it,
the broker's certificate, the listener properties and the SCRAM users its storage is formatted with.

    <kafka_home>/tls/ca.pem            the CA certificate; clients verify the broker with it
                                       (HYMIREC_KAFKA_SSL_CAFILE). Its key is never written: no
                                       other certificate can be signed by it.
    <kafka_home>/tls/broker.pem        the broker's key and certificate (127.0.0.1, localhost), 0600
    <kafka_home>/tls/broker.password   the SCRAM password the broker uses to reach itself, 0600

Listeners: SASL_SSL (SCRAM) for clients and for the broker's own inter-broker connections, and a
controller listener on TLS that requires a client certificate signed by the CA (KRaft cannot use
SCRAM there: its credentials live in the metadata the controller serves). No plaintext port is left.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hymirec.errors import HymirecError
from hymirec.settings import Settings

BROKER_USER = "hymirec-broker"
VALID_DAYS = 3650
# Printable ASCII (the java @argument file is read in the platform's charset) less what the storage
# tool's --add-scram parser or the argument file would split or unquote.
_SAFE = {chr(c) for c in range(33, 127)} - set(',"[]=\\\'')


class BrokerTls:
    """The TLS files and SCRAM setup of one kafka_home."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "tls"
        self.ca_file = self.dir / "ca.pem"
        self.keystore = self.dir / "broker.pem"
        self.password_file = self.dir / "broker.password"

    def ensure(self) -> None:
        """Make the CA, the broker's certificate and its SCRAM password once; later starts reuse them."""
        if self.ca_file.exists() and self.keystore.exists() and self.password_file.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        # A name of its own: a client given another broker's CA is told the issuer is unknown, not
        # that a CA of the same name failed to verify the signature.
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hymirec local Kafka CA {secrets.token_hex(4)}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            # clientAuth too: the broker presents this certificate to its own controller listener.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        # Kafka's PEM key store reads an unencrypted PKCS#8 key followed by the certificate chain.
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_private(self.keystore, pem_key + cert.public_bytes(serialization.Encoding.PEM))
        _write_private(self.password_file, secrets.token_urlsafe(24).encode())
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def check_clients_trust(self, settings: Settings) -> None:
        """The settings' CA file must hold this broker's CA, or every client (the start's own
        readiness check first) would refuse the broker's certificate."""
        try:
            trusted = Path(settings.kafka_ssl_cafile).read_text()
        except OSError:
            trusted = ""
        if self.ca_file.read_text().strip() not in trusted:
            raise HymirecError(f"HYMIREC_KAFKA_SSL_CAFILE={settings.kafka_ssl_cafile} does not hold the local broker's CA: "
                               f"set it to {self.ca_file}")

    def properties(self, settings: Settings, port: int, controller_port: int) -> dict[str, str]:
        """server.properties entries of the SASL_SSL listener, the TLS controller listener and JAAS."""
        mechanism = settings.kafka_sasl_mechanism
        password = self.password_file.read_text().strip()
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": mechanism,
            "sasl.mechanism.inter.broker.protocol": mechanism,
            f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config":
                f'org.apache.kafka.common.security.scram.ScramLoginModule required '
                f'username="{BROKER_USER}" password="{password}";',
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "listener.name.controller.ssl.client.auth": "required",
        }

    def scram_arguments(self, settings: Settings) -> list[str]:
        """``--add-scram`` arguments of the storage format: the clients' user and the broker's own."""
        username, password = settings.kafka_sasl_username, settings.kafka_sasl_password.get_secret_value()
        if not set(username + password) <= _SAFE:
            raise HymirecError("the local broker registers HYMIREC_KAFKA_SASL_USERNAME/PASSWORD only of printable "
                               "ASCII without spaces, quotes, backslashes or any of , [ ] =: choose others")
        mechanism = settings.kafka_sasl_mechanism
        users = [(username, password), (BROKER_USER, self.password_file.read_text().strip())]
        return [arg for name, secret in users
                for arg in ("--add-scram", f'{mechanism}=[name="{name}",password="{secret}"]')]


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
