"""TLS for the team services (``make services``): a local CA the project makes on first use, or a
team's own certificates, and the client settings that verify them.

The local CA lives under ``<home>/tls/`` (``.services/tls/`` for ``make services``; a test's own
folder in the tests): ``ca.pem`` (the CA certificate clients trust), ``ca.key``, ``server.pem``
(the servers' certificate, for ``127.0.0.1``, ``::1`` and ``localhost``) and ``server.key``;
the keys are mode 0600. Made with the ``cryptography`` package (EC P-256), reused on later starts;
the server certificate is re-issued when it is within 30 days of expiry.

A team passes its own instead, all three or none, through the environment::

    AIGC_TLS_CA=/etc/aigc/ca.pem        # the CA bundle clients verify the servers with
    AIGC_TLS_CERT=/etc/aigc/server.pem  # the servers' certificate (leaf first, then intermediates)
    AIGC_TLS_KEY=/etc/aigc/server.key   # its private key (PEM, unencrypted)

Either way the set is checked before a server starts, with the same TLS handshake a client makes
(Python's ``ssl``, OpenSSL): the key must match the certificate and the certificate must verify
against the CA for the host name the clients use (``127.0.0.1``, else ``localhost``: the services
listen on loopback). A file that is missing or wrong is one :class:`ServiceError` line naming it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from aigc.services.errors import ServiceError

ENV = {"ca": "AIGC_TLS_CA", "cert": "AIGC_TLS_CERT", "key": "AIGC_TLS_KEY"}
HOSTS = ("127.0.0.1", "localhost")  # the names a loopback client may use, in order of preference
SERVER_DAYS, CA_DAYS, RENEW_DAYS = 397, 3650, 30


@dataclass(frozen=True)
class TLS:
    """The certificates the servers present and the CA bundle their clients verify them with."""

    ca: Path  # CA bundle (PEM)
    cert: Path  # the servers' certificate chain (PEM)
    key: Path  # its private key (PEM)
    host: str  # the name clients connect to, which the certificate names

    @property
    def client_env(self) -> dict[str, str]:
        """What a client exports to trust the servers: MLflow's and Prefect's own CA settings.
        (PostgreSQL's clients take the CA in the connection URI: ``sslrootcert``.)"""
        return {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca), "PREFECT_API_SSL_CERT_FILE": str(self.ca)}

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context trusting only this CA (httpx ``verify=``)."""
        return ssl.create_default_context(cafile=str(self.ca))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # also when the file was there with other bits


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(subject_cn: str, public_key, issuer_cert, issuer_key, days: int, ca: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aigc"),
                         x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer = issuer_cert.subject if issuer_cert is not None else subject
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True))
    else:
        builder = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
                       x509.DNSName("localhost")]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def local_ca(folder: Path) -> TLS:
    """The project's local CA and a loopback server certificate under ``folder`` (made on first
    use, then reused; the server certificate re-issued near its expiry)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key, cert_pem, key_pem = (folder / n for n in ("ca.pem", "ca.key", "server.pem", "server.key"))
    if ca_pem.exists() and ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_priv = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    else:
        ca_priv = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(f"aigc local CA ({os.uname().nodename})", ca_priv.public_key(), None, ca_priv, CA_DAYS, ca=True)
        _write_private(ca_key, _key_pem(ca_priv))
        ca_pem.write_bytes(_cert_pem(ca_cert))
        cert_pem.unlink(missing_ok=True)  # a new CA: the old server certificate is not its
    renew_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=RENEW_DAYS)
    fresh = False
    if cert_pem.exists() and key_pem.exists():
        cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
        fresh = cert.issuer == ca_cert.subject and cert.not_valid_after_utc > renew_at
    if not fresh:
        priv = ec.generate_private_key(ec.SECP256R1())
        cert = _issue("aigc services (loopback)", priv.public_key(), ca_cert, ca_priv, SERVER_DAYS, ca=False)
        _write_private(key_pem, _key_pem(priv))
        cert_pem.write_bytes(_cert_pem(cert))
    for key in (ca_key, key_pem):
        os.chmod(key, 0o600)
    return TLS(ca_pem.resolve(), cert_pem.resolve(), key_pem.resolve(), HOSTS[0])


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> None:
    """A TLS handshake between the two contexts in memory (no socket); raises what the client would."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(20):
        for end in (c, s):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise ssl.SSLError("the TLS handshake did not complete")


def check(ca: Path, cert: Path, key: Path, what: str = "") -> TLS:
    """Check a set of certificates before a server presents them; one ServiceError line if wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    names = {"ca": ca, "cert": cert, "key": key}
    label = {k: f"{ENV[k]}={p}" if what == "env" else str(p) for k, p in names.items()}
    redo = ("pass the right file, or unset AIGC_TLS_CA, AIGC_TLS_CERT and AIGC_TLS_KEY to use the "
            "project's local CA" if what == "env" else "remove the folder to have it made again")
    for k, p in names.items():
        if not p.is_file():
            raise ServiceError(f"TLS {k} file {label[k]} does not exist: {redo}")
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except ValueError:
        raise ServiceError(f"TLS certificate {label['cert']} is not a PEM certificate: {redo}") from None
    try:
        x509.load_pem_x509_certificates(ca.read_bytes())
    except ValueError:
        raise ServiceError(f"TLS CA bundle {label['ca']} is not a PEM certificate (bundle): {redo}") from None
    try:
        priv = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ServiceError(f"TLS key {label['key']} is not an unencrypted PEM private key ({exc}): {redo}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if priv.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ServiceError(f"TLS key {label['key']} does not match certificate {label['cert']}: "
                           f"give the key the certificate was issued for")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ServiceError(f"TLS certificate {label['cert']} and key {label['key']} are refused by OpenSSL "
                           f"({exc.reason or exc}): {redo}") from None
    client = ssl.create_default_context(cafile=str(ca))
    failures = []
    for host in HOSTS:
        try:
            _handshake(server, client, host)
            return TLS(ca.resolve(), cert.resolve(), key.resolve(), host)
        except ssl.SSLCertVerificationError as exc:
            failures.append(f"{host}: {exc.verify_message}")
        except ssl.SSLError as exc:
            failures.append(f"{host}: {exc.reason or exc}")
    raise ServiceError(f"TLS certificate {label['cert']} does not verify against CA {label['ca']} for a loopback "
                       f"client ({'; '.join(failures)}): it must be issued by that CA for 127.0.0.1 or localhost "
                       f"(the services listen on loopback)")


def server_tls(home: Path, environ=os.environ) -> TLS:
    """The certificates the services of ``home`` present: the team's (``AIGC_TLS_CA``,
    ``AIGC_TLS_CERT``, ``AIGC_TLS_KEY``, all three) or the local CA's in ``home/tls``."""
    given = {k: environ.get(v) for k, v in ENV.items()}
    if any(given.values()):
        missing = [ENV[k] for k, v in given.items() if not v]
        if missing:
            raise ServiceError(f"{', '.join(missing)} not set: a team's own certificates need all three of "
                               f"AIGC_TLS_CA, AIGC_TLS_CERT and AIGC_TLS_KEY (or none, for the local CA)")
        return check(Path(given["ca"]), Path(given["cert"]), Path(given["key"]), what="env")
    tls = local_ca(home / "tls")
    return check(tls.ca, tls.cert, tls.key)
