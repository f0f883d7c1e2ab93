"""``python -m aigc.services up|down|status``: ``make services`` and ``make services-down``.

Starts, stops or lists the team services of ``aigc.services`` (PostgreSQL, MLflow, Prefect; TLS) on
loopback, their data under ``--home`` (default ``.services/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import aigc.services
from aigc.services import ENV_FILE, HOME, PORTS, STATE, TEAM_USER, ServiceError, _load, _port_open, down, up


def main(argv: list[str] | None = None) -> int:
    """The command line of ``make services`` / ``make services-down``; 0 on success, 1 when a service fails."""
    parser = argparse.ArgumentParser(prog="python -m aigc.services",
                                     description=aigc.services.__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--home", default=str(HOME), help="where the services keep their data (default: %(default)s)")
    for name, port in PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"{name}'s port (default: %(default)s)")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    ports = {name: getattr(args, f"{name}_port") for name in PORTS}
    try:
        if args.command == "up":
            services = up(home, ports)
            print(f"started on 127.0.0.1 (data and logs in {home}/):")
            for s in services:
                print(f"  {s.name:9s} {s.url}")
            print(f"TLS: clients verify the servers against the CA {services[1].ca}")
            exports = "".join(f"  {line}\n" for line in (home / ENV_FILE).read_text().splitlines())
            print(f"point the pipeline at them (MLflow asks for a password: {home / 'mlflow.env'} signs in "
                  f"as user {TEAM_USER!r}):\n{exports}"
                  f"  source {home / 'mlflow.env'}\n"
                  f"(both in one go: source {home / ENV_FILE} && source {home / 'mlflow.env'}; "
                  f"make services-down stops them; the data stays)")
        elif args.command == "down":
            stopped = down(home)
            print(f"stopped: {', '.join(s.name for s in stopped) or 'nothing was running'} (data kept in {home}/)")
        else:
            services = _load(home)
            if not services:
                print(f"no services recorded in {home / STATE} (make services starts them)")
            for s in services:
                alive = _port_open(s.port)
                print(f"  {s.name:9s} {s.url} {'up' if alive else 'DOWN'} (log {s.log})")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
