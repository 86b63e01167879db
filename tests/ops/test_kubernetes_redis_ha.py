"""deploy/kubernetes/components/redis-ha: Redis behind Sentinel on Kubernetes.

Reuses tests/ops/test_kubernetes.py's builder, helpers and fixtures (imported,
not copied): the base plus the component builds, validates strictly, and the
workers, Flower, the Sentinels, the redis pods and KEDA agree on the Sentinels'
addresses, the master's name, the quorum and the Secret's keys.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ops.test_kubernetes import (  # noqa: F401  (fixtures are used by name)
    K8S_VERSIONS,
    KUBE,
    KUBECTL,
    SECRET_NAME,
    WORKERS,
    _defined_before,
    _references,
    _selects,
    _unhashed,
    base,
    config,
    containers,
    env_of,
    assert_core_kinds_valid,
    assert_keda_kinds_valid,
    keda_schemas,
    kinds,
    load_yaml_documents_text,
    needs_kubectl,
    one,
    pod_spec,
    read_env_file,
    resolved_env,
    secret,
    yaml,
)
from tasks.redis_urls import is_sentinel_url, parse_sentinel_url
from tasks.settings import Settings

REDIS_HA = KUBE / "components" / "redis-ha"
MASTER = "ident"
SENTINELS = 3
QUORUM = 2
CLIENTS = (*WORKERS.values(), "flower")


@pytest.fixture(scope="module")
def with_redis_ha() -> list[dict]:
    from tests.ops.test_kubernetes import build

    return build(KUBE, components=(REDIS_HA,))


def _script(container: dict) -> str:
    command = container["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    return command[2]


def _sentinel_conf(docs: list[dict]) -> str:
    (container,) = containers(one(docs, "StatefulSet", "redis-sentinel"))
    script = _script(container)
    match = re.search(r"<<CONF\n(.*?)\nCONF\n", script, re.S)
    assert match, "the Sentinel's start script writes its configuration with a <<CONF here-document"
    return match.group(1)


def _conf_lines(conf: str, prefix: str) -> list[list[str]]:
    return [line.split() for line in conf.splitlines() if line.split()[: len(prefix.split())] == prefix.split()]


# --- the build --------------------------------------------------------------------------


def test_the_component_is_named_in_the_kustomization_and_lists_its_files():
    text = (KUBE / "kustomization.yaml").read_text()
    assert "#   - components/redis-ha" in text
    spec = yaml.safe_load((REDIS_HA / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    files = {p.name for p in REDIS_HA.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert files == set(spec["resources"])


def test_the_build_has_the_sentinels_and_their_services(with_redis_ha, base):
    added = {(d["kind"], d["metadata"]["name"]) for d in with_redis_ha} - \
        {(d["kind"], d["metadata"]["name"]) for d in base}
    assert added == {("Service", "redis-headless"), ("Service", "redis-sentinel"),
                     ("StatefulSet", "redis-sentinel"), ("PodDisruptionBudget", "redis-sentinel"),
                     ("PodDisruptionBudget", "redis")}
    for doc in with_redis_ha:
        if doc["kind"] not in ("Namespace",):
            assert doc["metadata"]["namespace"] == "identification", doc["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_strictly(version, with_redis_ha):
    checked = assert_core_kinds_valid(with_redis_ha, version)
    assert {"Service", "StatefulSet", "Deployment", "PodDisruptionBudget"} <= checked


def test_keda_kinds_validate_against_their_crds(with_redis_ha, keda_schemas):
    assert_keda_kinds_valid(with_redis_ha, keda_schemas)


def test_both_components_together_build(keda_schemas):
    from tests.ops.test_kubernetes import COMPONENT, build

    docs = build(KUBE, components=(COMPONENT, REDIS_HA))
    for name in WORKERS.values():
        triggers = one(docs, "ScaledObject", name)["spec"]["triggers"]
        assert [t["type"] for t in triggers] == ["redis-sentinel", "prometheus"]


# --- the workers and Flower ---------------------------------------------------------------


@pytest.mark.parametrize("name", CLIENTS)
def test_clients_reach_redis_through_every_sentinel(name, with_redis_ha, config, secret):
    (container,) = containers(one(with_redis_ha, "Deployment", name))
    assert _defined_before(container, config) == []
    env = container["env"]
    assert [e["name"] for e in env].count("IDENT_REDIS_URL") == 1
    variables = resolved_env(container, config, secret)
    url = variables["IDENT_REDIS_URL"]
    assert is_sentinel_url(url) and "$(" not in url
    settings = Settings.from_env({k: v for k, v in variables.items() if k.startswith("IDENT_")})
    assert settings.redis_url == url
    target = parse_sentinel_url(settings.redis_url)
    service = one(with_redis_ha, "Service", "redis-sentinel")
    assert service["spec"]["clusterIP"] == "None", "per-pod names need a headless Service"
    assert set(target.addresses) == {(f"redis-sentinel-{i}.redis-sentinel", 26379) for i in range(SENTINELS)}
    assert {p["port"] for p in service["spec"]["ports"]} == {26379}
    # The master's password in the first address, the Sentinels' own beside it: the same Secret key.
    assert target.password == secret["REDIS_PASSWORD"] and target.db == 0
    assert settings.redis_sentinel_master == MASTER
    assert settings.redis_sentinel_password == secret["REDIS_PASSWORD"]
    assert env_of(container)["IDENT_REDIS_URL"]["value"].startswith("sentinel://:$(REDIS_PASSWORD)@")
    assert settings.redis_wait_replicas is None or settings.redis_wait_replicas >= 1


# --- the Sentinels ------------------------------------------------------------------------


def test_sentinels_monitor_redis_0_with_a_quorum_of_two(with_redis_ha):
    sentinels = one(with_redis_ha, "StatefulSet", "redis-sentinel")
    assert sentinels["spec"]["replicas"] == SENTINELS
    assert _selects(one(with_redis_ha, "Service", "redis-sentinel"), sentinels)
    assert sentinels["spec"]["serviceName"] == "redis-sentinel"
    conf = _sentinel_conf(with_redis_ha)
    (monitor,) = _conf_lines(conf, "sentinel monitor")
    _, _, name, host, port, quorum = monitor
    assert name == MASTER
    assert int(quorum) == QUORUM and SENTINELS // 2 < QUORUM <= SENTINELS
    assert port == "$port" and host == "$master"
    script = _script(containers(sentinels)[0])
    assert 'master="redis-0.redis-headless.$domain"' in script and "port=6379" in script
    assert "sentinel get-master-addr-by-name ident" in script
    for line in ("sentinel resolve-hostnames yes", "sentinel announce-hostnames yes",
                 f"sentinel down-after-milliseconds {MASTER} 5000",
                 f"sentinel auth-pass {MASTER} $REDIS_PASSWORD", "requirepass $REDIS_PASSWORD", "port 26379"):
        assert line in conf.splitlines(), line
    for key, *rest in (line.split() for line in conf.splitlines() if line.startswith("sentinel ")):
        if rest[0] in ("monitor", "auth-pass", "down-after-milliseconds", "failover-timeout", "parallel-syncs"):
            assert rest[1] == MASTER, rest
    # Written at start into a writable emptyDir (Sentinel rewrites it); the root fs stays read-only.
    (container,) = containers(sentinels)
    assert 'conf=/etc/sentinel/sentinel.conf' in _script(container)
    assert _script(container).rstrip().endswith('exec redis-server "$conf" --sentinel')
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/etc/sentinel"
    (volume,) = pod_spec(sentinels)["volumes"]
    assert volume["name"] == mount["name"] and "emptyDir" in volume


def test_sentinels_are_hardened_probed_and_budgeted(with_redis_ha):
    sentinels = one(with_redis_ha, "StatefulSet", "redis-sentinel")
    redis = one(with_redis_ha, "StatefulSet", "redis")
    spec, redis_spec = pod_spec(sentinels), pod_spec(redis)
    assert spec["securityContext"] == {k: v for k, v in redis_spec["securityContext"].items()
                                       if k != "fsGroupChangePolicy"}
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    (container,) = containers(sentinels)
    (redis_container,) = containers(redis)
    assert container["securityContext"] == redis_container["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == redis_container["image"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli -p 26379" in command, probe
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    env = env_of(container)
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    budget = one(with_redis_ha, "PodDisruptionBudget", "redis-sentinel")
    assert budget["spec"]["maxUnavailable"] == 1 and SENTINELS - 1 >= QUORUM
    assert budget["spec"]["selector"]["matchLabels"] == sentinels["spec"]["selector"]["matchLabels"]
    redis_budget = one(with_redis_ha, "PodDisruptionBudget", "redis")
    assert redis_budget["spec"]["selector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]


# --- the master and its replica -------------------------------------------------------------


def test_redis_is_a_master_and_a_replica_with_stable_names(with_redis_ha):
    redis = one(with_redis_ha, "StatefulSet", "redis")
    assert redis["spec"]["replicas"] == 2
    headless = one(with_redis_ha, "Service", redis["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert _selects(headless, redis)
    # The old name stays, on redis-0 only: over both pods half the writes would reach the replica.
    legacy = one(with_redis_ha, "Service", "redis")
    assert legacy["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "redis-0"
    for service in kinds(with_redis_ha, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_redis_start_script_has_the_three_branches(with_redis_ha):
    (container,) = containers(one(with_redis_ha, "StatefulSet", "redis"))
    script = _script(container)
    env = env_of(container)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Every Sentinel is asked for the current master.
    assert "for i in 0 1 2" in script
    assert re.search(r'redis-cli -h "redis-sentinel-\$i\.redis-sentinel\.\$domain" -p 26379 '
                     r'sentinel get-master-addr-by-name ident', script)
    assert 'self="$POD_NAME.redis-headless.$domain"' in script
    # 1. A Sentinel names another pod: replicate it.
    assert re.search(r'if \[ -n "\$master" \] && \[ "\$master" != "\$self" \]; then\n.*\n\s*set -- --replicaof '
                     r'"\$master" "\$port"', script)
    # 2. No Sentinel answers, ordinal 0: the master.
    assert re.search(r'elif \[ "\$ordinal" = "0" \]; then\n.*\n\s*set --\n', script)
    # 3. Otherwise: a replica of redis-0.
    assert re.search(r'else\n.*\n\s*set -- --replicaof "redis-0\.redis-headless\.\$domain" 6379\n', script)
    (exec_line,) = [line.strip() for line in script.splitlines() if line.strip().startswith("exec ")]
    for option in ("--dir /data", "--appendonly yes", '--requirepass "$REDIS_PASSWORD"',
                   '--masterauth "$REDIS_PASSWORD"', '--replica-announce-ip "$self"'):
        assert option in exec_line, option
    assert exec_line.endswith('"$@"')


def test_redis_start_script_runs_each_branch(tmp_path):
    """The script itself, under sh, with redis-cli and redis-server stood in for."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    from tests.ops.test_kubernetes import build

    (container,) = containers(one(build(KUBE, components=(REDIS_HA,)), "StatefulSet", "redis"))
    script = _script(container)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-cli").write_text('#!/bin/sh\n[ -n "$FAKE_MASTER" ] && printf "%s\\n6379\\n" "$FAKE_MASTER"\nexit 0\n')
    (bin_dir / "redis-server").write_text('#!/bin/sh\necho "ARGS: $*"\n')
    (bin_dir / "timeout").write_text('#!/bin/sh\nshift\nexec "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)

    def run(pod: str, master: str) -> str:
        done = subprocess.run([sh, "-c", script], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "POD_NAME": pod, "POD_NAMESPACE": "identification",
                                   "REDIS_PASSWORD": "pw", "FAKE_MASTER": master})
        assert done.returncode == 0, done.stderr
        (args,) = [line for line in done.stdout.splitlines() if line.startswith("ARGS: ")]
        return args

    me0, me1 = (f"redis-{i}.redis-headless.identification.svc" for i in (0, 1))
    assert run("redis-0", me1).endswith(f"--replica-announce-ip {me0} --replicaof {me1} 6379")
    assert run("redis-0", me0).endswith(f"--replica-announce-ip {me0}")
    assert run("redis-0", "").endswith(f"--replica-announce-ip {me0}")
    assert run("redis-1", "").endswith(f"--replica-announce-ip {me1} --replicaof {me0} 6379")
    assert run("redis-1", me1).endswith(f"--replica-announce-ip {me1}")


# --- KEDA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", WORKERS)
def test_keda_reads_the_list_through_the_sentinels(queue, with_redis_ha, base):
    scaled = one(with_redis_ha, "ScaledObject", WORKERS[queue])
    (trigger,) = scaled["spec"]["triggers"]
    (before,) = one(base, "ScaledObject", WORKERS[queue])["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel"
    meta = trigger["metadata"]
    assert "address" not in meta and "hosts" not in meta
    namespace = scaled["metadata"]["namespace"]
    assert meta["addresses"].split(",") == \
        [f"redis-sentinel-{i}.redis-sentinel.{namespace}.svc:26379" for i in range(SENTINELS)]
    assert meta["sentinelMaster"] == MASTER
    # The same list, target and activation as the base's redis trigger.
    for key in ("listName", "listLength", "activationListLength", "databaseIndex"):
        assert meta[key] == before["metadata"][key], key
    assert meta["listName"] == queue
    auth = one(with_redis_ha, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == \
        {("password", SECRET_NAME, "REDIS_PASSWORD"), ("sentinelPassword", SECRET_NAME, "REDIS_PASSWORD")}


def test_the_master_name_agrees_everywhere(with_redis_ha, config, secret):
    names = {_conf_lines(_sentinel_conf(with_redis_ha), "sentinel monitor")[0][2]}
    for name in CLIENTS:
        (container,) = containers(one(with_redis_ha, "Deployment", name))
        names.add(resolved_env(container, config, secret)["IDENT_REDIS_SENTINEL_MASTER"])
    for scaled in kinds(with_redis_ha, "ScaledObject"):
        names |= {t["metadata"]["sentinelMaster"] for t in scaled["spec"]["triggers"] if t["type"] == "redis-sentinel"}
    asked = set()
    for name in ("redis", "redis-sentinel"):
        (container,) = containers(one(with_redis_ha, "StatefulSet", name))
        texts = container["command"] + [" ".join(container[p]["exec"]["command"]) for p in
                                        ("startupProbe", "livenessProbe", "readinessProbe")]
        asked |= set(re.findall(r"get-master-addr-by-name (\S+)", " ".join(texts)))
    assert asked, "neither start script asks the Sentinels for the master"
    names |= asked
    assert names == {MASTER}


# --- secrets --------------------------------------------------------------------------------


def test_every_secret_key_referenced_exists(with_redis_ha):
    template = read_env_file(KUBE / "secrets.env.example")
    used = set()
    for doc in with_redis_ha:
        for container in containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME and ref["key"] in template, env
                    assert not ref.get("optional")
                    used.add(ref["key"])
    for auth in kinds(with_redis_ha, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET_NAME and ref["key"] in template
    assert "REDIS_PASSWORD" in used
    for path in REDIS_HA.iterdir():
        for value in template.values():
            assert value not in path.read_text(), f"{path.name} holds a secret's value"


# --- kubectl's own kustomize, where installed -------------------------------------------------


@needs_kubectl
def test_kubectl_kustomize_builds_the_same_objects(tmp_path, with_redis_ha):
    root = tmp_path / "kubernetes"
    shutil.copytree(KUBE, root, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(root / "secrets.env.example", root / "secrets.env")
    path = root / "kustomization.yaml"
    path.write_text(path.read_text() + "\ncomponents:\n  - components/redis-ha\n")
    done = subprocess.run([KUBECTL, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    built = load_yaml_documents_text(done.stdout)
    assert sorted((d["kind"], _unhashed(d)) for d in built) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in with_redis_ha)
    names = {(d["kind"], d["metadata"]["name"]) for d in built}
    for kind, name in _references(built):
        assert (kind, name) in names or (kind == "PersistentVolumeClaim" and name == "models"), (kind, name)
    for doc in built:
        ours = one(with_redis_ha, doc["kind"], _unhashed(doc))
        if doc["kind"] in ("ScaledObject", "Service", "PodDisruptionBudget"):
            assert doc["spec"] == ours["spec"], doc["metadata"]["name"]
        if pod_spec(doc) is not None:
            for theirs, mine in zip(containers(doc), containers(ours)):
                assert theirs.get("command") == mine.get("command")
                assert [e["name"] for e in theirs.get("env", [])] == [e["name"] for e in mine.get("env", [])]
                assert [e.get("value") for e in theirs.get("env", [])] == [e.get("value") for e in mine.get("env", [])]
