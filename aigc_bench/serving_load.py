"""The served model under load: ``mlflow models serve`` on loopback, concurrent clients, mixed
valid and malformed requests, ``n`` up to its limit.

    python -m aigc_bench.serving_load                      # 8 clients for 60 s
    python -m aigc_bench.serving_load --clients 8 --seconds 60 --generator models/generator.pt \
        --evaluator models/evaluator.pt

The model is registered into a throwaway MLflow store exactly as the register stage logs it
(models from code, pipeline/serving.py) and served with ``--env-manager local``. With the
trained files of ``make run`` it serves those; without them, the default architecture of
params.yaml at 28x28 with its initial weights (the cost of a request is the same; labelled
requests are then left out: an untrained classifier makes most classes "too rare").

Every response is checked: a valid request is a 200 with exactly the images asked for; a
malformed one is a 4xx whose JSON ``message`` says what is wrong (the expected words are in
``MALFORMED``); a 5xx is a server fault. The server's memory (RSS of its process tree) is
sampled every second. Results: reports/benchmarks/serving_load.json and .md, with lscpu's model
and vector flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
MODEL = "aigc-generator"


def frame(rows: list[list[Any]], columns: tuple[str, ...] = ("n", "seed")) -> dict[str, Any]:
    return {"dataframe_split": {"columns": list(columns), "data": rows}}


# (name, JSON body or raw text, content type, words the 4xx message must contain)
MALFORMED: list[tuple[str, Any, str, str]] = [
    # the bound the server states is the one it enforces (pipeline/serving.py MAX_SERVED_IMAGES = 1024)
    ("n = 0", frame([[0, 1]]), "application/json", "n = 0: ask for 1 to 1024 images"),
    ("n over the limit", frame([[1025, 1]]), "application/json", "n = 1025: ask for 1 to 1024 images"),
    ("negative n", frame([[-3, 1]]), "application/json", "n = -3: ask for 1 to 1024 images"),
    ("over the serving limit", frame([[1000, 0], [25, 1]]), "application/json",
     "1025 images asked for in one request; the served model makes at most 1024"),
    ("negative seed", frame([[2, -1]]), "application/json", "seed = -1: must be a non-negative integer"),
    ("unknown label", frame([[2, 0, 11]], ("n", "seed", "label")), "application/json", "unknown label 11"),
    ("missing column", frame([[2]], ("n",)), "application/json", "seed"),
    ("text for n", frame([["many", 1]]), "application/json", "n = 'many': must be a whole number"),
    ("fraction for n", frame([[2.5, 1]]), "application/json", "n = 2.5: must be a whole number"),
    ("boolean seed", frame([[2, True]]), "application/json", "seed = True: must be a whole number"),
    ("null label", frame([[2, 0, None]], ("n", "seed", "label")), "application/json", "label is null"),
    ("not JSON", "{not json", "application/json", "JSON"),
    ("no data key", {"rows": [[2, 1]]}, "application/json", "dataframe_split"),
    ("wrong content type", "n,seed\n", "text/plain", "content type"),
]


def valid_requests(labels: bool) -> list[tuple[str, dict[str, Any], int]]:
    """(name, body, images expected); a request for the limit (MAX_SERVED_IMAGES) among them."""
    from pipeline.serving import MAX_SERVED_IMAGES as LIMIT

    out = [("n=1", frame([[1, 0]]), 1), ("n=16", frame([[16, 0]]), 16), ("n=256", frame([[256, 0]]), 256),
           ("two rows n=8+8", frame([[8, 0], [8, 1]]), 16), (f"n={LIMIT} (the limit)", frame([[LIMIT, 0]]), LIMIT)]
    if labels:
        out.append(("n=4 of label 3", frame([[4, 0, 3]], ("n", "seed", "label")), 4))
    return out


def register_model(store: Path, generator: Path | None, evaluator: Path | None) -> tuple[str, dict[str, Any]]:
    """A throwaway store holding ``aigc-generator@champion`` as the register stage logs it."""
    import shutil

    import torch

    from aigc.config import load_params
    from aigc.metrics.evaluator import Evaluator, EvaluatorNet, evaluator_payload
    from aigc.models import build_generator, generator_payload, load_generator, net_config
    from aigc.tracking import Registry, Run, TrackingConfig
    from pipeline import serving

    files = store / "files"
    files.mkdir(parents=True, exist_ok=True)
    if generator is not None:
        shutil.copy2(generator, files / "generator.pt")
        shutil.copy2(evaluator, files / "evaluator.pt")
        what = f"trained: {generator} and {evaluator}"
    else:
        params = load_params(ROOT / "params.yaml")
        info = {"channels": 1, "resolution": [28, 28]}
        net = net_config(params.model, info)
        torch.manual_seed(0)
        torch.save(generator_payload(build_generator(net), net), files / "generator.pt")
        ev = params.evaluator
        enet = EvaluatorNet(channels=1, height=28, width=28, classes=tuple(range(10)), base_channels=ev.base_channels,
                            features=ev.features)
        torch.save(evaluator_payload(Evaluator(enet)), files / "evaluator.pt")
        what = f"untrained: the default {net.family} of params.yaml at 28x28 (initial weights)"
    _, net = load_generator(files / "generator.pt")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    run = Run.start(TrackingConfig(uri=uri, experiment="serving-load", artifact_root=str(store / "art")),
                    "serving-load", {}, {})
    model_uri = run.log_pyfunc_model("generator", serving.CODE_PATH,
                                     {"generator": str(files / "generator.pt"), "evaluator": str(files / "evaluator.pt")},
                                     serving.signature(net), serving.input_example(), serving.pip_requirements())
    run.end(ok=True)
    reg = Registry(uri)
    reg.set_alias(reg.register(model_uri, MODEL, {}), "champion")
    return uri, {"model": what, "image_shape": list(net.image_shape), "family": net.family,
                 "conditional": net.conditional}


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (the CLI, uvicorn and its worker), MB."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` starts uvicorn from PATH
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        return subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> float:
    import requests

    t = time.monotonic()
    while True:
        if server.poll() is not None or time.monotonic() - t > timeout_s:
            raise RuntimeError(f"the model server did not answer /ping: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - t
        except requests.ConnectionError:
            pass
        time.sleep(0.3)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def send(session: Any, url: str, body: Any, content_type: str, timeout_s: float = 300) -> tuple[int, float, Any]:
    """One request: (status, seconds, parsed JSON or text)."""
    data = body if isinstance(body, str) else json.dumps(body)
    t = time.perf_counter()
    r = session.post(f"{url}/invocations", data=data, headers={"Content-Type": content_type}, timeout=timeout_s)
    seconds = time.perf_counter() - t
    try:
        payload = r.json()
    except ValueError:
        payload = r.text
    return r.status_code, seconds, payload


def check(kind: str, status: int, payload: Any, expect: int | str) -> str | None:
    """Why this response is wrong, or None. ``expect``: images (valid) or the message's words."""
    if isinstance(expect, int):
        if status != 200:
            return f"{kind}: HTTP {status} {str(payload)[:300]}"
        got = len(payload["predictions"]) if isinstance(payload, dict) else -1
        return None if got == expect else f"{kind}: {got} images, asked for {expect}"
    if not 400 <= status < 500:
        return f"{kind}: HTTP {status}, not a 4xx: {str(payload)[:300]}"
    message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
    return None if expect.lower() in message.lower() else f"{kind}: message {message[:300]!r} lacks {expect!r}"


def load(url: str, clients: int, seconds: float, labels: bool, malformed_share: float = 0.3,
         limit_every: int = 8, seed: int = 0) -> dict[str, Any]:
    """``clients`` threads, each with its own connection, sending for ``seconds``; every
    ``limit_every``-th valid request of a client asks for the limit (0: never)."""
    import requests

    valid = valid_requests(labels)
    small, limit = [v for v in valid if "limit" not in v[0]], next(v for v in valid if "limit" in v[0])
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        session = requests.Session()
        sent = 0
        while time.monotonic() < stop:
            if rng.random() < malformed_share:
                kind, body, ctype, expect = rng.choice(MALFORMED)
                valid_request = False
            else:
                sent += 1
                kind, body, expect = limit if limit_every and (sent + i) % limit_every == 0 else rng.choice(small)
                ctype, valid_request = "application/json", True
            retried = False
            for attempt in (1, 2):
                try:
                    status, took, payload = send(session, url, body, ctype)
                    problem = check(kind, status, payload, expect)
                    break
                except requests.ConnectionError as exc:
                    # A kept-alive connection the server closed just as this client reused it (a
                    # starved client thread on a loaded machine): the request never reached the
                    # model. Counted, and sent again once on a fresh connection.
                    status, took, problem = -1, float("nan"), f"{kind}: {type(exc).__name__}: {exc}"
                    retried, session = True, requests.Session()
            with lock:
                results.append({"kind": kind, "valid": valid_request, "status": status, "seconds": took,
                                "problem": problem, "retried_after_connection_reset": retried,
                                "at": time.monotonic()})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarise(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        t = [r["seconds"] for r in rows if r["status"] > 0]
        return {"requests": len(rows), "p50_ms": round(1000 * percentile(t, 50), 1) if t else None,
                "p99_ms": round(1000 * percentile(t, 99), 1) if t else None,
                "max_ms": round(1000 * max(t), 1) if t else None}

    kinds = sorted({r["kind"] for r in results})
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    valid = [r for r in results if r["valid"]]
    return {
        "requests": len(results), "throughput_rps": round(len(results) / seconds, 2),
        "valid": stats(valid) | {"throughput_rps": round(len(valid) / seconds, 2)},
        "valid_without_limit": stats([r for r in valid if "limit" not in r["kind"]]),
        "malformed": stats([r for r in results if not r["valid"]]),
        "by_kind": {k: stats([r for r in results if r["kind"] == k]) for k in kinds},
        "by_status": by_status,
        "server_errors_5xx": sum(1 for r in results if r["status"] >= 500),
        "malformed_not_4xx_with_message": sum(1 for r in results if not r["valid"] and r["problem"]),
        "valid_failed": sum(1 for r in results if r["valid"] and r["problem"]),
        "retried_after_connection_reset": sum(1 for r in results if r.get("retried_after_connection_reset")),
        "problems": sorted({r["problem"] for r in results if r["problem"]})[:20],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.serving_load", description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--generator", type=Path, help="a trained generator file (default: models/generator.pt if present)")
    ap.add_argument("--evaluator", type=Path, help="its evaluator file (default: models/evaluator.pt if present)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from aigc.machine import cpu
    from aigc.services import free_port

    generator = args.generator or (ROOT / "models/generator.pt" if (ROOT / "models/generator.pt").exists() else None)
    evaluator = args.evaluator or (ROOT / "models/evaluator.pt" if (ROOT / "models/evaluator.pt").exists() else None)
    if (generator is None) != (evaluator is None):
        print("error: give both --generator and --evaluator (or neither)", file=sys.stderr)
        return 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="aigc-serving-load-") as tmp:
        uri, model = register_model(Path(tmp), generator, evaluator)
        port = free_port()
        url, log = f"http://127.0.0.1:{port}", Path(tmp) / "serve.log"
        server = start_server(uri, port, log)
        rss: list[tuple[float, float]] = []
        try:
            ready_s = wait_ready(url, server, log)
            t0 = time.monotonic()
            sampling = threading.Event()

            def sample_rss() -> None:
                while not sampling.is_set():
                    rss.append((round(time.monotonic() - t0, 1), round(tree_rss_mb(server.pid), 1)))
                    sampling.wait(1.0)

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            labels = generator is not None
            run = load(url, args.clients, args.seconds, labels)
            elapsed = time.monotonic() - t0
            sampling.set()
            sampler.join()
            load_after = os.getloadavg()
        finally:
            stop_server(server)
            server_log = log.read_text(errors="replace")
    results = run["results"]
    summary = summarise(results, elapsed)
    mem = [m for _, m in rss]
    warm = [m for t, m in rss if t >= 10] or mem
    third = max(1, len(warm) // 3)
    memory = {"samples_mb": rss, "first_mb": mem[0] if mem else None, "max_mb": max(mem) if mem else None,
              "after_warm_up_first_third_median_mb": statistics.median(warm[:third]) if warm else None,
              "last_third_median_mb": statistics.median(warm[-third:]) if warm else None}
    if memory["after_warm_up_first_third_median_mb"]:
        memory["growth_last_vs_first_third"] = round(
            memory["last_third_median_mb"] / memory["after_warm_up_first_third_median_mb"] - 1, 3)
    record = {
        "what": f"{args.clients} concurrent clients for {args.seconds:g} s against `mlflow models serve` "
                f"(--env-manager local, 1 worker) on loopback; ~30% malformed requests; every "
                f"8th valid request of a client asks for the limit",
        "model": model, "server_ready_s": round(ready_s, 1), "cpu": cpu(), "cores_usable": len(os.sched_getaffinity(0)),
        "load_average_before": load_before, "load_average_after": load_after, "seconds": round(elapsed, 1),
        "clients": args.clients, "malformed_kinds": [m[0] for m in MALFORMED],
        "valid_kinds": [v[0] for v in valid_requests(labels)],
        "summary": summary, "memory": memory,
        "server_tracebacks": server_log.count("Traceback"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_load.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "serving_load.md").write_text(markdown(record))
    print(markdown(record))
    ok = summary["server_errors_5xx"] == 0 and summary["malformed_not_4xx_with_message"] == 0 \
        and summary["valid_failed"] == 0
    return 0 if ok else 1


def markdown(r: dict[str, Any]) -> str:
    s, m = r["summary"], r["memory"]
    lines = [
        "# The served model under load", "",
        f"{r['what']}.", "",
        f"- model: {r['model']['model']}, images {r['model']['image_shape']}",
        f"- CPU: {r['cpu'].get('model')} ({r['cores_usable']} usable cores; {' '.join(r['cpu'].get('flags', []))})",
        f"- load average before / after: {r['load_average_before']} / {r['load_average_after']} (shared machine)",
        f"- server ready after {r['server_ready_s']} s", "",
        "| requests | count | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|",
    ]
    for name, key in (("all valid", "valid"), ("valid, limit excluded", "valid_without_limit"),
                      ("malformed", "malformed")):
        x = s[key]
        lines.append(f"| {name} | {x['requests']} | {x['p50_ms']} | {x['p99_ms']} | {x['max_ms']} |")
    for kind, x in s["by_kind"].items():
        lines.append(f"| {kind} | {x['requests']} | {x['p50_ms']} | {x['p99_ms']} | {x['max_ms']} |")
    lines += [
        "",
        f"- throughput: {s['throughput_rps']} requests/s ({s['valid']['throughput_rps']} valid/s)",
        f"- HTTP statuses: {s['by_status']}",
        f"- 5xx: {s['server_errors_5xx']}; malformed without a 4xx and its message: "
        f"{s['malformed_not_4xx_with_message']}; valid requests that failed: {s['valid_failed']}; "
        f"sent again after a connection reset: {s['retried_after_connection_reset']}",
        f"- server RSS (process tree): first {m['first_mb']} MB, max {m['max_mb']} MB; median of the first third "
        f"after 10 s {m['after_warm_up_first_third_median_mb']} MB, of the last third {m['last_third_median_mb']} MB "
        f"(growth {m.get('growth_last_vs_first_third')})",
    ]
    if s["problems"]:
        lines += ["", "Problems:", *[f"- {p}" for p in s["problems"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
