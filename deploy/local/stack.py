"""The local stack: `up`, `down`, `status`, `run`, `reset` (see the Makefile).

Starts in the background the embedded broker, a project-local PostgreSQL cluster, creates
the topics, applies migrations, starts every service under services/ that has a
__main__.py, provisions local credentials and writes `.run/endpoints.env`. Idempotent:
what already runs is kept. `down` stops everything `up` started; PostgreSQL's data stays
(under the system temp folder) until `reset`, while the broker keeps nothing (memory only).
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.local.infra import (
    PgCluster,
    free_port,
    pg_data_root,
    pid_alive,
    port_open,
    start_broker,
    stop_process_group,
)
from deploy.local.startup import ready as _ready
from deploy.local.startup import wait_until_ready
from deploy.local.supervise import StopSignals, survive_lost_output

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / ".run"
STATE = RUN / "state.json"
ENDPOINTS = RUN / "endpoints.env"
DATABASE = "loyalty"
# Well-known local ports; a busy one is replaced by the one used last time, else by a free
# one (written to endpoints.env).
DEFAULT_PORTS = {"broker": 19092, "postgres": 15432, "purchases": 8101, "ledger": 8102, "rewards": 8103,
                 "engagement": 8104, "churn": 8105, "mailcatcher": 8025}
DEMO_STORES = ("store-001", "store-002", "store-003")
DEFAULT_PARTITIONS = 4
# Consumer group timing for the local stack: each group join takes about half the session
# timeout on the embedded broker, and a service joins its groups one after another (the
# ledger has four: 4 x 5 s with the library's 10 s). Shorter here, as in the tests; a
# consumer that stalls longer than this on a loaded laptop only costs a rebalance.
LOCAL_CONSUMER_TIMING = {"CONSUMER_SESSION_TIMEOUT_MS": "4000", "CONSUMER_HEARTBEAT_INTERVAL_MS": "1000"}


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
    # The server's log sits next to its data, in a folder the `postgres` user can reach: as
    # root the server runs as that user, who cannot enter a clone under a mode-700 folder
    # (root's home, a mktemp -d folder). .run/logs/postgres.log links to it.
    datadir = Path(state["pg_datadir"])
    return PgCluster(datadir=datadir, port=state.get("ports", {}).get("postgres", DEFAULT_PORTS["postgres"]),
                     log_path=datadir.with_name(datadir.name + ".log"))


def _link_pg_log(pg: PgCluster) -> None:
    link = RUN / "logs" / "postgres.log"
    if link.is_symlink() and link.resolve() == pg.log_path:
        return
    link.unlink(missing_ok=True)
    link.symlink_to(pg.log_path)


def _pick_port(name: str, ports: dict) -> int:
    """The well-known port, else the one this service had last time, else a free one."""
    for preferred in (DEFAULT_PORTS.get(name), ports.get(name)):
        if preferred and free_port(preferred) == preferred:
            return preferred
    return free_port()


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _secrets(state: dict) -> dict:
    """Local-only credentials, generated once per checkout and kept in .run/state.json."""
    creds = state.setdefault("secrets", {})
    for name in ("store_api_key", "shopify_webhook_secret", "woocommerce_webhook_secret", "ledger_admin_api_key",
                 "rewards_admin_api_key", "rewards_jwt_secret", "churn_admin_api_key", "engagement_admin_api_key",
                 "purchases_admin_api_key",
                 "engagement_backend_api_key", "engagement_link_secret"):
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
        **{f"{prefix}_{k}": v for k, v in LOCAL_CONSUMER_TIMING.items()},
        # Every service learns the others' local secrets it needs; unknown ones are ignored.
        "PURCHASES_SHOPIFY_WEBHOOK_SECRET": creds["shopify_webhook_secret"],
        "PURCHASES_WOOCOMMERCE_WEBHOOK_SECRET": creds["woocommerce_webhook_secret"],
        "PURCHASES_ADMIN_API_KEY": creds["purchases_admin_api_key"],
        "LEDGER_ADMIN_API_KEY": creds["ledger_admin_api_key"],
        "REWARDS_ADMIN_API_KEY": creds["rewards_admin_api_key"],
        "REWARDS_JWT_SECRET": creds["rewards_jwt_secret"],
        "CHURN_ADMIN_API_KEY": creds["churn_admin_api_key"],
        # One local identity provider: a customer's token reads their ledger balance too.
        "LEDGER_JWT_SECRET": creds["rewards_jwt_secret"],
        "REWARDS_LEDGER_URL": f"http://127.0.0.1:{ports.get('ledger', 0)}",
        "ENGAGEMENT_ADMIN_API_KEY": creds["engagement_admin_api_key"],
        "ENGAGEMENT_BACKEND_API_KEY": creds["engagement_backend_api_key"],
        "ENGAGEMENT_LINK_SECRET": creds["engagement_link_secret"],
        "ENGAGEMENT_PUBLIC_BASE_URL": f"http://127.0.0.1:{ports.get('engagement', 0)}",
        "ENGAGEMENT_SMTP_PORT": str(ports.get("mailcatcher", 0)),
        "ENGAGEMENT_LEDGER_URL": f"http://127.0.0.1:{ports.get('ledger', 0)}",
        "ENGAGEMENT_LEDGER_ADMIN_API_KEY": creds["ledger_admin_api_key"],
    }
    return env


def up(partitions: int | None = None, stop: StopSignals | None = None) -> dict:
    """`partitions`: for the topics when the broker starts (None: DEFAULT_PARTITIONS). A
    running broker keeps its topics: the embedded broker cannot add partitions. `stop`:
    defers a stop request while a process starts, until its pid file is written."""
    started_s = time.monotonic()
    guard = stop.deferred if stop else contextlib.nullcontext
    RUN.mkdir(exist_ok=True)
    (RUN / "logs").mkdir(exist_ok=True)
    (RUN / "pids").mkdir(exist_ok=True)
    state = load_state()
    ports = state.setdefault("ports", {})
    _secrets(state)
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]
    state.setdefault("pg_datadir", str(pg_data_root() / f"loyalty-pg-{os.getuid()}-{checkout}"))
    save_state(state)  # before anything starts: `down` and `reset` find whatever this run creates

    # broker
    broker_pid = _pid_from(RUN / "pids" / "broker.pid")
    fresh_broker = not (broker_pid and pid_alive(broker_pid) and port_open(ports.get("broker", 0)))
    if not fresh_broker:
        print(f"broker     running (pid {broker_pid}, topics with {state['partitions']} partitions)")
        if partitions and partitions != state["partitions"]:
            print(f"           TOPIC_PARTITIONS={partitions} is for a broker that starts empty; this one keeps "
                  f"{state['partitions']}: make down && TOPIC_PARTITIONS={partitions} make up")
    else:
        state["partitions"] = partitions or DEFAULT_PARTITIONS
        ports["broker"] = _pick_port("broker", ports)
        with guard():
            proc = start_broker(ports["broker"], log_path=RUN / "logs" / "broker.log",
                                pid_file=RUN / "pids" / "broker.pid")
        print(f"broker     started on 127.0.0.1:{ports['broker']} (pid {proc.pid})")
        # A new broker is empty: topics and offsets are gone, so running services must restart.
        for name in discover_services():
            _stop_service(name)

    # PostgreSQL
    ports.setdefault("postgres", DEFAULT_PORTS["postgres"])
    pg = cluster(state)
    kept_data = pg.initialised()
    if kept_data and pg.running():
        print(f"postgres   running on 127.0.0.1:{ports['postgres']}")
    else:
        if not kept_data:
            print("postgres   creating a cluster ...")
            pg.init()
        ports["postgres"] = _pick_port("postgres", ports)
        pg = cluster(state)
        with guard():
            pg.start(durable=True)
        print(f"postgres   started on 127.0.0.1:{ports['postgres']} (data {pg.datadir})")
    _link_pg_log(pg)
    if fresh_broker and kept_data:
        print("           the broker starts empty, but the database keeps the state of earlier runs "
              "(make reset starts both from nothing)")
    pg.create_database(DATABASE)
    save_state(state)

    # topics and migrations (services also do both at start; doing it here reports errors early)
    asyncio.run(_prepare(state))

    # the local mail catcher (deploy/local/mailcatcher.py): every message as .eml in MAIL_DIR
    pid = _pid_from(RUN / "pids" / "mailcatcher.pid")
    if not (pid and pid_alive(pid) and port_open(ports.get("mailcatcher", 0))):
        ports["mailcatcher"] = free_port(DEFAULT_PORTS["mailcatcher"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.local.mailcatcher", "--dir", str(RUN / "mail"), "--port",
             str(ports["mailcatcher"])], cwd=ROOT, stdout=open(RUN / "logs" / "mailcatcher.log", "ab"),
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        (RUN / "pids" / "mailcatcher.pid").write_text(str(proc.pid))
        print(f"mailcatcher started on 127.0.0.1:{ports['mailcatcher']} (pid {proc.pid}), mail in {RUN / 'mail'}")

    # services
    log_offsets: dict[str, int] = {}  # where this start's log lines begin
    for name in discover_services():
        pid = _pid_from(RUN / "pids" / f"{name}.pid")
        if pid and pid_alive(pid):
            print(f"{name:<10} running on http://127.0.0.1:{ports[name]} (pid {pid})")
            continue
        ports[name] = _pick_port(name, ports)
        log = open(RUN / "logs" / f"{name}.log", "ab")
        log_offsets[name] = log.seek(0, os.SEEK_END)
        with guard():
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=ROOT, env={**os.environ, **service_env(name, state)},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            (RUN / "pids" / f"{name}.pid").write_text(str(proc.pid))
        save_state(state)
        print(f"{name:<10} starting on http://127.0.0.1:{ports[name]} (pid {proc.pid})")
    wait_until_ready({name: ports[name] for name in discover_services()}, RUN / "logs", RUN / "pids", log_offsets)
    asyncio.run(_provision(state))
    save_state(state)
    write_endpoints(state)
    print(f"\nready in {time.monotonic() - started_s:.0f}s; endpoints written to {ENDPOINTS}:\n")
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
        f"PURCHASES_ADMIN_API_KEY={creds['purchases_admin_api_key']}",
        f"LEDGER_ADMIN_API_KEY={creds['ledger_admin_api_key']}",
        f"REWARDS_ADMIN_API_KEY={creds['rewards_admin_api_key']}",
        f"REWARDS_JWT_SECRET={creds['rewards_jwt_secret']}",
        f"CHURN_ADMIN_API_KEY={creds['churn_admin_api_key']}",
        f"ENGAGEMENT_ADMIN_API_KEY={creds['engagement_admin_api_key']}",
        f"MAIL_DIR={RUN / 'mail'}",
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
    _stop_service("mailcatcher")
    _stop_service("broker")
    if state.get("pg_datadir"):
        pg = cluster(state)
        if pg.initialised() and pg.running():
            pg.stop()
            print("postgres   stopped")
    ENDPOINTS.unlink(missing_ok=True)


def status() -> int:
    """What runs; 0 whatever it finds (use --check for an exit status)."""
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


def reset() -> None:
    """down, then forget everything: PostgreSQL's data, the state (ports, partitions,
    local secrets) and the logs. The next `up` starts from nothing, like the first."""
    down()
    state = load_state()
    if state.get("pg_datadir"):
        pg = cluster(state)
        shutil.rmtree(pg.datadir, ignore_errors=True)
        pg.log_path.unlink(missing_ok=True)
        print(f"postgres   data removed ({pg.datadir})")
    shutil.rmtree(RUN, ignore_errors=True)
    print(f"state      removed ({RUN})")


def run(partitions: int | None, rate: float) -> int:
    """up, then the demo traffic generator until Ctrl-C, SIGTERM or SIGHUP (the terminal
    closing), then down. Output that can no longer be written (a killed `tee`, a closed
    terminal) is dropped: the clean-up runs all the same."""
    survive_lost_output()
    stop = StopSignals()
    stop.install()
    try:
        up(partitions, stop)
        from deploy.local import demo

        asyncio.run(demo.main(ENDPOINTS, rate=rate))
    except KeyboardInterrupt:
        pass
    finally:
        stop.ignore()
        print("\nstopping ...", flush=True)
        down()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "run", "reset"])
    given = os.environ.get("TOPIC_PARTITIONS")
    parser.add_argument("--partitions", type=int, default=int(given) if given else None,
                        help=f"partitions per topic when the broker starts (default {DEFAULT_PARTITIONS})")
    parser.add_argument("--check", action="store_true", help="status: exit 1 unless everything runs")
    parser.add_argument("--rate", type=float, default=float(os.environ.get("DEMO_RATE", "200")),
                        help="demo purchases per second (make run)")
    args = parser.parse_args()
    # Progress as it happens, also through a pipe (`make run | tee run.log`).
    sys.stdout.reconfigure(line_buffering=True)
    if args.command == "up":
        up(args.partitions)
    elif args.command == "down":
        down()
    elif args.command == "status":
        code = status()
        return code if args.check else 0
    elif args.command == "reset":
        reset()
    else:
        return run(args.partitions, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
