"""The shared services of a team set-up, started on loopback from the OS's and the venv's own
engines: PostgreSQL, an MLflow tracking server on it with proxied artifacts, a Prefect server
(with its scheduler) and, for tests of the DVC SSH remote, OpenSSH's ``sshd``.

    python -m aigc.services up       # make services: PostgreSQL + MLflow + Prefect, prints the exports
    python -m aigc.services down     # make services-down
    python -m aigc.services status

Their data lives under ``.services/`` (git-ignored): ``pg/`` the database cluster,
``mlartifacts/`` the artifacts MLflow proxies, ``prefect/`` the Prefect server's home, ``*.log``.
The tests start the same engines through the functions here, each in its own folder.

The MLflow server runs MLflow's basic-auth app (``mlflow server --app-name basic-auth``): a
client without a user name and password is refused (HTTP 401). The first start writes
``auth.json`` (mode 0600: the admin's and the team user's passwords, the server's secret key),
``basic_auth.ini`` (the auth app's settings; its users live in ``basic_auth.db``) and
``mlflow.env`` (0600), which a shell sources to become the team user.

PostgreSQL refuses to run as root; run as root (CI), the cluster belongs to the ``postgres``
system user the Debian package creates (``apt-get install postgresql``).
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aigc import environment

environment.apply()  # the offline/quiet environment (aigc/environment.py): the servers inherit it

HOME = Path(".services")
STATE = "state.json"
PG_USER = "aigc"
PG_DB = "mlflow"
PORTS = {"postgres": 5433, "mlflow": 5002, "prefect": 4200}  # `make services` defaults, loopback only


class ServiceError(RuntimeError):
    """A service could not start; the message says which, and where its log is."""


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


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
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


def start_postgres(root: Path, port: int | None = None, timeout_s: float = 60) -> tuple[Service, str]:
    """A PostgreSQL cluster in ``root/pg`` on 127.0.0.1:``port`` with an ``mlflow`` database;
    returns the service and the SQLAlchemy URI MLflow takes (``postgresql+psycopg2://...``).

    Trust authentication on loopback only: it is a local development/test cluster. A team's
    server has its own users and passwords (README, "Team setup").
    """
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
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
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={pgdata.resolve()}"
    done = subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(log), "-o", opts, "-w",
                                        "-t", str(int(timeout_s)), "start"]),
                          capture_output=True, text=True, timeout=timeout_s + 10)
    if done.returncode != 0:
        raise ServiceError(f"PostgreSQL did not start on 127.0.0.1:{port} (log: {log}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    service = Service("postgres", pid, port, f"postgresql://{PG_USER}@127.0.0.1:{port}/{PG_DB}", str(log),
                      pgdata=str(pgdata))
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {PG_DB}")
    conn.close()
    return service, f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{PG_DB}"


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


def _ensure_user(url: str, creds: Credentials) -> None:
    """Create the team user through the auth app's REST API, as the admin (once)."""
    import httpx

    res = httpx.post(f"{url}/api/2.0/mlflow/users/create", json={"username": creds.user, "password": creds.password},
                     auth=("admin", creds.admin_password), timeout=30)
    if res.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in res.text:
        raise ServiceError(f"the MLflow auth app refused to create user {creds.user!r}: "
                           f"HTTP {res.status_code} {res.text[:300]}")


def start_mlflow(backend_uri: str, artifacts: Path, root: Path, port: int | None = None,
                 timeout_s: float = 120, auth: bool = True) -> Service:
    """``mlflow server`` on ``backend_uri`` (PostgreSQL), proxying artifacts to ``artifacts``
    (clients upload and download through the server: they need no access to the store).

    ``auth``: with MLflow's basic-auth app (``--app-name basic-auth``): anonymous requests are
    refused; the team user of :func:`auth_setup` (``root/auth.json``) signs in with a password."""
    port = port or free_port()
    log = root / "mlflow.log"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [_venv_tool("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts.resolve()), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {}
    if auth:
        creds, ini = auth_setup(root)
        cmd += ["--app-name", "basic-auth"]
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()), "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.secret_key,
               "MLFLOW_AUTH_ADMIN_PASSWORD": creds.admin_password}  # read on the first start only
    proc = _spawn(cmd, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _healthy(f"{url}/health"), proc, "the MLflow server", log, timeout_s)
        if auth:
            _ensure_user(url, creds)
    except ServiceError:
        Service("mlflow", proc.pid, port, url, str(log)).stop()
        raise
    return Service("mlflow", proc.pid, port, url, str(log))


def start_prefect(root: Path, port: int | None = None, timeout_s: float = 120) -> Service:
    """``prefect server start`` with its background services (the scheduler a cron schedule and
    a work pool's late runs need); its database lives in ``root/prefect``."""
    port = port or free_port()
    log = root / "prefect.log"
    home = (root / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    proc = _spawn([_venv_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                   "--no-ui", "--analytics-off", "--log-level", "WARNING"], log, env={"PREFECT_HOME": str(home)})
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait(lambda: _healthy(f"{url}/health"), proc, "the Prefect server", log, timeout_s)
    except ServiceError:
        Service("prefect", proc.pid, port, url, str(log)).stop()
        raise
    return Service("prefect", proc.pid, port, url, str(log))


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
    started: list[Service] = []
    try:
        pg, backend = start_postgres(home, ports["postgres"])
        started.append(pg)
        started.append(start_mlflow(backend, home / "mlartifacts", home, ports["mlflow"]))
        started.append(start_prefect(home, ports["prefect"]))
    except BaseException:
        for s in reversed(started):
            s.stop()
        raise
    (home / STATE).write_text(json.dumps([asdict(s) for s in started], indent=1))
    return started


def down(home: Path) -> list[Service]:
    services = _load(home)
    for s in reversed(services):
        s.stop()
    (home / STATE).unlink(missing_ok=True)
    return services

