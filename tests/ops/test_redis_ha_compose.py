"""The compose files' `ha` profile (deploy/redis-ha/compose.yml): a replica and three Sentinels, and the fleet pointed at them.

Checked as the monitoring files are (includes merged the way Compose merges
them, then the Compose Specification's schema), plus the promises of
docs/operations.md: quorum 2 of 3, one master name everywhere, nothing
published, the same password on both servers and the Sentinels, and a
Sentinel URL in .env.example that the settings accept and that names every
Sentinel service.
"""

from __future__ import annotations

import re

import pytest

yaml = pytest.importorskip("yaml")

from tasks.redis_urls import parse_sentinel_url  # noqa: E402
from tasks.settings import Settings  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.ops.test_compose import example_env, interpolate, schema  # noqa: E402,F401
from tests.ops.test_monitoring import MAIN_FILES, load_project, schema_errors  # noqa: E402

HA_FILE = REPO_ROOT / "deploy/redis-ha/compose.yml"
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_SERVICES = {"redis-replica", *SENTINELS}


def sentinel_url(example_env: dict[str, str]) -> str:
    """The commented IDENT_REDIS_URL of .env.example for the `ha` profile, with .env's own interpolation."""
    text = (REPO_ROOT / ".env.example").read_text()
    match = re.search(r"^# IDENT_REDIS_URL=(sentinel://\S+)$", text, re.M)
    assert match, ".env.example shows the Sentinel URL of the ha profile"
    return interpolate(match.group(1), example_env)


def ha_env(example_env: dict[str, str]) -> dict[str, str]:
    return {**example_env, "IDENT_REDIS_URL": sentinel_url(example_env)}


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_both_compose_files_include_the_ha_services_and_stay_valid(path, schema, example_env):
    included = [(path.parent / e).resolve() for e in yaml.safe_load(path.read_text())["include"]]
    assert HA_FILE.resolve() in included
    for env in (example_env, ha_env(example_env)):
        project, _ = load_project(path, env)
        assert HA_SERVICES <= set(project["services"])
        assert not (errors := schema_errors(schema, project)), errors


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_the_ha_services_run_only_in_the_ha_profile_and_publish_nothing(path, example_env):
    project, _ = load_project(path, example_env)
    for name, service in project["services"].items():
        if name in HA_SERVICES:
            assert service["profiles"] == ["ha"], name
            assert "ports" not in service, name
            assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        else:
            assert "ha" not in (service.get("profiles") or []), name


def test_the_replica_follows_redis_and_either_can_serve_as_master(example_env):
    services, _ = load_project(MAIN_FILES[0], example_env)
    services = services["services"]
    assert services["redis-replica"]["environment"]["REPLICA_OF"] == "redis 6379"
    assert "REPLICA_OF" not in services["redis"]["environment"]
    for name in ("redis", "redis-replica"):
        command = " ".join(services[name]["command"])
        assert command.startswith("sh -c exec sh /usr/local/bin/start-redis.sh --appendonly yes"), name
        assert '--requirepass "$REDIS_PASSWORD"' in command and '--masterauth "$REDIS_PASSWORD"' in command, name
        assert f"--replica-announce-ip {name}" in command, name
        assert services[name]["environment"]["REDIS_HOST_NAME"] == name
        assert services[name]["environment"]["REDIS_PASSWORD"] == example_env["IDENT_REDIS_PASSWORD"]
        assert any(str(v).endswith("start-redis.sh:/usr/local/bin/start-redis.sh:ro") for v in services[name]["volumes"])


def test_the_sentinels_watch_redis_with_a_quorum_of_two_under_the_workers_master_name(example_env):
    project, _ = load_project(MAIN_FILES[0], example_env)
    services = project["services"]
    master_names = {services[w]["environment"]["IDENT_REDIS_SENTINEL_MASTER"] for w in ("vision-worker", "audio-worker")}
    assert len(master_names) == 1
    (master,) = master_names
    for name in SENTINELS:
        script = services[name]["command"][-1]
        assert f"sentinel monitor {master} redis 6379 2" in script
        assert f"sentinel auth-pass {master} $REDIS_PASSWORD" in script
        assert "requirepass $REDIS_PASSWORD" in script
        assert "port 26379" in script and "sentinel resolve-hostnames yes" in script
        assert script.rstrip().endswith("exec redis-server /tmp/sentinel.conf --sentinel")
        assert services[name]["environment"]["SENTINEL_DOWN_AFTER_MS"] == example_env["REDIS_SENTINEL_DOWN_AFTER_MS"]
        assert "sentinel get-master-addr-by-name" in " ".join(services[name]["healthcheck"]["test"])


@pytest.mark.parametrize("path", MAIN_FILES, ids=lambda p: p.name)
def test_the_fleet_follows_the_sentinels_when_env_names_them_and_redis_otherwise(path, example_env):
    plain, _ = load_project(path, example_env)
    ha, _ = load_project(path, ha_env(example_env))
    password = example_env["IDENT_REDIS_PASSWORD"]
    for name in ("vision-worker", "audio-worker", "flower"):
        assert plain["services"][name]["environment"]["IDENT_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
        environment = ha["services"][name]["environment"]
        settings = Settings.from_env({k: str(v) for k, v in environment.items() if k.startswith("IDENT_")})
        target = parse_sentinel_url(settings.redis_url)
        assert {host for host, _ in target.addresses} == set(SENTINELS)
        assert {port for _, port in target.addresses} == {26379}
        assert target.password == password == settings.redis_sentinel_password
        assert settings.redis_sentinel_master == "ident"
        assert settings.replicas_to_confirm() == 1
