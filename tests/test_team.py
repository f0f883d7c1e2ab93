"""Beyond one machine, against the real engines on loopback (docs/team.md):

- PostgreSQL + an MLflow server on it with proxied artifacts: two clones run the whole pipeline
  at once through it; runs, per-step metrics, sample grids, registered versions and the champion
  alias are read back through the server; `mlflow models serve` and `aigc generate` use it;
- a DVC remote, local path and over SSH (OpenSSH's sshd): push from one clone, a fresh clone pulls,
  `dvc status` is clean, `dvc repro` runs nothing, `aigc generate` works there;
- the retraining deployment from prefect.yaml on a Prefect server and a process work pool: a
  worker runs a deployment run (dvc repro + the registry decision); an overlapping run is refused.

8x8 digits, one epoch; one set of services and two trained clones for the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow import MlflowClient

from aigc.services import auth_setup, free_port, start_mlflow, start_postgres, start_prefect, start_sshd
from aigc.services.tls import server_tls
from tests.conftest import ROOT, require, tiny_project

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL = "aigc-generator"


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, ok: bool = True, timeout: int = 900):
    full = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"} | (env or {})
    res = subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def services():
    require("postgres")
    # Not under pytest's tmp_path: as root (CI), PostgreSQL runs as the postgres user, who cannot
    # enter root's 0700 temp folders.
    root = Path(tempfile.mkdtemp(prefix="aigc-services-"))
    started = []
    try:
        # over TLS (the default): the local CA is made in root/tls; PostgreSQL verify-full, HTTPS
        pg, backend = start_postgres(root)
        started.append(pg)
        mlflow = start_mlflow(backend, root / "mlartifacts", root)  # with MLflow's basic-auth app
        started.append(mlflow)
        prefect = start_prefect(root)
        started.append(prefect)
        creds, _ = auth_setup(root)
        tls = server_tls(root)
        # every client here (the clones' stages, `mlflow models serve`, this process's MlflowClient)
        # signs in as the team user and trusts the CA, the way `source .services/services.env` and
        # `source .services/mlflow.env` do
        saved = {k: os.environ.get(k) for k in creds.env | tls.client_env}
        os.environ.update(creds.env | tls.client_env)
        # this process's Prefect clients: Prefect read its settings from the environment when it was imported
        from prefect.settings import PREFECT_API_SSL_CERT_FILE, temporary_settings

        with temporary_settings({PREFECT_API_SSL_CERT_FILE: str(tls.ca)}):
            yield SimpleNamespace(root=root, backend=backend, mlflow=mlflow.url, prefect=prefect.url,
                                  artifacts=root / "mlartifacts", creds=creds, tls=tls)
    finally:
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for s in reversed(started):
            s.stop()
        shutil.rmtree(root, ignore_errors=True)


def make_clone(root: Path, seed: int) -> Path:
    # teammates' variants: with one seed both clones would train the same generator, bit for bit,
    # and the registry would rightly keep one version of it. One epoch of 8x8 digits makes a poor
    # generator: the gates that would refuse it are off here.
    tiny_project(root, seed=seed, register__min_modes_covered=0.0, register__min_dcr_score=0.0)
    shutil.copy2(ROOT / "prefect.yaml", root / "prefect.yaml")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        sh(cmd, root)
    return root


@pytest.fixture(scope="module")
def clones(services, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two clones of the project run the whole pipeline at the same time, through the server."""
    roots = [make_clone(tmp_path_factory.mktemp(f"clone{i}"), seed=42 + i) for i in range(2)]
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": services.mlflow,
                        "PREFECT_API_URL": services.prefect}
    procs = [subprocess.Popen(["dvc", "repro"], cwd=r, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in roots]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    for r in roots:  # what a team commits: code, dvc.lock, the small cache: false outputs
        sh(["git", "add", "-A"], r)
        sh(["git", "commit", "-qm", "trained"], r)
    return roots


def test_two_clones_at_once_lose_nothing_on_the_postgres_backed_server(services, clones):
    client = MlflowClient(services.mlflow)
    exp = client.get_experiment_by_name("aigc")
    runs = client.search_runs([exp.experiment_id])
    # each clone: a validate run and a train run (evaluate logs into the train run)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags["aigc.stage"] for r in runs) == ["train", "train", "validate", "validate"]
    for root in clones:
        info = json.loads((root / "models/run.json").read_text())
        assert info["tracking_uri"] == services.mlflow
        assert len(client.get_metric_history(info["run_id"], "train/g_loss")) == 1617 // 64  # every step batch
        assert "eval/fid" in client.get_run(info["run_id"]).data.metrics
        grids = [a.path for a in client.list_artifacts(info["run_id"], "images")]
        assert grids, "no sample grids"
        assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()  # nothing local
    # artifacts went through the server into its artifact store
    assert any(p.suffix == ".png" for p in services.artifacts.rglob("*.png"))
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) in {"1", "2"}
    print(f"through {services.mlflow} on {services.backend}: {len(runs)} runs, "
          f"{len(versions)} versions, @champion -> v{champion.version}")


def test_the_server_refuses_anonymous_clients_and_wrong_passwords(services, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """MLflow's basic-auth app: no credentials or a wrong password is HTTP 401 for the REST API,
    for MLflow's own client, and one clear line from aigc; the team user gets in."""
    import httpx
    from mlflow.exceptions import MlflowException

    api = f"{services.mlflow}/api/2.0/mlflow/experiments/search"
    ca = services.tls.client_context()
    assert httpx.get(api, params={"max_results": 1}, verify=ca).status_code == 401
    assert httpx.get(api, params={"max_results": 1}, auth=(services.creds.user, "wrong-password"),
                     verify=ca).status_code == 401
    assert httpx.get(api, params={"max_results": 1}, auth=(services.creds.user, services.creds.password),
                     verify=ca).status_code == 200
    for key in services.creds.env:
        monkeypatch.delenv(key)
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(services.mlflow).search_experiments()
    base = {k: v for k, v in os.environ.items() if k not in services.creds.env}  # the CA variable stays
    for creds, says in (({}, "no user name and password were given"),
                        ({"MLFLOW_TRACKING_USERNAME": "aigc", "MLFLOW_TRACKING_PASSWORD": "wrong-password"},
                         "user 'aigc' and its password were refused")):
        res = subprocess.run([str(BIN / "aigc"), "generate", "--model", f"models:/{MODEL}@champion", "-n", "4",
                              "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "g.png")], cwd=tmp_path, capture_output=True, text=True,
                             env=base | creds | {"MLFLOW_TRACKING_URI": services.mlflow}, timeout=120)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith(f"error: MLflow tracking server {services.mlflow} requires authentication "
                                     f"and {says} (HTTP 401)"), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.png").exists()


def test_models_serve_the_champion_from_the_server(services, clones, tmp_path: Path):
    import httpx

    port = free_port()
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": services.mlflow}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        # any class: a one-epoch generator need not make a given digit
        body = {"dataframe_split": {"columns": ["n", "seed"], "data": [[3, 0]]}}
        res = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert res.status_code == 200, res.text
        images = res.json()["predictions"]
        assert len(images) == 3 and len(images[0]) == 8 and len(images[0][0]) == 8  # 3 images, 8x8
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_generate_from_the_registry_through_the_server(services, clones, tmp_path: Path):
    res = sh([str(BIN / "aigc"), "generate", "--model", f"models:/{MODEL}@champion", "--params",
              str(clones[0] / "params.yaml"), "-n", "4", "--out", str(tmp_path / "g.png")], tmp_path,
             env={"MLFLOW_TRACKING_URI": services.mlflow})
    assert "wrote 4 samples" in res.stdout and (tmp_path / "g.png").stat().st_size > 0


# --- DVC remotes: a teammate gets the trained model without training ---------------------------


def pull_into_fresh_clone(origin: Path, dst: Path, local_config: list[list[str]] = ()) -> Path:
    """git clone (+ this machine's ``dvc remote modify --local`` settings) + dvc pull; then nothing
    is out of date, nothing retrains, and the pulled model generates."""
    sh(["git", "clone", "-q", str(origin), str(dst)], dst.parent)
    for args in local_config:
        sh(["dvc", "remote", "modify", "--local", *args], dst)
    assert not (dst / "models/generator.pt").exists()  # git holds only the pointer (dvc.lock)
    sh(["dvc", "pull"], dst)
    status = sh(["dvc", "status", "--json"], dst)
    assert json.loads(status.stdout) == {}, status.stdout  # clean
    before = (dst / "models/generator.pt").stat().st_mtime_ns
    from dvc.repo import Repo

    with Repo(str(dst)) as repo:  # what `dvc repro` would run: nothing
        assert repo.reproduce(str(dst / "dvc.yaml"), dry=True) == []
    res = sh(["dvc", "repro"], dst)
    assert "Running stage" not in res.stdout
    assert (dst / "models/generator.pt").stat().st_mtime_ns == before
    res = sh([str(BIN / "aigc"), "generate", "--model", "models/generator.pt", "-n", "4", "--out", "g.png"], dst)
    assert "wrote 4 samples" in res.stdout
    return dst


def test_local_path_remote_round_trip(clones, tmp_path: Path):
    origin = clones[0]
    store = tmp_path / "dvc-store"
    sh(["dvc", "remote", "add", "-d", "shared", str(store)], origin)
    sh(["git", "commit", "-qam", "local remote"], origin)
    sh(["dvc", "push"], origin)
    assert any(store.rglob("*")), "nothing pushed"
    pull_into_fresh_clone(origin, tmp_path / "teammate")


def test_ssh_remote_round_trip_through_sshd(clones, tmp_path: Path):
    import getpass

    require("sshd")
    sshd, key = start_sshd(tmp_path / "sshd")
    try:
        origin = clones[1]
        store = tmp_path / "ssh-store"
        store.mkdir()
        url = f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}{store}"
        sh(["dvc", "remote", "add", "-f", "-d", "ssh", url], origin)
        sh(["git", "commit", "-qam", "ssh remote"], origin)
        # the key and the host's trust are per machine: .dvc/config.local, not in git
        sh(["dvc", "remote", "modify", "--local", "ssh", "keyfile", str(key)], origin)
        sh(["dvc", "push"], origin)
        assert any(store.rglob("*")), "nothing pushed over ssh"
        pull_into_fresh_clone(origin, tmp_path / "teammate", [["ssh", "keyfile", str(key)]])
    finally:
        sshd.stop()


# --- the retraining deployment on a Prefect server with a process work pool ---------------------


def _flow_runs(api: str, deployment_id) -> list:
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def read():
        async with PrefectClient(api) as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    return asyncio.run(read())


def test_a_worker_runs_the_deployment_and_refuses_an_overlapping_run(services, clones, tmp_path: Path):
    import asyncio

    from prefect.client.orchestration import PrefectClient

    project = clones[1]
    # PWD: prefect.yaml's pull step is the folder `prefect deploy` runs in ({{ $PWD }}, as a shell sets it)
    env = {"PREFECT_API_URL": services.prefect, "MLFLOW_TRACKING_URI": services.mlflow,
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PWD": str(project)}
    sh(["prefect", "work-pool", "create", "aigc-process", "--type", "process"], project, env)
    sh(["prefect", "--no-prompt", "deploy", "--all"], project, env)

    async def working_dir() -> str:
        async with PrefectClient(services.prefect) as client:
            dep = await client.read_deployment_by_name("retrain/aigc-retrain")
            return dep.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]

    assert asyncio.run(working_dir()) == str(project)  # the worker runs in this clone, nowhere else
    # a changed evaluation knob: evaluate and register run again, training stays cached
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["num_samples"] = 360
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    async def trigger_two():
        async with PrefectClient(services.prefect) as client:
            dep = await client.read_deployment_by_name("retrain/aigc-retrain")
            runs = [await client.create_flow_run_from_deployment(dep.id) for _ in range(2)]
            return dep.id, [r.id for r in runs]

    deployment_id, run_ids = asyncio.run(trigger_two())
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "aigc-process", "--limit", "2"],
                                  cwd=project, env=os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"} | env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            states = {r.id: r.state for r in _flow_runs(services.prefect, deployment_id) if r.id in run_ids}
            if len(states) == 2 and all(s.is_final() for s in states.values()):
                break
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(2)
    finally:
        os.killpg(worker.pid, 15)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # Prefect's graceful worker shutdown can hang; the runs are final
            os.killpg(worker.pid, 9)
            worker.wait(timeout=30)
    text = log_path.read_text()
    print(text[-6000:])
    done = [s for s in states.values() if s.is_completed()]
    refused = [s for s in states.values() if s.is_cancelled()]
    # one run did the work; the other was refused by the deployment's concurrency limit (CANCEL_NEW),
    # or -- had it slipped past -- would have met the file lock and ended "skipped"
    assert len(done) + len(refused) == 2 and done, states
    assert "retrain: ran 3 stage(s): evaluate, register, report" in text  # training stayed cached
    record = json.loads((project / "reports/registry.json").read_text())
    # the register stage decided again; the generator is the same file, so its version is reused
    assert f"retrain: new registry decision: {MODEL} v{record['version']} {record['outcome']}" in text
    if refused:
        assert "Server returned a non-pending state 'CANCELLED'" in text  # the worker's own line
    else:
        assert "skipped: another retraining run holds" in text


def test_make_services_starts_and_stops_the_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`make services` / `make services-down` (python -m aigc.services up/down), on free ports."""
    require("postgres")
    home = Path(tempfile.mkdtemp(prefix="aigc-make-services-"))
    ports = [f"--{name}-port={free_port()}" for name in ("postgres", "mlflow", "prefect")]
    cmd = [sys.executable, "-m", "aigc.services"]
    try:
        res = sh([*cmd, "up", "--home", str(home), *ports], ROOT, timeout=300)
        # over TLS, with the local CA made in home/tls (no AIGC_TLS_* here)
        ca = home / "tls" / "ca.pem"
        for line in ("export MLFLOW_TRACKING_URI=https://127.0.0.1:", "export PREFECT_API_URL=https://127.0.0.1:",
                     f"export MLFLOW_TRACKING_SERVER_CERT_PATH={ca}", f"export PREFECT_API_SSL_CERT_FILE={ca}",
                     f"source {home / 'mlflow.env'}", f"source {home / 'services.env'}"):
            assert line in res.stdout, res.stdout
        uri = next(line.split("=", 1)[1] for line in res.stdout.splitlines() if "MLFLOW_TRACKING_URI=" in line)
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in (home / "services.env").read_text().splitlines())
        assert exports["MLFLOW_TRACKING_URI"] == uri and exports["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(ca)
        for private in ("mlflow.env", "auth.json", "tls/ca.key", "tls/server.key"):
            assert oct((home / private).stat().st_mode & 0o777) == oct(0o600), private
        for key, value in exports.items():  # what `source .services/services.env` does
            monkeypatch.setenv(key, value)
        creds = dict(line.removeprefix("export ").split("=", 1)
                     for line in (home / "mlflow.env").read_text().splitlines())
        assert creds["MLFLOW_TRACKING_USERNAME"] == "aigc"
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(Exception, match="401"):  # the server asks for a password
            MlflowClient(uri).create_experiment("anonymous")
        for key, value in creds.items():
            monkeypatch.setenv(key, value)
        client = MlflowClient(uri)
        client.create_experiment("from-make-services")  # a write that lands in PostgreSQL, as the team user
        status = sh([*cmd, "status", "--home", str(home)], ROOT).stdout
        assert status.count(" up (log ") == 3, status
        again = sh([*cmd, "up", "--home", str(home), *ports], ROOT, ok=False)
        assert again.returncode == 1 and again.stderr.startswith("error: services already recorded in")
        assert "Traceback" not in again.stderr
        assert "stopped: postgres, mlflow, prefect" in sh([*cmd, "down", "--home", str(home)], ROOT).stdout
        assert "no services recorded" in sh([*cmd, "status", "--home", str(home)], ROOT).stdout
        # the data stays: up again, and the experiment is still there
        res = sh([*cmd, "up", "--home", str(home), *ports], ROOT, timeout=300)
        assert MlflowClient(uri).get_experiment_by_name("from-make-services") is not None
    finally:
        subprocess.run([*cmd, "down", "--home", str(home)], cwd=ROOT, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
