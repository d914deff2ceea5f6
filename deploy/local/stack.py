"""The local stack: `up`, `down`, `status`, `run` (see the Makefile).

Starts in the background the embedded broker, a project-local PostgreSQL cluster, creates
the topics, applies migrations, starts every service under services/ that has a
__main__.py, provisions local credentials and writes `.run/endpoints.env`. Idempotent:
what already runs is kept. `down` stops everything `up` started.
"""

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deploy.local.infra import (
    PgCluster, free_port, pg_data_root, pid_alive, port_open, start_broker, stop_process_group,
)

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / ".run"
STATE = RUN / "state.json"
ENDPOINTS = RUN / "endpoints.env"
DATABASE = "loyalty"
# Well-known local ports; a busy one is replaced by a free one (written to endpoints.env).
DEFAULT_PORTS = {"broker": 19092, "postgres": 15432, "purchases": 8101, "ledger": 8102, "rewards": 8103,
                 "engagement": 8104, "churn": 8105}
DEMO_STORES = ("store-001", "store-002", "store-003")


def discover_services() -> list[str]:
    """Every services/<name>/ with a __main__.py, in a stable order (purchases first)."""
    names = sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))
    order = list(DEFAULT_PORTS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def load_state() -> dict:
    if STATE.exists():
        return json.loads(STATE.read_text())
    return {}


def save_state(state: dict) -> None:
    RUN.mkdir(exist_ok=True)
    STATE.write_text(json.dumps(state, indent=2))


def cluster(state: dict) -> PgCluster:
    return PgCluster(datadir=Path(state["pg_datadir"]), port=state["ports"]["postgres"], log_path=RUN / "logs" / "postgres.log")


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _secrets(state: dict) -> dict:
    """Local-only credentials, generated once per checkout and kept in .run/state.json."""
    creds = state.setdefault("secrets", {})
    for name in ("store_api_key", "shopify_webhook_secret", "woocommerce_webhook_secret", "ledger_admin_api_key",
                 "rewards_admin_api_key", "rewards_jwt_secret"):
        creds.setdefault(name, secrets.token_urlsafe(24))
    return creds


def service_env(name: str, state: dict) -> dict[str, str]:
    ports = state["ports"]
    creds = state["secrets"]
    prefix = name.upper()
    env = {
        f"{prefix}_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{ports['broker']}",
        f"{prefix}_DATABASE_URL": cluster(state).dsn(DATABASE),
        f"{prefix}_HTTP_HOST": "127.0.0.1",
        f"{prefix}_HTTP_PORT": str(ports[name]),
        f"{prefix}_TOPIC_PARTITIONS": str(state["partitions"]),
        # Every service learns the others' local secrets it needs; unknown ones are ignored.
        "PURCHASES_SHOPIFY_WEBHOOK_SECRET": creds["shopify_webhook_secret"],
        "PURCHASES_WOOCOMMERCE_WEBHOOK_SECRET": creds["woocommerce_webhook_secret"],
        "LEDGER_ADMIN_API_KEY": creds["ledger_admin_api_key"],
        "REWARDS_ADMIN_API_KEY": creds["rewards_admin_api_key"],
        "REWARDS_JWT_SECRET": creds["rewards_jwt_secret"],
        # One local identity provider: a customer's token reads their ledger balance too.
        "LEDGER_JWT_SECRET": creds["rewards_jwt_secret"],
        "REWARDS_LEDGER_URL": f"http://127.0.0.1:{ports.get('ledger', 0)}",
    }
    return env


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def up(partitions: int) -> dict:
    RUN.mkdir(exist_ok=True)
    (RUN / "logs").mkdir(exist_ok=True)
    (RUN / "pids").mkdir(exist_ok=True)
    state = load_state()
    state.setdefault("partitions", partitions)
    ports = state.setdefault("ports", {})
    _secrets(state)
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]
    state.setdefault("pg_datadir", str(pg_data_root() / f"loyalty-pg-{os.getuid()}-{checkout}"))

    # broker
    broker_pid = _pid_from(RUN / "pids" / "broker.pid")
    if broker_pid and pid_alive(broker_pid) and port_open(ports.get("broker", 0)):
        print(f"broker     running (pid {broker_pid})")
    else:
        ports["broker"] = free_port(DEFAULT_PORTS["broker"])
        proc = start_broker(ports["broker"], log_path=RUN / "logs" / "broker.log")
        (RUN / "pids" / "broker.pid").write_text(str(proc.pid))
        print(f"broker     started on 127.0.0.1:{ports['broker']} (pid {proc.pid})")
        # A new broker is empty: topics and offsets are gone, so running services must restart.
        for name in discover_services():
            _stop_service(name)

    # PostgreSQL
    ports.setdefault("postgres", free_port(DEFAULT_PORTS["postgres"]))
    pg = cluster(state)
    if pg.initialised() and pg.running():
        print(f"postgres   running on 127.0.0.1:{ports['postgres']}")
    else:
        if not pg.initialised():
            pg.init()
        if port_open(ports["postgres"]):
            ports["postgres"] = free_port()
            pg = cluster(state)
        pg.start(durable=True)
        print(f"postgres   started on 127.0.0.1:{ports['postgres']} (data {pg.datadir})")
    pg.create_database(DATABASE)
    save_state(state)

    # topics and migrations (services also do both at start; doing it here reports errors early)
    asyncio.run(_prepare(state))

    # services
    for name in discover_services():
        pid = _pid_from(RUN / "pids" / f"{name}.pid")
        if pid and pid_alive(pid):
            print(f"{name:<10} running on http://127.0.0.1:{ports[name]} (pid {pid})")
            continue
        ports[name] = free_port(DEFAULT_PORTS.get(name))
        log = open(RUN / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT, env={**os.environ, **service_env(name, state)},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        (RUN / "pids" / f"{name}.pid").write_text(str(proc.pid))
        save_state(state)
        print(f"{name:<10} starting on http://127.0.0.1:{ports[name]} (pid {proc.pid})")
    for name in discover_services():
        pid = _pid_from(RUN / "pids" / f"{name}.pid")
        deadline = time.monotonic() + 60
        while not _ready(ports[name]):
            if not pid or not pid_alive(pid):
                raise SystemExit(f"{name} exited; see {RUN / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not ready after 60s; see {RUN / 'logs' / (name + '.log')}")
            time.sleep(0.2)
    asyncio.run(_provision(state))
    save_state(state)
    write_endpoints(state)
    print(f"\nendpoints written to {ENDPOINTS}:\n")
    print(ENDPOINTS.read_text())
    return state


async def _prepare(state: dict) -> None:
    from shared.settings import ServiceSettings
    from shared.topics import ensure_topics

    settings = ServiceSettings(kafka_bootstrap_servers=f"127.0.0.1:{state['ports']['broker']}",
                               topic_partitions=state["partitions"])
    created = await ensure_topics(settings)
    if created:
        print(f"topics     created {len(created)} with {state['partitions']} partitions")


async def _provision(state: dict) -> None:
    """Local credentials: one API key per demo store (the first is in endpoints.env)."""
    import asyncpg

    from services.purchases.repository import add_api_key

    conn = await asyncpg.connect(cluster(state).dsn(DATABASE), server_settings={"search_path": "purchases"})
    try:
        key = state["secrets"]["store_api_key"]
        for i, store in enumerate(DEMO_STORES):
            await add_api_key(conn, key=key if i == 0 else f"{key}-{store}", store_id=store, label="local demo")
    finally:
        await conn.close()


def write_endpoints(state: dict) -> None:
    ports, creds = state["ports"], state["secrets"]
    lines = [
        "# Written by `make up`: local endpoints and local-only credentials.",
        f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{ports['broker']}",
        f"DATABASE_URL={cluster(state).dsn(DATABASE)}",
        f"TOPIC_PARTITIONS={state['partitions']}",
    ]
    for name in discover_services():
        lines.append(f"{name.upper()}_URL=http://127.0.0.1:{ports[name]}")
    lines += [
        f"STORE_ID={DEMO_STORES[0]}",
        f"STORE_API_KEY={creds['store_api_key']}",
        f"SHOPIFY_WEBHOOK_SECRET={creds['shopify_webhook_secret']}",
        f"WOOCOMMERCE_WEBHOOK_SECRET={creds['woocommerce_webhook_secret']}",
        f"LEDGER_ADMIN_API_KEY={creds['ledger_admin_api_key']}",
        f"REWARDS_ADMIN_API_KEY={creds['rewards_admin_api_key']}",
        f"REWARDS_JWT_SECRET={creds['rewards_jwt_secret']}",
    ]
    ENDPOINTS.write_text("\n".join(lines) + "\n")


def _stop_service(name: str) -> None:
    pidfile = RUN / "pids" / f"{name}.pid"
    pid = _pid_from(pidfile)
    if pid and pid_alive(pid):
        stop_process_group(pid, timeout_s=25)
        print(f"{name:<10} stopped")
    pidfile.unlink(missing_ok=True)


def down() -> None:
    state = load_state()
    for name in reversed(discover_services()):
        _stop_service(name)
    _stop_service("broker")
    if state.get("pg_datadir"):
        pg = cluster(state)
        if pg.initialised() and pg.running():
            pg.stop()
            print("postgres   stopped")
    ENDPOINTS.unlink(missing_ok=True)


def status() -> int:
    state = load_state()
    if not state:
        print("not started (make up)")
        return 1
    ok = True
    for name in ["broker", *discover_services()]:
        pid = _pid_from(RUN / "pids" / f"{name}.pid")
        alive = bool(pid and pid_alive(pid))
        ok &= alive
        ready = "" if name == "broker" else (" ready" if alive and _ready(state["ports"][name]) else " not ready")
        print(f"{name:<10} {'running' if alive else 'stopped'}{ready if alive else ''}")
    pg_up = cluster(state).initialised() and cluster(state).running()
    print(f"{'postgres':<10} {'running' if pg_up else 'stopped'}")
    return 0 if ok and pg_up else 1


def run(partitions: int, rate: float) -> int:
    """up, then the demo traffic generator until Ctrl-C or SIGTERM, then down."""
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        up(partitions)
        from deploy.local import demo

        asyncio.run(demo.main(ENDPOINTS, rate=rate))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("\nstopping ...")
        down()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "run"])
    parser.add_argument("--partitions", type=int, default=int(os.environ.get("TOPIC_PARTITIONS", "4")))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("DEMO_RATE", "200")),
                        help="demo purchases per second (make run)")
    args = parser.parse_args()
    if args.command == "up":
        up(args.partitions)
    elif args.command == "down":
        down()
    elif args.command == "status":
        return status()
    else:
        return run(args.partitions, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
