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


# ---- how xdist shares the suite out (make test: -n 4 --dist loadfile) ----------------------
#
# A test file goes to one worker (its module-scoped services start once), except the
# process-level tests and the OpenAPI fuzzing, which share no module fixture: each of their
# tests is a unit of its own. Those units, the longest of the suite (tests/e2e: 10-90 s
# each, the chaos run the longest and first), are handed out first, the other files after
# them in collection order; a worker is given its next unit only when it is down to its
# last test. xdist's own loadfile hands out the files with the most tests first (the unit
# tests) and keeps two or three units queued per worker, so the long single-test files came
# last and piled up behind each other on one worker.
ONE_TEST_A_UNIT = ("tests/e2e/", "tests/hostile/test_openapi_fuzz.py")
# Except `make run`/`make up` in a copy of the checkout: the local stack keeps stable ports
# (8102-8105), so two at once on two workers would answer each other's requests.
ONE_FILE_A_UNIT = ("tests/e2e/test_make_run.py",)


def _one_test_a_unit(nodeid: str) -> bool:
    return nodeid.startswith(ONE_TEST_A_UNIT) and not nodeid.startswith(ONE_FILE_A_UNIT)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if _one_test_a_unit(nodeid) else nodeid.split("::", 1)[0]

        def schedule(self) -> None:
            if self.collection is None and self.collection_is_completed and self._check_nodes_have_same_collection():
                # xdist fills self.workqueue (an OrderedDict) from the collection: a key set
                # here first keeps its place, so this is the order the units go out in.
                self.config.option.loadscopereorder = False
                collection = next(iter(self.registered_collections.values()))
                for nodeid in sorted(collection, key=lambda n: not n.startswith(ONE_TEST_A_UNIT)):
                    self.workqueue.setdefault(self._split_scope(nodeid), {})
            super().schedule()

        def _reschedule(self, node) -> None:
            # The worker runs a test once it knows the next one: one queued test is enough.
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return LongestFirst(config, log)
