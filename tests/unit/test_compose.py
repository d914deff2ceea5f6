"""docker-compose.yml, the Dockerfile and the Prometheus / Grafana files cannot be run here
(no Docker engine): these tests keep them honest instead. Every service under services/ is in
compose with settings its settings class really has, a port that matches, a health check and
the infrastructure it waits for; Prometheus scrapes each of them; every metric an alert or a
dashboard panel names is one the code registers; promtool checks the config and the rules."""

import importlib
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
APP_SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))
INFRA = ("kafka", "postgres", "prometheus", "grafana")
# The one-shot topic step reads the shared settings with their own prefix.
TOPICS_STEP = "topics"
TOPICS_PREFIX = ServiceSettings.model_config["env_prefix"]


def module_or_none(name: str):
    """The module, or None if it does not exist yet (a service being written)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            return None
        raise  # the module exists but imports something missing: a real error


def settings_class(service: str) -> type[ServiceSettings] | None:
    module = module_or_none(f"services.{service}.settings")
    if module is None:
        return None
    classes = [
        cls for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, ServiceSettings) and cls is not ServiceSettings and cls.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"services/{service}/settings.py should define one ServiceSettings subclass"
    return classes[0]


def env_prefix(service: str) -> str:
    cls = settings_class(service)
    return cls.model_config["env_prefix"] if cls else f"{service.upper()}_"


def compose_apps() -> dict[str, str]:
    """Compose services that run a service module -> that module's service name."""
    apps = {}
    for name, spec in SERVICES.items():
        command = spec.get("command") or []
        if command[:2] == ["python", "-m"] and command[2].startswith("services."):
            apps[name] = command[2].removeprefix("services.")
    return apps


def container_ports(spec: dict) -> dict[int, int]:
    """container port -> host port, from "HOST:CONTAINER" entries."""
    mapped = {}
    for entry in spec.get("ports", []):
        host, container = str(entry).rsplit(":", 1)
        mapped[int(container)] = int(host.rsplit(":", 1)[-1])
    return mapped


def test_compose_parses_with_pinned_infrastructure_images():
    for name in INFRA:
        image = SERVICES[name]["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert re.fullmatch(r"postgres:15(\.\d+)?(-\w+)?", SERVICES["postgres"]["image"])


def test_kafka_is_one_kraft_node_without_auto_created_topics():
    env = SERVICES["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in key for key in env)
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@kafka:")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1", f"{key}: a single node cannot replicate"
    assert SERVICES["kafka"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_service_under_services_is_in_compose_and_scraped(service):
    assert service in SERVICES, f"services/{service} has __main__.py but no docker-compose service"
    assert compose_apps().get(service) == service
    scrape_targets = {
        target: job["job_name"]
        for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    port = int(SERVICES[service]["environment"][f"{env_prefix(service)}HTTP_PORT"])
    assert scrape_targets.get(f"{service}:{port}") == service, f"prometheus.yml does not scrape {service}:{port}"


@pytest.mark.parametrize("service", sorted(compose_apps()))
def test_each_compose_service_reaches_kafka_postgres_and_its_port(service):
    spec = SERVICES[service]
    prefix = env_prefix(service)
    env = spec["environment"]
    postgres = SERVICES["postgres"]["environment"]

    assert env[f"{prefix}KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env[f"{prefix}DATABASE_URL"] == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert env[f"{prefix}HTTP_HOST"] == "0.0.0.0"  # reachable from outside its container
    port = int(env[f"{prefix}HTTP_PORT"])
    assert port in container_ports(spec), f"{service}: HTTP port {port} is not published"
    cls = settings_class(service)
    if cls is not None:
        assert cls.model_fields["http_port"].default == port, "compose and the settings default disagree on the port"

    healthcheck = " ".join(spec["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in healthcheck and "urllib" in healthcheck

    depends = spec["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends[TOPICS_STEP]["condition"] == "service_completed_successfully"
    assert spec["build"]["dockerfile"] == "deploy/Dockerfile"


@pytest.mark.parametrize("service", sorted(compose_apps()) + [TOPICS_STEP])
def test_every_env_var_carries_the_service_prefix(service):
    prefix = TOPICS_PREFIX if service == TOPICS_STEP else env_prefix(compose_apps()[service])
    for name in SERVICES[service]["environment"]:
        assert name.startswith(prefix), f"{service}: {name} lacks the service's prefix {prefix}"


# Services whose settings module exists (one still being written is checked once it lands).
SERVICES_WITH_SETTINGS = sorted(name for name, module in compose_apps().items() if settings_class(module))


@pytest.mark.parametrize("service", SERVICES_WITH_SETTINGS + [TOPICS_STEP])
def test_every_env_var_is_a_real_setting_of_that_service(service):
    """A renamed or removed setting would otherwise be silently ignored (extra="ignore")."""
    if service == TOPICS_STEP:
        cls, prefix = ServiceSettings, TOPICS_PREFIX
    else:
        cls = settings_class(compose_apps()[service])
        prefix = cls.model_config["env_prefix"]
    env = SERVICES[service]["environment"]
    unknown = [name for name in env if name.removeprefix(prefix).lower() not in cls.model_fields]
    assert not unknown, f"{service}: {unknown} are not fields of {cls.__name__}"


def test_host_ports_are_unique():
    host_ports = [port for spec in SERVICES.values() for port in container_ports(spec).values()]
    assert len(host_ports) == len(set(host_ports))


def test_topic_step_runs_the_topics_module_once_kafka_is_healthy():
    spec = SERVICES[TOPICS_STEP]
    assert spec["command"] == ["python", "-m", "deploy.local.topics"]
    assert (ROOT / "deploy" / "local" / "topics.py").exists()
    assert spec["restart"] == "no"
    assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert spec["environment"][f"{TOPICS_PREFIX}KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_dockerfile_builds_one_image_with_everything_the_commands_run():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11[.\w-]*slim", dockerfile, re.M)
    assert re.search(r"^RUN pip install -r requirements.txt", dockerfile, re.M)
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    assert {"requirements.txt", "shared/", "services/", "deploy/"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"shared", "services", "deploy", "requirements.txt"} & set(ignored)
    for name, spec in SERVICES.items():
        if "build" in spec:
            module = spec["command"][2]
            assert module.split(".")[0] + "/" in copied, f"{name} runs {module}, which the image lacks"


def test_prometheus_is_mounted_where_its_command_looks():
    spec = SERVICES["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in spec["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in spec["command"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).exists()


def test_grafana_provisioning_matches_the_dashboard_and_prometheus():
    spec = SERVICES["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in spec["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [datasource] = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "loyalty.yml").read_text())
    [provider] = providers["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]

    dashboards = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        queries = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert queries, f"{path.name} has no panels"
        for panel in queries:
            assert panel["datasource"]["uid"] == datasource["uid"], f"{panel['title']}: unknown datasource"
            assert all(t["expr"].strip() for t in panel["targets"]), f"{panel['title']}: empty query"


def test_dashboard_json_is_generated_from_its_source_and_panels_do_not_overlap():
    spec = importlib.util.spec_from_file_location("loyalty_dashboard", GRAFANA_DIR / "dashboard.py")
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    assert (GRAFANA_DIR / "dashboards" / "loyalty.json").read_text() == source.render(), (
        "dashboards/loyalty.json is stale: run `python deploy/grafana/dashboard.py`"
    )
    cells = set()
    for panel in source.build()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
        area = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


# --- metric names: alerts and dashboards name only metrics the code registers -------------

PROMQL_FUNCTIONS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                                 "unless", "offset", "bool", "inf", "nan"}
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)  # string literals (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for token in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[token.end():].lstrip().startswith("("):
            continue  # a function call (sum, rate, histogram_quantile, ...)
        if token.group().lower() not in PROMQL_FUNCTIONS_AND_KEYWORDS:
            names.add(token.group())
    return names


def test_metric_name_extraction():
    assert metric_names('sum by (job, topic) (increase(outbox_published_total{topic=~".*[.]dlq"}[10m])) > 0') == {
        "outbox_published_total"
    }
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket[5m]))) / b") == {
        "a_seconds_bucket", "b"
    }


def registered_metric_names() -> tuple[set[str], set[str]]:
    """Sample names the code registers, and the services whose metrics module is missing."""
    from prometheus_client import REGISTRY

    importlib.import_module("shared.metrics")
    importlib.import_module("shared.outbox")
    missing = set()
    for service in {*APP_SERVICES, *compose_apps()}:
        if module_or_none(f"services.{service}.metrics") is None:
            missing.add(service)
    return set(REGISTRY._names_to_collectors), missing


def monitored_exprs() -> list[tuple[str, str]]:
    exprs = []
    for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]:
        exprs += [(f"alert {rule['alert']}", rule["expr"]) for rule in group["rules"]]
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [(f"panel {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
    return exprs


def test_alerts_and_dashboards_name_only_metrics_the_services_register():
    registered, services_without_metrics = registered_metric_names()
    unknown = []
    for where, expr in monitored_exprs():
        for name in metric_names(expr) - registered - PROMETHEUS_OWN:
            # A service still being written may not have its metrics module yet.
            if not any(name.startswith(f"{service}_") for service in services_without_metrics):
                unknown.append((where, name))
    assert not unknown, f"metrics nobody registers: {unknown}"


# --- promtool ---------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's package (apt-get install -y --no-install-recommends "
                    "prometheus); these checks must not be skipped")
    return path


@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "alerts.yml"],
    ["test", "rules", "alerts_test.yml"],
], ids=["config", "rules", "rule-tests"])
def test_promtool_accepts_config_rules_and_rule_tests(args):
    result = subprocess.run([promtool(), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


SECRET_NAME = re.compile(r"(SECRET|API_KEY|PASSWORD)$")


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_secret_falls_back_to_a_well_known_value(service):
    """A key or secret in compose is required (${VAR:?...}): with a default, a deployment
    that forgot to set it would start with a key everybody can read in this repository."""
    environment = SERVICES[service].get("environment") or {}
    for name, value in environment.items():
        if SECRET_NAME.search(name):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), f"{service}: {name}={value}"
