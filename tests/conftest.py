"""Test infrastructure: a real Kafka-protocol broker and a real PostgreSQL for the session.

If TEST_KAFKA_BOOTSTRAP_SERVERS / TEST_PG_PORT are set, those servers are used; otherwise
the session starts its own (embedded Tansu broker, a throw-away PostgreSQL cluster) on free
ports and stops them at the end. Every test gets its own database and topic prefix, so tests
never see each other's data.
"""

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from deploy.local.infra import PgCluster, free_port, start_broker, stop_process_group


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    given = os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"loyalty-test-broker-{port}.log"
    proc = start_broker(port, log_path=log)
    yield f"127.0.0.1:{port}"
    stop_process_group(proc.pid)


@pytest.fixture(scope="session")
def pg_cluster() -> PgCluster:
    port = free_port()
    datadir = Path(tempfile.mkdtemp(prefix="loyalty-test-pg-"))
    cluster = PgCluster(datadir=datadir / "data", port=port, log_path=datadir / "pg.log")
    os.chmod(datadir, 0o755)
    cluster.init()
    cluster.start(durable=False)
    yield cluster
    cluster.stop(mode="immediate")
    # A database per test leaves a data directory of several GB in hundreds of thousands of
    # files: deleting it took ~1.5 minutes of the session's end on a busy machine. It is
    # nobody's any more once the server stopped, so it is removed in the background.
    subprocess.Popen(["rm", "-rf", str(datadir)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture
def database_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.psql("postgres", f'CREATE DATABASE "{name}"')
    return pg_cluster.dsn(name)


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}."


def service_env(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> dict[str, str]:
    """Settings shared by every service under test, as environment-style key/values
    (without the service prefix)."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": database_url,
        "TOPIC_PREFIX": topic_prefix,
        "TOPIC_PARTITIONS": "4",
        "CONSUMER_GROUP_PREFIX": topic_prefix.rstrip("."),
        "CONSUMER_SESSION_TIMEOUT_MS": "2000",
        "CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
        "OUTBOX_POLL_INTERVAL_MS": "50",
        # Idle mode stays on (its path runs in every test) but looks often: a test's record
        # after a quiet spell is read within ~50 ms, not a production idle poll.
        "CONSUMER_IDLE_AFTER_MS": "500",
        "CONSUMER_IDLE_POLL_MS": "50",
        "CONSUMER_BULK_IDLE_POLL_MS": "50",
        "LOG_JSON": "false",
    }


@pytest.fixture
def base_env(kafka_bootstrap: str, database_url: str, topic_prefix: str) -> dict[str, str]:
    return service_env(kafka_bootstrap, database_url, topic_prefix)


@pytest.fixture(scope="module")
def module_env(pg_cluster: PgCluster, kafka_bootstrap: str) -> dict[str, str]:
    """base_env for a whole module (services started once for its tests): its own database
    and topic prefix."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    return service_env(kafka_bootstrap, pg_cluster.dsn(name), f"t{uuid.uuid4().hex[:8]}.")
