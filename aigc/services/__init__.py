"""The shared services of a team set-up, started on loopback from the OS's and the venv's own
engines: PostgreSQL, an MLflow tracking server on it with proxied artifacts, a Prefect server
(with its scheduler) and, for tests of the DVC SSH remote, OpenSSH's ``sshd``.

    python -m aigc.services up       # make services: PostgreSQL + MLflow + Prefect, prints the exports
    python -m aigc.services down     # make services-down
    python -m aigc.services status

Their data lives under ``.services/`` (git-ignored): ``pg/`` the database cluster,
``mlartifacts/`` the artifacts MLflow proxies, ``prefect/`` the Prefect server's home, ``tls/``
the local CA, ``*.log``.
The tests start the same engines through the functions here, each in its own folder.

The MLflow server runs MLflow's basic-auth app (``mlflow server --app-name basic-auth``): a
client without a user name and password is refused (HTTP 401). The first start writes
``auth.json`` (mode 0600: the admin's and the team user's passwords, the server's secret key),
``basic_auth.ini`` (the auth app's settings; its users live in ``basic_auth.db``) and
``mlflow.env`` (0600), which a shell sources to become the team user.

All three speak TLS only (``tls=True``, the default of every ``start_*`` here and the tests'):
MLflow and Prefect serve HTTPS (their uvicorn with ``--ssl-certfile``/``--ssl-keyfile``),
PostgreSQL runs with ``ssl=on`` and accepts TCP as ``hostssl`` only, and MLflow reaches it with
``sslmode=verify-full&sslrootcert=<CA>``. The certificates are a team's own (``AIGC_TLS_CA``,
``AIGC_TLS_CERT``, ``AIGC_TLS_KEY``) or those of a local CA made on first use in ``tls/``
(:mod:`aigc.services.tls`); the health checks and the auth app's user creation verify against the
CA. ``up`` writes ``services.env`` beside ``mlflow.env``: the ``https://`` URLs and the CA
variables MLflow's and Prefect's clients verify with (``MLFLOW_TRACKING_SERVER_CERT_PATH``,
``PREFECT_API_SSL_CERT_FILE``). ``make run``'s own short-lived Prefect server
(:mod:`aigc.services.prefect_server`) stays plain HTTP on loopback.

PostgreSQL refuses to run as root; run as root (CI), the cluster belongs to the ``postgres``
system user the Debian package creates (``apt-get install postgresql``).
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from aigc import environment
from aigc.services.errors import ServiceError
from aigc.services.tls import TLS, server_tls

environment.apply()  # the offline/quiet environment (aigc/environment.py): the servers inherit it

HOME = Path(".services")
STATE = "state.json"
PG_USER = "aigc"
PG_DB = "mlflow"
PORTS = {"postgres": 5433, "mlflow": 5002, "prefect": 4200}  # `make services` defaults, loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(ok, proc: subprocess.Popen | None, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise ServiceError(f"{what} did not start within {timeout_s:g} s (log: {log}):\n{tail}")
        time.sleep(0.2)


def _verify(tls: TLS | None):
    """httpx's ``verify=`` for a service: a context trusting only its CA (plain HTTP: unused)."""
    return tls.client_context() if tls is not None else True


def _healthy(url: str, tls: TLS | None = None) -> bool:
    """The server answers ``url`` with 200, its certificate verified against ``tls.ca``. A
    certificate the CA does not vouch for is not "not up yet": it raises ServiceError at once."""
    import ssl

    import httpx

    try:
        return httpx.get(url, timeout=2, verify=_verify(tls)).status_code == 200
    except httpx.HTTPError as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLCertVerificationError):
            trusted = tls.ca if tls else "the system CAs"
            raise ServiceError(f"{url}: the server's certificate does not verify against {trusted} "
                               f"({cause.verify_message})") from None
        return False


@dataclass
class Service:
    """One started service: what it is, its process, where it answers."""

    name: str
    pid: int
    port: int
    url: str
    log: str
    pgdata: str | None = None  # PostgreSQL is stopped with pg_ctl, not a signal to a child
    ca: str | None = None  # the CA bundle its clients verify it with (None: no TLS)

    def stop(self) -> None:
        if self.pgdata:
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", self.pgdata, "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=60)
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)  # each service leads its own session
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            try:  # reap it if it is our child
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                pass
            time.sleep(0.1)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- PostgreSQL ------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    """A PostgreSQL server binary (Debian keeps them out of PATH, in /usr/lib/postgresql/N/bin)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise ServiceError(f"PostgreSQL's {name} not found: install the server "
                           f"(as root: apt-get update && apt-get install -y postgresql)")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``cmd`` as the ``postgres`` system user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _resolve_tls(tls: TLS | bool, root: Path) -> TLS | None:
    """``True``: the team's certificates (AIGC_TLS_*) or the local CA in ``root/tls``; ``False``: none."""
    if tls is True:
        return server_tls(root)
    return tls or None


def _pg_hba(tls: TLS | None) -> str:
    """Who may connect: the local socket (pg_ctl, as the cluster's owner) and, over TCP, loopback
    with TLS only (``hostssl``); a TCP connection without TLS is rejected outright."""
    tcp = "hostssl" if tls else "host"
    lines = ["# written by aigc.services on every start", "local all all trust",
             f"{tcp} all all 127.0.0.1/32 trust", f"{tcp} all all ::1/128 trust"]
    if tls:
        lines += ["hostnossl all all 0.0.0.0/0 reject", "hostnossl all all ::/0 reject"]
    return "\n".join(lines) + "\n"


def start_postgres(root: Path, port: int | None = None, timeout_s: float = 60,
                   tls: TLS | bool = True) -> tuple[Service, str]:
    """A PostgreSQL cluster in ``root/pg`` on 127.0.0.1:``port`` with an ``mlflow`` database;
    returns the service and the SQLAlchemy URI MLflow takes (``postgresql+psycopg2://...``).

    ``tls`` (default): ``ssl=on`` with the certificate and key of :func:`aigc.services.tls.server_tls`
    (copied into the cluster, the key mode 0600 and owned by the server's user), TCP clients
    accepted over TLS only (``hostssl``), and a URI that verifies the server
    (``sslmode=verify-full&sslrootcert=<CA>``). ``False``: plain TCP, for nothing but loopback.

    Trust authentication on loopback only: it is a local development/test cluster. A team's
    server has its own users and passwords (docs/team.md).
    """
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    tls = _resolve_tls(tls, root)
    pgdata, log = root / "pg", root / "postgres.log"
    if os.geteuid() == 0:
        # the postgres user must reach its folder: root's temp folders are often 0700
        for p in [root, *root.parents]:
            if p.stat().st_mode & 0o001 == 0:
                os.chmod(p, p.stat().st_mode | 0o011)
        _give_to_postgres(root)
    if not (pgdata / "PG_VERSION").exists():
        done = subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(pgdata), "-U", PG_USER, "--auth=trust",
                                            "--encoding=UTF8", "--no-instructions"]),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ServiceError(f"initdb {pgdata} failed: {done.stderr.strip()[-800:]}")
    log.touch()
    _give_to_postgres(log)
    hba = pgdata / "pg_hba.conf"
    hba.write_text(_pg_hba(tls))
    _give_to_postgres(hba)
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={pgdata.resolve()}"
    if tls:
        # PostgreSQL refuses a key others can read, and must own it: copies in its own data folder
        # (relative names there: no path for pg_ctl's shell to split)
        for src, name in ((tls.cert, "server.crt"), (tls.key, "server.key")):
            _write_private(pgdata / name, src.read_text())
            _give_to_postgres(pgdata / name)
        opts += " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
    done = subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(log), "-o", opts, "-w",
                                        "-t", str(int(timeout_s)), "start"]),
                          capture_output=True, text=True, timeout=timeout_s + 10)
    if done.returncode != 0:
        raise ServiceError(f"PostgreSQL did not start on 127.0.0.1:{port} (log: {log}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    host = tls.host if tls else "127.0.0.1"
    ssl_args = {"sslmode": "verify-full", "sslrootcert": str(tls.ca)} if tls else {}
    query = ("?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in ssl_args.items())) if tls else ""
    service = Service("postgres", pid, port, f"postgresql://{PG_USER}@{host}:{port}/{PG_DB}{query}", str(log),
                      pgdata=str(pgdata), ca=str(tls.ca) if tls else None)
    import psycopg2

    try:
        conn = psycopg2.connect(host=host, port=port, user=PG_USER, dbname="postgres", **ssl_args)
    except psycopg2.OperationalError as exc:
        service.stop()
        raise ServiceError(f"PostgreSQL on {host}:{port} refused a verifying client "
                           f"(log: {log}): {str(exc).strip()}") from None
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {PG_DB}")
    conn.close()
    return service, f"postgresql+psycopg2://{PG_USER}@{host}:{port}/{PG_DB}{query}"


# --- MLflow and Prefect servers ----------------------------------------------------------------


def _venv_tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | (env or {}))


TEAM_USER = "aigc"  # the non-admin account the pipeline runs as (`make services`)
# Every signed-in user may read and write every experiment and registered model (a team shares
# one experiment and one champion alias); deleting and managing permissions stay with a
# resource's creator and the admin. Anonymous clients get nothing.
AUTH_DEFAULT_PERMISSION = "EDIT"


@dataclass
class Credentials:
    """The basic-auth secrets of one MLflow server (``root/auth.json``, mode 0600)."""

    secret_key: str  # MLflow's CSRF key: the same across restarts and workers
    admin_password: str
    user: str
    password: str

    @property
    def env(self) -> dict[str, str]:
        """What a client exports to sign in as the team user."""
        return {"MLFLOW_TRACKING_USERNAME": self.user, "MLFLOW_TRACKING_PASSWORD": self.password}


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def auth_setup(root: Path) -> tuple[Credentials, Path]:
    """The auth app's settings for a server whose state lives in ``root``: the secrets (made once,
    then reused) and ``basic_auth.ini``; returns them and the ini's path."""
    root.mkdir(parents=True, exist_ok=True)
    secret = root / "auth.json"
    if secret.exists():
        creds = Credentials(**json.loads(secret.read_text()))
    else:
        creds = Credentials(secrets.token_urlsafe(32), secrets.token_urlsafe(18), TEAM_USER, secrets.token_urlsafe(18))
        _write_private(secret, json.dumps(asdict(creds), indent=1))
    ini = root / "basic_auth.ini"
    ini.write_text("\n".join([
        "[mlflow]", f"default_permission = {AUTH_DEFAULT_PERMISSION}",
        f"database_uri = sqlite:///{(root / 'basic_auth.db').resolve()}", "admin_username = admin",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", "",
    ]))
    _write_private(root / "mlflow.env", "".join(f"export {k}={v}\n" for k, v in creds.env.items()))
    return creds, ini


def _ensure_user(url: str, creds: Credentials, tls: TLS | None = None) -> None:
    """Create the team user through the auth app's REST API, as the admin (once), verifying the
    server's certificate against ``tls.ca``."""
    import httpx

    res = httpx.post(f"{url}/api/2.0/mlflow/users/create", json={"username": creds.user, "password": creds.password},
                     auth=("admin", creds.admin_password), timeout=30, verify=_verify(tls))
    if res.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in res.text:
        raise ServiceError(f"the MLflow auth app refused to create user {creds.user!r}: "
                           f"HTTP {res.status_code} {res.text[:300]}")


def start_mlflow(backend_uri: str, artifacts: Path, root: Path, port: int | None = None,
                 timeout_s: float = 120, auth: bool = True, tls: TLS | bool = True) -> Service:
    """``mlflow server`` on ``backend_uri`` (PostgreSQL), proxying artifacts to ``artifacts``
    (clients upload and download through the server: they need no access to the store).

    ``auth``: with MLflow's basic-auth app (``--app-name basic-auth``): anonymous requests are
    refused; the team user of :func:`auth_setup` (``root/auth.json``) signs in with a password.

    ``tls`` (default): HTTPS only, with the certificate of :func:`aigc.services.tls.server_tls`
    (the team's, or the local CA's in ``root/tls``): MLflow's uvicorn (the default server, the
    auth app's too) gets ``--ssl-certfile``/``--ssl-keyfile`` through ``--uvicorn-opts``. Clients
    verify it with ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (the CA bundle)."""
    port = port or free_port()
    tls = _resolve_tls(tls, root)
    log = root / "mlflow.log"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [_venv_tool("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts.resolve()), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if tls:
        cmd += ["--uvicorn-opts", shlex.join(["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)])]
    env = {}
    if auth:
        creds, ini = auth_setup(root)
        cmd += ["--app-name", "basic-auth"]
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()), "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.secret_key,
               "MLFLOW_AUTH_ADMIN_PASSWORD": creds.admin_password}  # read on the first start only
    proc = _spawn(cmd, log, env)
    url = f"https://{tls.host}:{port}" if tls else f"http://127.0.0.1:{port}"
    service = Service("mlflow", proc.pid, port, url, str(log), ca=str(tls.ca) if tls else None)
    try:
        _wait(lambda: _healthy(f"{url}/health", tls), proc, "the MLflow server", log, timeout_s)
        if auth:
            _ensure_user(url, creds, tls)
    except ServiceError:
        service.stop()
        raise
    return service


def start_prefect(root: Path, port: int | None = None, timeout_s: float = 120, tls: TLS | bool = True) -> Service:
    """Prefect's server with its background services (the scheduler a cron schedule and a work
    pool's late runs need); its database lives in ``root/prefect``.

    It is what ``prefect server start`` runs (prefect/cli/_server_utils.py, one worker): uvicorn
    on ``prefect.server.api.server:create_app`` with its settings from the environment, started
    here as ``python -m uvicorn --factory`` because the CLI has no TLS options. ``tls`` (default):
    HTTPS only, with the certificate of :func:`aigc.services.tls.server_tls`; clients verify it
    with ``PREFECT_API_SSL_CERT_FILE`` (the CA bundle)."""
    port = port or free_port()
    tls = _resolve_tls(tls, root)
    log = root / "prefect.log"
    home = (root / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if tls:
        cmd += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    env = {"PREFECT_HOME": str(home), "PREFECT__SERVER_FINAL": "1",  # as `prefect server start` sets them
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
           "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "true"} | (tls.client_env if tls else {})
    proc = _spawn(cmd, log, env=env)
    url = f"https://{tls.host}:{port}/api" if tls else f"http://127.0.0.1:{port}/api"
    service = Service("prefect", proc.pid, port, url, str(log), ca=str(tls.ca) if tls else None)
    try:
        _wait(lambda: _healthy(f"{url}/health", tls), proc, "the Prefect server", log, timeout_s)
    except ServiceError:
        service.stop()
        raise
    return service


# --- sshd, for the DVC SSH remote ----------------------------------------------------------------


def start_sshd(root: Path, port: int | None = None, timeout_s: float = 30) -> tuple[Service, Path]:
    """OpenSSH's ``sshd`` on 127.0.0.1:``port`` for this user, key login only; returns the service
    and the private key a client logs in with (``root/id_ed25519``)."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd is None:
        raise ServiceError("OpenSSH's sshd not found: install it (as root: apt-get update && "
                           "apt-get install -y openssh-server)")
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = root / "host_ed25519", root / "id_ed25519"
    for key in (host_key, user_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    authorized = root / "authorized_keys"
    authorized.write_text(user_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation folder
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key.resolve()}",
        f"AuthorizedKeysFile {authorized.resolve()}", f"PidFile {(root / 'sshd.pid').resolve()}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
        f"AllowUsers {getpass.getuser()}", "Subsystem sftp internal-sftp", "",
    ]))
    log = root / "sshd.log"
    proc = _spawn([sshd, "-D", "-e", "-f", str(config.resolve())], log)
    _wait(lambda: _port_open(port), proc, "sshd", log, timeout_s)
    return Service("sshd", proc.pid, port, f"ssh://{getpass.getuser()}@127.0.0.1:{port}", str(log)), user_key


# --- make services / services-down --------------------------------------------------------------


def _load(home: Path) -> list[Service]:
    try:
        return [Service(**s) for s in json.loads((home / STATE).read_text())]
    except FileNotFoundError:
        return []


def up(home: Path, ports: dict[str, int] | None = None) -> list[Service]:
    ports = PORTS | (ports or {})
    if _load(home):
        raise ServiceError(f"services already recorded in {home / STATE}; `make services-down` first")
    busy = [f"{name} ({port})" for name, port in ports.items() if _port_open(port)]
    if busy:
        raise ServiceError(f"port(s) already in use on 127.0.0.1: {', '.join(busy)}; stop what holds them")
    home.mkdir(parents=True, exist_ok=True)
    tls = server_tls(home)  # before anything starts: a wrong team certificate is one line
    started: list[Service] = []
    try:
        pg, backend = start_postgres(home, ports["postgres"], tls=tls)
        started.append(pg)
        mlflow = start_mlflow(backend, home / "mlartifacts", home, ports["mlflow"], tls=tls)
        started.append(mlflow)
        prefect = start_prefect(home, ports["prefect"], tls=tls)
        started.append(prefect)
    except BaseException:
        for s in reversed(started):
            s.stop()
        raise
    (home / STATE).write_text(json.dumps([asdict(s) for s in started], indent=1))
    write_client_env(home, client_env(mlflow, prefect, tls))
    return started


ENV_FILE = "services.env"  # beside mlflow.env: the URLs and the CA, nothing secret


def client_env(mlflow: Service, prefect: Service, tls: TLS | None) -> dict[str, str]:
    """What a client of these services exports: the https URLs and the CA bundle MLflow's and
    Prefect's clients verify them with (the credentials are in ``mlflow.env``)."""
    return {"MLFLOW_TRACKING_URI": mlflow.url, "PREFECT_API_URL": prefect.url} | (tls.client_env if tls else {})


def write_client_env(home: Path, env: dict[str, str]) -> Path:
    path = home / ENV_FILE
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return path


def down(home: Path) -> list[Service]:
    services = _load(home)
    for s in reversed(services):
        s.stop()
    (home / STATE).unlink(missing_ok=True)
    return services

