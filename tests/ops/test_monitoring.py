"""The `monitoring` profile: Prometheus and Grafana beside the fleet, and the dashboard.

compose.gpu.yml and compose.cpu.yml ``include`` deploy/prometheus/compose.yml
and deploy/grafana/compose.yml; the tests load each compose file with its
includes the way Compose does (every included file interpolated with the same
variables, its relative paths taken from its own folder, its services and
volumes merged in) and check the result against the Compose Specification's
schema, and the wiring: the scrape targets are the workers' services on the
port the workers serve, Grafana's datasource is that Prometheus, and the
dashboard asks only for series the workers export (workers/metrics.py,
workers/scrape_gauges.py), aggregated across worker replicas.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

from tasks.settings import Settings  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.ops.test_compose import UnsetVariable, interpolate  # noqa: E402
# The compose tests' fixtures, shared rather than copied.
from tests.ops.test_compose import example_env, schema  # noqa: E402,F401

MAIN_FILES = [REPO_ROOT / "compose.gpu.yml", REPO_ROOT / "compose.cpu.yml"]
MONITORING_FILES = [REPO_ROOT / "deploy/prometheus/compose.yml", REPO_ROOT / "deploy/grafana/compose.yml"]
MONITORING = {"prometheus", "grafana"}
PROMETHEUS_CONFIG = REPO_ROOT / "deploy/prometheus/prometheus.yml"
DATASOURCES = REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = REPO_ROOT / "deploy/grafana/provisioning/dashboards/identification.yml"
DASHBOARD = REPO_ROOT / "deploy/grafana/dashboards/identification.json"
METRICS_PORT = 9808

# The series the workers export (workers/metrics.py, workers/scrape_gauges.py): name -> kind.
SERIES = {
    "ident_jobs_total": "counter",
    "ident_job_seconds": "histogram",
    "ident_queue_wait_seconds": "histogram",
    "ident_model_inference_seconds": "histogram",
    "ident_batch_size": "histogram",
    "ident_model_info": "gauge",
    "ident_queue_length": "gauge",
    "ident_jobs_in_progress": "gauge",
    "ident_gpu_memory_used_bytes": "gauge",
    "ident_gpu_utilization_ratio": "gauge",
}
GPU_SERIES = {"ident_gpu_memory_used_bytes", "ident_gpu_utilization_ratio"}
# Every worker replica reports the same Redis list lengths: max across them, never the sum.
SAME_IN_EVERY_WORKER = {"ident_queue_length"}


def series_kind(name: str) -> tuple[str, str] | None:
    """(base series, part) of an exported sample name: part is "" or a histogram's _bucket/_sum/_count."""
    if SERIES.get(name) in ("counter", "gauge"):
        return name, ""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and SERIES.get(base) == "histogram":
            return base, suffix
    return None


# --- loading the compose files as Compose does --------------------------------------------


def load_project(path: Path, env: dict[str, str]) -> tuple[dict, dict[str, Path]]:
    """The compose file with its includes merged, and the folder each service's relative paths start from."""
    document = interpolate(yaml.safe_load(path.read_text()), env)
    folders = {name: path.parent for name in document.get("services", {})}
    for entry in document.pop("include", []) or []:
        entry = {"path": entry} if isinstance(entry, str) else entry
        paths = [entry["path"]] if isinstance(entry["path"], str) else entry["path"]
        for included_path in paths:
            included_file = (path.parent / included_path).resolve()
            included = interpolate(yaml.safe_load(included_file.read_text()), env)
            for key in ("services", "volumes", "networks", "secrets", "configs"):
                for name, value in (included.get(key) or {}).items():
                    target = document.setdefault(key, {})
                    assert name not in target, f"{included_file} redefines {key}.{name} (Compose refuses that)"
                    target[name] = value
                    if key == "services":
                        folders[name] = included_file.parent
    return document, folders




@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())


def schema_errors(schema: dict, document: dict) -> str:
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def bind_mounts(service: dict, folder: Path) -> list[tuple[Path, str, str]]:
    """(host path, container path, options) of each bind mount in a service's short-syntax volumes."""
    mounts = []
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        target, _, options = rest.partition(":")
        if source.startswith((".", "/")):
            mounts.append(((folder / source).resolve(), target, options))
    return mounts


# --- compose ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_compose_files_include_the_monitoring_files(path):
    included = yaml.safe_load(path.read_text()).get("include")
    assert included, f"{path.name} includes no monitoring services"
    paths = [(path.parent / (e if isinstance(e, str) else e["path"])).resolve() for e in included]
    assert {p.resolve() for p in MONITORING_FILES} <= set(paths)
    assert all(p.is_file() for p in paths)


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_valid_with_the_monitoring_services(path, schema, example_env):
    project, _ = load_project(path, example_env)
    assert MONITORING <= set(project["services"])
    assert {"prometheus-data", "grafana-data"} <= set(project["volumes"])
    assert not (errors := schema_errors(schema, project)), errors


@pytest.mark.parametrize("path", MONITORING_FILES, ids=lambda p: p.parent.name)
def test_monitoring_files_are_valid_compose_files_of_their_own(path, schema, example_env):
    document = interpolate(yaml.safe_load(path.read_text()), example_env)
    assert "name" not in document, "an included file takes the including project's name"
    assert not (errors := schema_errors(schema, document)), errors


@pytest.mark.parametrize("path", MONITORING_FILES, ids=lambda p: p.parent.name)
def test_env_example_sets_every_variable_the_monitoring_files_use(path, example_env):
    used: set[str] = set()
    interpolate(yaml.safe_load(path.read_text()), example_env, used)
    assert used, "the monitoring files take their ports and password from .env"
    assert used - set(example_env) == set(), "add these to .env.example"


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_prometheus_and_grafana_only_in_the_monitoring_profile(path, example_env):
    services, _ = load_project(path, example_env)
    services = services["services"]
    for name in MONITORING:
        assert services[name].get("profiles") == ["monitoring"], name
    in_profile = {name for name, s in services.items() if "monitoring" in (s.get("profiles") or [])}
    assert in_profile == MONITORING
    # A plain `docker compose up` starts the fleet, and no monitoring.
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default.isdisjoint(MONITORING) and {"redis", "vision-worker", "audio-worker"} <= default


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_grafana_refuses_to_start_without_its_password(path, example_env):
    raw = yaml.safe_load((REPO_ROOT / "deploy/grafana/compose.yml").read_text())
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}",
                        raw["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    for env in ({k: v for k, v in example_env.items() if k != "GRAFANA_ADMIN_PASSWORD"},
                {**example_env, "GRAFANA_ADMIN_PASSWORD": ""}):
        with pytest.raises(UnsetVariable, match="GRAFANA_ADMIN_PASSWORD"):
            load_project(path, env)
    grafana = load_project(path, example_env)[0]["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == example_env["GRAFANA_ADMIN_PASSWORD"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["environment"]["GF_USERS_ALLOW_SIGN_UP"] == "false"


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_monitoring_is_published_on_loopback_only(path, example_env):
    bare = {k: v for k, v in example_env.items() if not k.startswith(("GRAFANA_BIND", "PROMETHEUS_PORT",
                                                                        "GRAFANA_PORT"))}
    for env in (example_env, bare):
        services = load_project(path, env)[0]["services"]
        (prometheus_port,) = services["prometheus"]["ports"]
        assert str(prometheus_port) == f"127.0.0.1:{env.get('PROMETHEUS_PORT', '9090')}:9090"
        (grafana_port,) = services["grafana"]["ports"]
        assert str(grafana_port) == f"127.0.0.1:{env.get('GRAFANA_PORT', '3000')}:3000"
    # Prometheus has no authentication: its address is not a setting at all.
    raw = yaml.safe_load((REPO_ROOT / "deploy/prometheus/compose.yml").read_text())
    assert raw["services"]["prometheus"]["ports"][0].startswith("127.0.0.1:")
    for name, service in load_project(path, example_env)[0]["services"].items():
        # Flower and the HTTP gateway are published on purpose, each on loopback by default (test_compose.py).
        if name not in MONITORING and name not in ("flower", "gateway"):
            assert "ports" not in service, f"{name} publishes a port"


def test_monitoring_images_are_pinned(example_env):
    services = load_project(MAIN_FILES[0], example_env)[0]["services"]
    for name, repository in (("prometheus", "prom/prometheus"), ("grafana", "grafana/grafana")):
        image, _, tag = services[name]["image"].partition(":")
        assert image == repository
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(-[\w.]+)?(@sha256:[0-9a-f]{64})?", tag), f"{name}: pin a version"


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_prometheus_reads_its_config_read_only_and_keeps_its_data(path, example_env):
    project, folders = load_project(path, example_env)
    prometheus = project["services"]["prometheus"]
    mounts = {target: (source, options) for source, target, options in bind_mounts(prometheus, folders["prometheus"])}
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    source, options = mounts[config_flag.partition("=")[2]]
    assert source == PROMETHEUS_CONFIG.resolve() and source.is_file()
    assert options == "ro"
    storage_flag = next(a for a in prometheus["command"] if a.startswith("--storage.tsdb.path="))
    assert f"prometheus-data:{storage_flag.partition('=')[2]}" in prometheus["volumes"]
    assert "prometheus-data" in project["volumes"]


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_grafana_mounts_point_at_files_that_exist(path, example_env):
    project, folders = load_project(path, example_env)
    grafana = project["services"]["grafana"]
    mounts = {target: (source, options) for source, target, options in bind_mounts(grafana, folders["grafana"])}
    provisioning, options = mounts["/etc/grafana/provisioning"]
    assert options == "ro"
    assert (provisioning / "datasources" / "prometheus.yml").resolve() == DATASOURCES.resolve()
    assert (provisioning / "dashboards" / "identification.yml").resolve() == DASHBOARD_PROVIDERS.resolve()
    assert DATASOURCES.is_file() and DASHBOARD_PROVIDERS.is_file()
    # The provider's folder inside the container is a read-only mount of the dashboards' folder.
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards, options = mounts[provider["options"]["path"]]
    assert options == "ro"
    assert (dashboards / DASHBOARD.name).resolve() == DASHBOARD.resolve() and DASHBOARD.is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert "grafana-data:/var/lib/grafana" in grafana["volumes"] and "grafana-data" in project["volumes"]


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_workers_serve_metrics_on_the_scraped_port(path, example_env, prometheus_config):
    services = load_project(path, example_env)[0]["services"]
    workers = {name: s for name, s in services.items() if "worker" in name}
    assert {"vision-worker", "audio-worker"} <= set(workers)
    scraped = {sd["port"] for job in prometheus_config["scrape_configs"] for sd in job.get("dns_sd_configs", [])}
    for name, worker in workers.items():
        port = worker["environment"]["IDENT_METRICS_PORT"]
        assert port == str(METRICS_PORT), name
        assert Settings.from_env({"IDENT_METRICS_PORT": port}).metrics_port == METRICS_PORT
    assert scraped == {METRICS_PORT}


# --- Prometheus ----------------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_service_on_the_metrics_port(prometheus_config, example_env):
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    assert len(jobs) == len(prometheus_config["scrape_configs"]), "job names must be unique"
    worker_services = set()
    for path in MAIN_FILES:
        worker_services |= {n for n in load_project(path, example_env)[0]["services"] if "worker" in n}
    found = set()
    for kind in ("vision-worker", "audio-worker"):
        job = jobs[kind]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert "static_configs" not in job, "replicas have no fixed addresses: discover them through DNS"
        (sd,) = job["dns_sd_configs"]
        assert sd["type"] == "A" and sd["port"] == METRICS_PORT
        assert kind in sd["names"]
        found |= set(sd["names"])
        assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in job["relabel_configs"]
    # Every worker service of either compose file is scraped, and every name scraped is a service.
    assert found == worker_services


def test_prometheus_scrape_interval_matches_grafanas(prometheus_config):
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana provisioning ------------------------------------------------------------------


def test_datasource_is_the_compose_prometheus(example_env):
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["access"] == "proxy"
    prometheus = load_project(MAIN_FILES[0], example_env)[0]["services"]["prometheus"]
    container_port = str(prometheus["ports"][0]).rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{container_port}"
    assert datasource["uid"] and datasource["isDefault"] is True


# --- the dashboard -----------------------------------------------------------------------------

_AGGREGATION = re.compile(r"\b(sum|max|min|avg|count)\s+by\s*\(([^)]*)\)\s*\(")
_IDENTIFIER = re.compile(r"(?<![\w:$.])[A-Za-z_:][\w:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}


def panels(dashboard: dict) -> list[dict]:
    """Every panel but the rows, those nested in collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def masked(expr: str) -> str:
    """expr with string literals, label matchers, ranges and grouping lists blanked, positions kept."""
    out = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: " " * len(m.group(0)), expr)
    out = re.sub(r"\{[^}]*\}", lambda m: " " * len(m.group(0)), out)
    out = re.sub(r"\[[^\]]*\]", lambda m: " " * len(m.group(0)), out)
    out = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                 lambda m: m.group(1) + " " * (len(m.group(0)) - len(m.group(1))), out)
    return out


def metric_names(expr: str) -> list[tuple[str, int]]:
    """(name, position) of each series selector in a PromQL expression."""
    text = masked(expr)
    names = []
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end():].lstrip()
        # A function's or an aggregation's name (`sum by (...) (`), not a series.
        if match.group(0).lower() in _KEYWORDS or rest.startswith("(") or re.match(r"(by|without)\b", rest):
            continue
        names.append((match.group(0), match.start()))
    return names


def closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def innermost_aggregation(expr: str, position: int) -> tuple[str, set[str]] | None:
    """(operator, by-labels) of the innermost `op by (...) (...)` whose argument holds ``position``."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: " " * len(m.group(0)), expr)
    best = None
    for match in _AGGREGATION.finditer(text):
        start = match.end() - 1
        end = closing(text, start)
        if start < position < end and (best is None or start > best[0]):
            best = (start, match.group(1), {label.strip() for label in match.group(2).split(",") if label.strip()})
    return None if best is None else (best[1], best[2])


def test_metric_name_parsing():
    expr = ('histogram_quantile(0.95, sum by (task, le) (rate(ident_job_seconds_bucket{task=~"$task", '
            'outcome="failure"}[$__rate_interval]))) / sum(up) or vector(0)')
    assert [n for n, _ in metric_names(expr)] == ["ident_job_seconds_bucket", "up"]
    position = dict(metric_names(expr))["ident_job_seconds_bucket"]
    assert innermost_aggregation(expr, position) == ("sum", {"task", "le"})
    assert innermost_aggregation("rate(ident_jobs_total[5m])", 6) is None
    assert series_kind("ident_batch_size_count") == ("ident_batch_size", "_count")
    assert series_kind("ident_batch_size") is None and series_kind("ident_jobs_total_bucket") is None


def test_dashboard_is_a_grafana_10_or_11_dashboard(dashboard):
    assert 38 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None, "a provisioned dashboard carries no database id"
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for r in dashboard["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_panels_do_not_overlap(dashboard):
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_panel_has_a_promql_target(dashboard):
    assert len(panels(dashboard)) >= 12
    for panel in panels(dashboard):
        targets = panel.get("targets") or []
        assert targets, f"{panel['title']} has no query"
        assert all(t.get("expr", "").strip() for t in targets), panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows"


def test_queries_are_balanced(dashboard):
    for expr in expressions(dashboard):
        text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
        assert text.count('"') % 2 == 0, expr
        for opening, closing_ in ("()", "{}", "[]"):
            depth = 0
            for char in text:
                depth += (char == opening) - (char == closing_)
                assert depth >= 0, expr
            assert depth == 0, expr


def test_every_metric_is_one_the_workers_export(dashboard):
    used = set()
    for expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no series in {expr!r}"
        for name, _ in names:
            assert series_kind(name) is not None, f"{name} is not a series the workers export ({expr!r})"
            used.add(series_kind(name)[0])
    # Every series has a panel.
    assert used == set(SERIES)


def test_queries_aggregate_across_worker_replicas(dashboard):
    for expr in expressions(dashboard):
        for name, position in metric_names(expr):
            base, part = series_kind(name)
            aggregation = innermost_aggregation(expr, position)
            assert aggregation is not None, f"{name} is not aggregated across replicas in {expr!r}"
            operator, labels = aggregation
            if base in GPU_SERIES:
                # A card-wide NVML figure, the same in every worker on that card, under an
                # in-container index: one line per worker container and GPU.
                assert {"instance", "gpu"} <= labels, expr
                continue
            assert not labels & {"instance", "pod", "hostname"}, f"{expr!r} keeps replicas apart"
            if base in SAME_IN_EVERY_WORKER:
                assert operator == "max", f"every worker reports {base}: max it, a sum counts it per replica"
            else:
                assert operator == "sum", f"{expr!r}: sum {name} across replicas"
            if part == "_bucket":
                assert "le" in labels, f"{expr!r}: keep le for the buckets"


def test_rates_are_of_counters_over_the_rate_interval(dashboard):
    for expr in expressions(dashboard):
        for match in re.finditer(r"\b(rate|irate|increase)\(", expr):
            inner = expr[match.end(): closing(expr, match.end() - 1)]
            (name,) = [n for n, _ in metric_names(inner)]
            base, part = series_kind(name)
            assert SERIES[base] == "counter" or part, f"{match.group(1)} of the gauge {name}"
            assert inner.rstrip().endswith("[$__rate_interval]"), expr
        for name, _ in metric_names(expr):
            base, part = series_kind(name)
            if SERIES[base] == "counter" or part:
                assert re.search(r"\b(rate|increase)\(\s*" + name, expr), f"{name} is a counter: rate() it"


def panel_exprs(dashboard: dict, needle: str) -> list[tuple[dict, str]]:
    return [(p, t["expr"]) for p in panels(dashboard) for t in p["targets"] if needle in t["expr"]]


def test_the_panels_the_fleet_needs(dashboard):
    def has(pattern: str) -> list[dict]:
        return [p for p in panels(dashboard) for t in p["targets"] if re.search(pattern, t["expr"])]

    assert has(r"sum by \(task, outcome\) \(rate\(ident_jobs_total\{")
    assert has(r'sum by \(task, error\) \(rate\(ident_jobs_total\{[^}]*outcome="failure"')
    for base, by in (("ident_job_seconds", "task"), ("ident_queue_wait_seconds", "queue")):
        quantiles = {float(q) for p in has(rf"{base}_bucket")
                     for q in re.findall(rf"histogram_quantile\(([\d.]+), sum by \({by}, le\)", 
                                         " ".join(t["expr"] for t in p["targets"]))}
        assert quantiles == {0.5, 0.95, 0.99}, base
    assert has(r"max by \(queue\) \(ident_queue_length")
    assert has(r"sum by \(queue\) \(ident_jobs_in_progress")
    assert has(r"sum by \(model\) \(rate\(ident_batch_size_sum\{.*/ sum by \(model\) \(rate\(ident_batch_size_count")
    (heatmap,) = [p for p in has(r"ident_batch_size_bucket") if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert has(r"sum by \(model, provider, le\) \(rate\(ident_model_inference_seconds_bucket")
    (table,) = [p for p in has(r"ident_model_info") if p["type"] == "table"]
    (target,) = table["targets"]
    assert target["format"] == "table" and target["instant"] is True
    assert re.search(r"sum by \(model, provider, device, reason\) \(ident_model_info\{[^}]*\} > 0\)", target["expr"])
    for name in GPU_SERIES:
        assert has(name)


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"DS_PROMETHEUS", "queue", "task"} <= set(variables)
    for name, metric_label in (("queue", "queue"), ("task", "task")):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
        query = variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
        assert match and series_kind(match.group(1)) is not None and match.group(2) == metric_label
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    defined = set(variables) | {"__rate_interval", "__interval", "__range"}
    for expr in expressions(dashboard):
        for used in re.findall(r"\$\{?(\w+)", expr):
            assert used in defined, f"${used} is not a variable of the dashboard"
    # Each filter is used where its label exists.
    assert any('queue=~"$queue"' in e for e in expressions(dashboard))
    assert any('task=~"$task"' in e for e in expressions(dashboard))


def test_datasource_is_the_provisioned_one(dashboard):
    (provisioned,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    variable = variables["DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    assert variable["current"]["value"] == provisioned["uid"]
    reference = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels(dashboard):
        assert panel["datasource"] == reference, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == reference, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == reference, variable["name"]


def test_dashboard_queries_pass_promtool(dashboard, tmp_path):
    """PromQL syntax, by Prometheus's own parser, where promtool is installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    values = {"$__rate_interval": "1m", "$queue": ".*", "$task": ".*", "$model": ".*"}
    rules = []
    for i, expr in enumerate(expressions(dashboard)):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
