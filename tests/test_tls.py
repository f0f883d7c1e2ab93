"""TLS in transit for the team services (issue 34): a local CA made on first use or a team's own
certificates, checked before anything starts; MLflow and Prefect serve HTTPS only, PostgreSQL
TLS only (hostssl), and each client verifies the servers against the CA -- real servers, real
handshakes, no mocks."""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from aigc.services import ServiceError, auth_setup, free_port, start_mlflow, start_postgres, start_prefect
from aigc.services.tls import ENV, local_ca, server_tls
from tests.conftest import ROOT, require


def _sans(cert: Path) -> set[str]:
    from cryptography import x509

    ext = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | {
        str(n) for n in ext.get_values_for_type(x509.IPAddress)}


def test_the_local_ca_is_made_once_with_private_keys_and_a_loopback_certificate(tmp_path: Path):
    tls = server_tls(tmp_path, environ={})
    folder = tmp_path / "tls"
    assert {p.name for p in folder.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key"}
    for key in ("ca.key", "server.key"):
        assert oct((folder / key).stat().st_mode & 0o777) == oct(0o600)
    assert (tls.ca, tls.cert, tls.key, tls.host) == (folder / "ca.pem", folder / "server.pem", folder / "server.key",
                                                    "127.0.0.1")
    assert {"127.0.0.1", "localhost", str(ipaddress.ip_address("::1"))} <= _sans(tls.cert)
    assert tls.client_env == {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls.ca), "PREFECT_API_SSL_CERT_FILE": str(tls.ca)}
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    server_tls(tmp_path, environ={})  # the next start reuses them
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.fixture
def team(tmp_path: Path) -> SimpleNamespace:
    """A team's own CA and server certificate (made by another CA than the project's), and a stranger's."""
    own, other = local_ca(tmp_path / "team-ca"), local_ca(tmp_path / "other-ca")
    return SimpleNamespace(env={ENV["ca"]: str(own.ca), ENV["cert"]: str(own.cert), ENV["key"]: str(own.key)},
                           own=own, other=other)


def test_a_team_passes_its_own_certificates(team, tmp_path: Path):
    tls = server_tls(tmp_path / "home", environ=team.env)
    assert (tls.ca, tls.cert, tls.key) == (team.own.ca, team.own.cert, team.own.key)
    assert not (tmp_path / "home" / "tls").exists()  # no local CA made


@pytest.mark.parametrize("case", ["missing", "partial", "not-pem", "wrong-key", "wrong-ca", "ca-as-server"])
def test_wrong_team_certificates_are_one_line_naming_the_file(case: str, team, tmp_path: Path):
    env, says = dict(team.env), ""
    if case == "missing":
        env[ENV["cert"]] = str(tmp_path / "nope.pem")
        says = f"TLS cert file AIGC_TLS_CERT={tmp_path / 'nope.pem'} does not exist: pass the right file, or unset"
    elif case == "partial":
        del env[ENV["key"]]
        says = "AIGC_TLS_KEY not set: a team's own certificates need all three"
    elif case == "not-pem":
        env[ENV["cert"]] = str(team.own.key)
        says = f"TLS certificate AIGC_TLS_CERT={team.own.key} is not a PEM certificate"
    elif case == "wrong-key":
        env[ENV["key"]] = str(team.other.key)
        says = f"TLS key AIGC_TLS_KEY={team.other.key} does not match certificate AIGC_TLS_CERT={team.own.cert}"
    elif case == "wrong-ca":
        env[ENV["ca"]] = str(team.other.ca)
        says = (f"TLS certificate AIGC_TLS_CERT={team.own.cert} does not verify against CA "
                f"AIGC_TLS_CA={team.other.ca} for a loopback client (127.0.0.1: unable to get local issuer certificate")
    elif case == "ca-as-server":  # the CA's own certificate is no server certificate
        env[ENV["cert"]], env[ENV["key"]] = str(team.own.ca), str(team.own.ca.with_name("ca.key"))
        says = f"TLS certificate AIGC_TLS_CERT={team.own.ca} does not verify against CA"
    with pytest.raises(ServiceError) as err:
        server_tls(tmp_path / "home", environ=env)
    assert str(err.value).startswith(says), str(err.value)
    assert "\n" not in str(err.value)


def test_make_services_with_a_missing_team_certificate_is_one_error_line(team, tmp_path: Path):
    home = tmp_path / "home"
    ports = [f"--{name}-port={free_port()}" for name in ("postgres", "mlflow", "prefect")]
    res = subprocess.run([sys.executable, "-m", "aigc.services", "up", "--home", str(home), *ports], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=os.environ | team.env | {ENV["key"]: str(tmp_path / "missing.key")})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: TLS key file AIGC_TLS_KEY={tmp_path / 'missing.key'} does not exist")
    assert len(res.stderr.strip().splitlines()) == 1 and not (home / "pg").exists()  # nothing started


# --- the servers, over real TLS ------------------------------------------------------------------


@pytest.fixture(scope="module")
def services():
    require("postgres")
    # not under pytest's tmp_path: as root, PostgreSQL runs as the postgres user (test_team.py)
    root = Path(tempfile.mkdtemp(prefix="aigc-tls-"))
    started = []
    try:
        pg, backend = start_postgres(root)  # TLS is the default: the CA is made in root/tls
        started.append(pg)
        mlflow = start_mlflow(backend, root / "mlartifacts", root)
        started.append(mlflow)
        prefect = start_prefect(root)
        started.append(prefect)
        creds, _ = auth_setup(root)
        tls = server_tls(root)
        yield SimpleNamespace(root=root, tls=tls, pg=pg, backend=backend, mlflow=mlflow.url, prefect=prefect.url,
                              creds=creds)
    finally:
        for s in reversed(started):
            s.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_the_servers_speak_https_only_and_verify_against_the_ca(services):
    import httpx

    assert services.mlflow.startswith("https://127.0.0.1:") and services.prefect.startswith("https://127.0.0.1:")
    for url in (f"{services.mlflow}/health", f"{services.prefect}/health"):
        # the CA's client gets in
        assert httpx.get(url, verify=services.tls.client_context(), timeout=10).status_code == 200
        # plain HTTP on the same port: the TLS listener answers no HTTP at all
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https://", "http://"), timeout=10)
        # a client that does not trust the CA (httpx's default CAs) stops at the handshake
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, timeout=10)


@pytest.mark.slow
def test_postgres_refuses_plain_tcp_and_verifies_with_the_ca(services):
    import psycopg2

    assert "sslmode=verify-full" in services.backend and f"sslrootcert={services.tls.ca}" in services.backend
    # the server's copy of the key: its own user's (postgres, when run as root), mode 0600
    key = Path(services.pg.pgdata) / "server.key"
    owner = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert key.stat().st_uid == owner and oct(key.stat().st_mode & 0o777) == oct(0o600)
    assert key.read_bytes() == services.tls.key.read_bytes()
    where = {"host": "127.0.0.1", "port": services.pg.port, "user": "aigc", "dbname": "mlflow"}
    with pytest.raises(psycopg2.OperationalError, match="no encryption"):  # pg_hba: hostnossl ... reject
        psycopg2.connect(**where, sslmode="disable")
    with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):  # the system CAs only
        psycopg2.connect(**where, sslmode="verify-full", sslrootcert="system")
    conn = psycopg2.connect(**where, sslmode="verify-full", sslrootcert=str(services.tls.ca))
    with conn.cursor() as cur:
        cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        ssl_on, version = cur.fetchone()
        cur.execute("SELECT count(*) FROM experiments")  # MLflow's tables: the server got in the same way
        assert cur.fetchone()[0] >= 1
    conn.close()
    assert ssl_on and version.startswith("TLSv1.")


# What a teammate's shell runs after `source services.env && source mlflow.env`: MLflow's and
# Prefect's own clients, configured by nothing but the environment.
CLIENT = """
import json, os, sys, tempfile
from pathlib import Path
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client

client = MlflowClient()  # MLFLOW_TRACKING_URI, MLFLOW_TRACKING_SERVER_CERT_PATH
exp = client.create_experiment("over-tls")
run = client.create_run(exp)
client.log_metric(run.info.run_id, "fid", 0.5)
src = Path(tempfile.mkdtemp()) / "grid.txt"
src.write_text("pixels")
client.log_artifact(run.info.run_id, str(src))  # through the server's artifact proxy
back = Path(client.download_artifacts(run.info.run_id, "grid.txt", tempfile.mkdtemp())).read_text()

@flow
def over_tls() -> int:
    return 7

result = over_tls()  # PREFECT_API_URL, PREFECT_API_SSL_CERT_FILE
with get_client(sync_client=True) as prefect:
    runs = [(r.name, r.state_name) for r in prefect.read_flow_runs()]
    api = str(prefect.api_url)
print(json.dumps({"metric": client.get_run(run.info.run_id).data.metrics, "artifact": back,
                  "flow": result, "runs": runs, "api": api}))
"""


@pytest.mark.slow
def test_mlflow_and_prefect_round_trips_through_https_with_the_ca_variables(services, tmp_path: Path):
    from aigc.services import Service, client_env

    mlflow = Service("mlflow", 0, 0, services.mlflow, "")
    prefect = Service("prefect", 0, 0, services.prefect, "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_"))}
    env |= client_env(mlflow, prefect, services.tls) | services.creds.env | {"PREFECT_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", CLIENT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["metric"] == {"fid": 0.5} and seen["artifact"] == "pixels"
    assert seen["flow"] == 7 and [state for _, state in seen["runs"]] == ["Completed"]
    assert seen["api"].startswith("https://127.0.0.1:")
    # the same client without the CA variable: MLflow refuses the server's certificate
    del env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    res = subprocess.run([sys.executable, "-c", "from mlflow import MlflowClient; MlflowClient().search_experiments()"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
def test_aigc_says_in_one_line_when_the_tracking_servers_certificate_is_not_trusted(
        services, monkeypatch: pytest.MonkeyPatch):
    from aigc.errors import UserError
    from aigc.tracking.store import _check_reachable

    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
    with pytest.raises(UserError) as err:
        _check_reachable(services.mlflow)
    assert str(err.value).startswith(f"MLflow tracking server {services.mlflow}: its certificate does not verify "
                                     f"against the system's CAs (certificate verify failed): export "
                                     f"MLFLOW_TRACKING_SERVER_CERT_PATH="), str(err.value)
    for key, value in services.tls.client_env.items() | services.creds.env.items():
        monkeypatch.setenv(key, value)
    _check_reachable(services.mlflow)  # with the CA and the team user: through
