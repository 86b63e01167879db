"""deploy/kubernetes: every manifest valid against its schema, and holding the
promises deploy/kubernetes/README.md makes about it.

The kustomization is built here in Python (resources, generators, namespace,
images, components' JSON patches) from its own files, with secrets.env.example
standing in for the git-ignored secrets.env, so the checks need no kubectl.
Where kubectl is installed, its built-in kustomize builds the same folders too
and the two results are compared (hashed generator names, references to them).

Core kinds are validated strictly with kubernetes-validate; KEDA's kinds against
the openAPIV3Schema of their CRDs in ../shared/schemas/keda, made strict the
way ``kubectl apply`` is (an unknown field is an error, not silently pruned).
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from tasks.settings import Settings, env_name  # noqa: E402
from tests.conftest import REPO_ROOT, shared_dir  # noqa: E402

KUBE = REPO_ROOT / "deploy" / "kubernetes"
COMPONENT = KUBE / "components" / "prometheus-trigger"
MODELS_FETCH = KUBE / "models-fetch"
WORKERS = {"vision": "vision-worker", "audio": "audio-worker"}
METRICS_PORT = 9808
# The oldest Kubernetes minor the README names, and the newest kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
SECRET_NAME = "identification-secrets"
CONFIG_NAME = "identification-config"
CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "CustomResourceDefinition", "ClusterTriggerAuthentication"}


# --- building the kustomization ---------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs:` file: KEY=value lines; blank lines and # comments skipped."""
    env = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=value"
        assert key not in env, f"{path.name}: {key} twice"
        env[key] = value
    return env


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 add, replace and remove: what the components' patches use."""
    document = copy.deepcopy(document)
    for op in operations:
        *parents, last = _pointer(op["path"])
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "add":
            if isinstance(target, list):
                target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                target[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            target[int(last) if isinstance(target, list) else last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        else:
            raise AssertionError(f"the test's builder does not know op {op['op']!r}")
    return document


def _matches(target: dict, doc: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (target.get("kind", doc["kind"]) == doc["kind"]
            and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version)


def build(root: Path, components: tuple[Path, ...] = ()) -> list[dict]:
    """The objects `kustomize build root` makes, generated names without their hash."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = root / resource
        assert path.is_file(), f"{resource}: the test's builder reads files, not folders or URLs"
        docs += load_yaml_documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for env in generator.get("envs", []):
            data.update(read_env_file(root / env))
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                     "data": data})
    for generator in kustomization.get("secretGenerator", []):
        data = {}
        for env in generator.get("envs", []):
            # The real file is git-ignored and holds real passwords: the tests read the template.
            data.update(read_env_file(root / f"{env}.example"))
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]},
                     "type": generator.get("type", "Opaque"),
                     "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    for component in list(kustomization.get("components", [])) + [str(c.relative_to(root)) for c in components]:
        spec = yaml.safe_load((root / component / "kustomization.yaml").read_text())
        assert spec["kind"] == "Component"
        for resource in spec.get("resources", []):  # a component's own objects, before its patches
            docs += load_yaml_documents(root / component / resource)
        for patch in spec.get("patches", []):
            operations = yaml.safe_load(patch["patch"])
            hits = [i for i, doc in enumerate(docs) if _matches(patch["target"], doc)]
            assert hits, f"{component}: patch target {patch['target']} matches nothing"
            for i in hits:
                docs[i] = json_patch(docs[i], operations)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        for container in containers(doc):
            for image in kustomization.get("images", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return docs


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "Pod":
        return doc["spec"]
    return None


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return build(KUBE)


@pytest.fixture(scope="module")
def with_prometheus() -> list[dict]:
    return build(KUBE, components=(COMPONENT,))


@pytest.fixture(scope="module")
def models_fetch() -> list[dict]:
    return build(MODELS_FETCH)


@pytest.fixture(scope="module")
def config(base) -> dict[str, str]:
    return one(base, "ConfigMap", CONFIG_NAME)["data"]


@pytest.fixture(scope="module")
def secret(base) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(base, "Secret", SECRET_NAME)["data"].items()}


@pytest.fixture(scope="module")
def settings(config) -> Settings:
    return Settings.from_env(config)


def worker(docs: list[dict], queue: str) -> dict:
    return one(docs, "Deployment", WORKERS[queue])


def worker_container(docs: list[dict], queue: str) -> dict:
    (container,) = worker(docs, queue)["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- the files ----------------------------------------------------------------------


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in KUBE.rglob("kustomization.yaml"))


def test_every_manifest_parses():
    files = sorted(KUBE.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = load_yaml_documents(path)
        assert docs, f"{path} is empty"
        if path.name == "kustomizeconfig.yaml":  # kustomize's transformer configuration, no object
            assert set(docs[0]) == {"nameReference"}
            continue
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] not in ("Kustomization", "Component"):
                assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without a name"
    for env in ("config.env", "secrets.env.example"):
        assert read_env_file(KUBE / env)


@pytest.mark.parametrize("root", kustomization_dirs(), ids=lambda p: str(p.relative_to(KUBE)) or ".")
def test_each_kustomization_lists_every_file_in_its_folder(root):
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", [])) | set(kustomization.get("configurations", []))
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        listed |= set(generator.get("envs", [])) | set(generator.get("files", []))
    # secrets.env is git-ignored and may or may not be here: its template stands for it.
    local = {("secrets.env" if p.name == "secrets.env.example" else p.name) for p in root.iterdir()
             if p.is_file() and p.name not in ("kustomization.yaml", "README.md", ".gitignore", "secrets.env")}
    assert local - listed == set(), "files the kustomization does not use"
    missing = {name for name in listed if not (root / name).is_file() and not (root / f"{name}.example").is_file()}
    assert missing == set(), "the kustomization lists files that are not there"


def test_every_folder_of_manifests_is_a_kustomization_or_component():
    for folder in {p.parent for p in KUBE.rglob("*.yaml")}:
        assert (folder / "kustomization.yaml").is_file(), folder
    text = (KUBE / "kustomization.yaml").read_text()
    # The optional component is named (commented out) where it is enabled.
    assert "components/prometheus-trigger" in text


# --- schemas --------------------------------------------------------------------------


def assert_core_kinds_valid(docs: list[dict], version: str) -> set[str]:
    """Every non-KEDA object valid against Kubernetes ``version``'s schemas, strictly; the kinds checked."""
    checked = set()
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        problem = None
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problem = f"{doc['kind']}/{doc['metadata']['name']} at {'/'.join(map(str, exc.absolute_path))}: {exc.message}"
        assert problem is None, problem
        checked.add(doc["kind"])
    return checked


def assert_keda_kinds_valid(docs: list[dict], keda_schemas: dict) -> None:
    """The ScaledObjects and the TriggerAuthentication among ``docs``, valid against KEDA's CRDs."""
    keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        schema = keda_schemas.get((doc["apiVersion"], doc["kind"]))
        assert schema is not None, f"no CRD for {doc['apiVersion']} {doc['kind']}"
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{doc['kind']}/{doc['metadata']['name']} "
                                     f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_strictly(version, base, models_fetch):
    checked = assert_core_kinds_valid(base + models_fetch, version)
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet",
            "PersistentVolumeClaim", "Job"} <= checked


def _strict(schema):
    """An unknown field is an error, as under `kubectl apply`'s strict field validation."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def keda_schemas() -> dict[tuple[str, str], dict]:
    folder = shared_dir() / "schemas" / "keda"
    if not folder.is_dir():
        pytest.fail(f"KEDA's CRDs are not at {folder}: set IDENT_SHARED_DIR")
    schemas = {}
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api_version, crd["spec"]["names"]["kind"])] = _strict(version["schema"]["openAPIV3Schema"])
    assert ("keda.sh/v1alpha1", "ScaledObject") in schemas and ("keda.sh/v1alpha1", "TriggerAuthentication") in schemas
    return schemas


@pytest.mark.parametrize("build_name", ["base", "with_prometheus"])
def test_keda_kinds_validate_against_their_crds(build_name, keda_schemas, request):
    assert_keda_kinds_valid(request.getfixturevalue(build_name), keda_schemas)


def test_the_strict_keda_schema_refuses_a_misspelt_field(keda_schemas, base):
    scaled = copy.deepcopy(one(base, "ScaledObject", "vision-worker"))
    scaled["spec"]["minReplicas"] = 1  # HPA's name, not KEDA's minReplicaCount
    assert list(jsonschema.Draft7Validator(keda_schemas[("keda.sh/v1alpha1", "ScaledObject")]).iter_errors(scaled))


# --- kubectl's own kustomize, where installed -------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kubectl_build(tmp_path: Path, *, secrets: bool = True, component: bool = False,
                  sub: str = "") -> subprocess.CompletedProcess:
    copy_root = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy_root, ignore=shutil.ignore_patterns("secrets.env"))
    if secrets:
        shutil.copy(copy_root / "secrets.env.example", copy_root / "secrets.env")
    if component:
        path = copy_root / "kustomization.yaml"
        path.write_text(path.read_text() + "\ncomponents:\n  - components/prometheus-trigger\n")
    return subprocess.run([KUBECTL, "kustomize", str(copy_root / sub)], capture_output=True, text=True,
                          timeout=60)


def _unhashed(doc: dict) -> str:
    name = doc["metadata"]["name"]
    if doc["kind"] in ("ConfigMap", "Secret"):
        name = re.sub(r"-[a-z0-9]{10}$", "", name)
    return name


def _references(docs: list[dict]):
    """(kind, name) of every ConfigMap, Secret and PVC a pod or KEDA object names."""
    for doc in docs:
        for container in containers(doc):
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        yield kind, source[key]["name"]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if key in ref:
                        yield kind, ref[key]["name"]
        spec = pod_spec(doc)
        for volume in (spec or {}).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"].get("secretTargetRef", []):
                yield "Secret", ref["name"]


@needs_kubectl
@pytest.mark.parametrize("component", [False, True], ids=["base", "with-prometheus"])
def test_kubectl_kustomize_builds_the_same_objects(tmp_path, component, base, with_prometheus):
    done = kubectl_build(tmp_path, component=component)
    assert done.returncode == 0, done.stderr
    built = load_yaml_documents_text(done.stdout)
    ours = with_prometheus if component else base
    assert sorted((d["kind"], _unhashed(d)) for d in built) == sorted((d["kind"], d["metadata"]["name"]) for d in ours)
    names = {(d["kind"], d["metadata"]["name"]) for d in built}
    references = set(_references(built))
    # The generated names carry a hash, and every reference follows it: the
    # TriggerAuthentication's only through kustomizeconfig.yaml.
    assert ("Secret", SECRET_NAME) not in names
    for kind, name in references:
        assert (kind, name) in names or (kind == "PersistentVolumeClaim" and name == "models"), (kind, name)
    auth = one(built, "TriggerAuthentication", "redis-auth")
    assert re.fullmatch(SECRET_NAME + r"-[a-z0-9]{10}", auth["spec"]["secretTargetRef"][0]["name"])
    for doc in built:
        ours_doc = one(ours, doc["kind"], _unhashed(doc))
        if doc["kind"] in ("ScaledObject", "Deployment", "StatefulSet"):
            assert doc["spec"].get("triggers") == ours_doc["spec"].get("triggers")
            assert [c["image"] for c in containers(doc)] == [c["image"] for c in containers(ours_doc)]


def load_yaml_documents_text(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@needs_kubectl
def test_kubectl_kustomize_builds_models_fetch(tmp_path, models_fetch):
    done = kubectl_build(tmp_path, sub="models-fetch")
    assert done.returncode == 0, done.stderr
    built = load_yaml_documents_text(done.stdout)
    assert [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in built] == \
        [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in models_fetch]


@needs_kubectl
def test_no_build_without_secrets_env(tmp_path):
    done = kubectl_build(tmp_path, secrets=False)
    assert done.returncode != 0 and "secrets.env" in done.stderr


# --- secrets ----------------------------------------------------------------------------


def test_secret_template_holds_placeholders_only(secret):
    assert set(secret) == {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "GATEWAY_API_KEYS"}
    for key in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "GATEWAY_API_KEYS"):
        assert secret[key].startswith("change-me"), key
    # They go into URLs unescaped, and Flower splits its basic-auth option on commas.
    for key, value in secret.items():
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", value), key


def test_every_secret_key_used_exists_and_every_key_is_used(base, secret):
    used = set()
    for doc in base:
        for container in containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME and ref["key"] in secret, env
                    assert not ref.get("optional"), f"{env['name']}: a missing credential must stop the pod"
                    used.add(ref["key"])
            assert not any("secretRef" in source for source in container.get("envFrom", [])), \
                "a container takes the whole Secret: pass it only the keys it needs"
    for ref in one(base, "TriggerAuthentication", "redis-auth")["spec"]["secretTargetRef"]:
        assert ref["name"] == SECRET_NAME and ref["key"] in secret
        used.add(ref["key"])
    assert used == set(secret)


def _ignored_by(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rules: the last matching pattern wins; a folder's match covers what is in it."""
    def regex(pattern: str) -> re.Pattern:
        out = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in patterns:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = regex(line.lstrip("!"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_rules_as_docker_reads_them():
    assert _ignored_by([".env"], ".env") and not _ignored_by([".env"], "deploy/kubernetes/.env")
    assert _ignored_by(["**/*.pyc"], "a/b/c.pyc") and _ignored_by(["deploy"], "deploy/kubernetes/secrets.env")
    assert not _ignored_by(["deploy", "!deploy/kubernetes/secrets.env"], "deploy/kubernetes/secrets.env")


def test_secrets_env_is_neither_committed_nor_built_into_the_image():
    assert "/secrets.env" in (KUBE / ".gitignore").read_text().split()
    git = shutil.which("git")
    if git and (REPO_ROOT / ".git").exists():
        done = subprocess.run([git, "check-ignore", "-q", "deploy/kubernetes/secrets.env"], cwd=REPO_ROOT)
        assert done.returncode == 0, "git would commit deploy/kubernetes/secrets.env"
    # The Dockerfile copies the whole build context (`COPY . /src`): a layer
    # would keep the passwords even though /src is removed later.
    patterns = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert _ignored_by(patterns, "deploy/kubernetes/secrets.env"), \
        "add deploy/kubernetes/secrets.env (or deploy) to .dockerignore"


def test_configmap_holds_no_secret(config, secret):
    for key, value in config.items():
        assert not re.search(r"PASSWORD|SECRET|TOKEN|AUTH|CREDENTIAL", key), key
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{key} holds a URL with credentials"
        for secret_value in secret.values():
            assert secret_value not in value, key
    # Both URLs hold a password: assembled in the pods from the Secret instead.
    assert "IDENT_REDIS_URL" not in config and "IDENT_GALLERY_URL" not in config
    assert "IDENT_FLOWER_AUTH" not in config


def test_no_credential_is_written_into_a_manifest(secret):
    for path in KUBE.rglob("*"):
        if path.is_file() and path.name != "secrets.env.example" and path.name != "secrets.env":
            text = path.read_text()
            for key in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "GATEWAY_API_KEYS"):
                assert secret[key] not in text, f"{path.relative_to(KUBE)} holds {key}'s value"


# --- environment ------------------------------------------------------------------------


def test_every_ident_variable_is_a_setting(base, models_fetch, config):
    """IDENT_METRICS_PORT included: the probes and the scrape depend on it being read."""
    known = {env_name(f.name) for f in fields(Settings)}
    used = {key for key in config if key.startswith("IDENT_")}
    for doc in base + models_fetch:
        for container in containers(doc):
            used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("IDENT_")}
    assert "IDENT_METRICS_PORT" in used
    assert used - known == set(), "not in tasks/settings.py"


def test_config_is_valid_settings_without_warnings(config, settings):
    assert settings.device == "cuda"  # strict, like compose.gpu.yml
    assert settings.gpu_ids == (0,)
    assert str(settings.models_dir) == "/models"
    assert settings.cpu_threads > 0, "0 would count every core of the node"
    assert settings.warnings() == []
    assert settings.metrics_port == METRICS_PORT
    assert config["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert int(config["IDENT_METRICS_PORT"]) == METRICS_PORT


def test_config_keeps_the_settings_defaults_but_where_chosen(config):
    defaults, chosen = Settings(), {"device", "models_dir", "cpu_threads", "metrics_port"}
    by_name = {env_name(f.name): f.name for f in fields(Settings)}
    checked = 0
    for key, value in config.items():
        if key in by_name and by_name[key] not in chosen:
            parsed = Settings.from_env({key: value})
            assert getattr(parsed, by_name[key]) == getattr(defaults, by_name[key]), key
            checked += 1
    assert checked >= 15


def _defined_before(container: dict, config: dict[str, str]) -> list[str]:
    """$(VAR) references that Kubernetes would leave unexpanded: VAR not defined earlier."""
    defined = set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            defined |= set(config)
    problems = []
    for env in container.get("env", []):
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
            if name not in defined:
                problems.append(f"{env['name']} uses $({name}) before it is defined")
        defined.add(env["name"])
    for arg in container.get("command", []) + container.get("args", []):
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            if name not in defined:
                problems.append(f"argument {arg!r} uses undefined $({name})")
    return problems


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables[m.group(1)], value)


def resolved_env(container: dict, config: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    variables = dict(config) if container.get("envFrom") else {}
    for env in container.get("env", []):
        if "value" in env:
            variables[env["name"]] = expand(env["value"], variables)
        else:
            variables[env["name"]] = secret[env["valueFrom"]["secretKeyRef"]["key"]]
    return variables


def test_variable_references_resolve(base, config):
    for doc in base:
        for container in containers(doc):
            assert _defined_before(container, config) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("queue", WORKERS)
def test_worker_urls_come_from_the_secret_and_name_the_services(queue, base, config, secret):
    container = worker_container(base, queue)
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == [CONFIG_NAME]
    env = env_of(container)
    assert env["IDENT_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    assert env["IDENT_GALLERY_URL"]["value"] == "postgresql://ident:$(POSTGRES_PASSWORD)@postgres:5432/ident"
    variables = resolved_env(container, config, secret)
    settings = Settings.from_env({k: v for k, v in variables.items() if k.startswith("IDENT_")})
    assert settings.redis_url == f"redis://:{secret['REDIS_PASSWORD']}@redis:6379/0"
    assert settings.gallery_url == f"postgresql://ident:{secret['POSTGRES_PASSWORD']}@postgres:5432/ident"
    redis_port = {p["port"] for p in one(base, "Service", "redis")["spec"]["ports"]}
    postgres_port = {p["port"] for p in one(base, "Service", "postgres")["spec"]["ports"]}
    assert redis_port == {6379} and postgres_port == {5432}


# --- workers ----------------------------------------------------------------------------


@pytest.mark.parametrize("queue", WORKERS)
def test_worker_command_consumes_its_queue(queue, base):
    container = worker_container(base, queue)
    command = container.get("command", []) + container["args"]
    assert command == ["celery", "-A", f"workers.{queue}", "worker", "-Q", queue, "-c", "1", "-E", "--loglevel=INFO"]
    assert container["image"] == "identification:latest"


@pytest.mark.parametrize("queue", WORKERS)
def test_worker_takes_exactly_one_gpu(queue, base):
    resources = worker_container(base, queue)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_only_the_workers_take_gpus(base, models_fetch):
    for doc in base + models_fetch:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in WORKERS.values():
            continue
        for container in containers(doc):
            resources = container.get("resources", {})
            assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources.get("requests", {})}, \
                f"{doc['kind']}/{doc['metadata']['name']}"


def _port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


@pytest.mark.parametrize("queue", WORKERS)
def test_worker_probes_use_the_metrics_port(queue, base, config, settings):
    deployment = worker(base, queue)
    container = worker_container(base, queue)
    (metrics,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == int(config["IDENT_METRICS_PORT"]) == METRICS_PORT
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert _port(container, get["port"]) == METRICS_PORT, probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    # Liveness counts only once the start-up probe passed; its budget outlasts a
    # pool process's model loading, which the main process may wait for.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > settings.process_init_timeout
    liveness = container["livenessProbe"]
    assert liveness["failureThreshold"] >= 3 and liveness["timeoutSeconds"] < liveness["periodSeconds"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("queue", WORKERS)
def test_scale_in_lets_the_running_job_finish(queue, base, settings):
    spec = worker(base, queue)["spec"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.task_time_limit
    # A warm shutdown also runs the job already in the pool process's pipe
    # (workers/celery_internals.py; tests/integration/test_reliability.py), so a
    # pod may hold IDENT_PREFETCH_MULTIPLIER jobs of up to IDENT_TASK_TIME_LIMIT each.
    assert grace >= settings.prefetch_multiplier * settings.task_time_limit + 30, \
        "SIGKILL would cut a job the warm shutdown was still running"
    # The HPA owns the replica count; a value here would reset it on every apply.
    assert "replicas" not in spec
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 or rolling["maxSurge"] == 0


@pytest.mark.parametrize("queue", WORKERS)
def test_models_are_mounted_read_only(queue, base, models_fetch, settings):
    pod = worker(base, queue)["spec"]["template"]["spec"]
    container = worker_container(base, queue)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(settings.models_dir)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = one(base, "PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    job = one(models_fetch, "Job", "models-fetch")
    (job_volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim["claimName"]
    (fetch,) = containers(job)
    assert env_of(fetch)["IDENT_MODELS_DIR"]["value"] == str(settings.models_dir)
    assert "ident models fetch --all" in " ".join(fetch["command"])
    assert job["metadata"]["namespace"] == pvc["metadata"]["namespace"]


def test_every_pod_runs_non_root_under_the_restricted_profile(base, models_fetch):
    namespace = one(base, "Namespace", "identification")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = 0
    for doc in base + models_fetch:
        spec = pod_spec(doc)
        if spec is None:
            continue
        pods += 1
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, doc["metadata"]["name"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, "hostPath is refused by the restricted profile"
        for container in containers(doc):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged")
            assert all("hostPort" not in p for p in container.get("ports", []))
    assert pods == 7


# --- Redis, PostgreSQL, Flower -----------------------------------------------------------


def test_nothing_is_exposed_outside_the_cluster(base):
    assert kinds(base, "Ingress") == [] and kinds(base, "Route") == []
    services = kinds(base, "Service")
    assert {s["metadata"]["name"] for s in services} == {"redis", "postgres", "flower", "gateway"}
    for service in services:
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not spec.get("externalIPs") and not spec.get("loadBalancerIP")
        assert all("nodePort" not in p for p in spec["ports"])


def _selects(service: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_redis_is_private_persistent_and_password_protected(base):
    service, redis = one(base, "Service", "redis"), one(base, "StatefulSet", "redis")
    assert _selects(service, redis) and redis["spec"]["replicas"] == 1
    (container,) = containers(redis)
    command = " ".join(container["command"])
    assert "--appendonly yes" in command and '--requirepass "$REDIS_PASSWORD"' in command
    env = env_of(container)
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "redis-cli ping" in " ".join(container[probe]["exec"]["command"])
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert "--dir /data" in command


def test_postgres_is_pgvector_private_persistent_and_probed(base):
    service, postgres = one(base, "Service", "postgres"), one(base, "StatefulSet", "postgres")
    assert _selects(service, postgres) and postgres["spec"]["replicas"] == 1
    (container,) = containers(postgres)
    assert container["image"] == "pgvector/pgvector:0.8.0-pg17"
    env = env_of(container)
    assert env["POSTGRES_USER"]["value"] == "ident" == env["POSTGRES_DB"]["value"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "POSTGRES_PASSWORD"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"][0] == "pg_isready", probe
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == "/var/lib/postgresql/data"
    assert env["PGDATA"]["value"].startswith(mount["mountPath"] + "/"), "initdb refuses a volume root (lost+found)"


def test_flower_always_has_basic_auth(base, config, secret):
    flower = one(base, "Deployment", "flower")
    assert _selects(one(base, "Service", "flower"), flower)
    (container,) = containers(flower)
    assert container["command"] + container["args"][:3] == ["celery", "-A", "workers.vision", "flower"]
    assert not any("basic-auth" in a or "basic_auth" in a for a in container["args"]), \
        "credentials on the command line; they come from FLOWER_BASIC_AUTH"
    env = env_of(container)
    assert env["FLOWER_BASIC_AUTH"]["value"] == "$(BASIC_AUTH_USER):$(BASIC_AUTH_PASSWORD)"
    assert env["BASIC_AUTH_USER"]["valueFrom"]["secretKeyRef"]["key"] == "FLOWER_USER"
    assert env["BASIC_AUTH_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "FLOWER_PASSWORD"
    variables = resolved_env(container, config, secret)
    assert variables["FLOWER_BASIC_AUTH"] == f"{secret['FLOWER_USER']}:{secret['FLOWER_PASSWORD']}"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_flower_reads_its_basic_auth_from_the_environment():
    """FLOWER_BASIC_AUTH is an option Flower applies from the environment; other FLOWER_* names are ignored."""
    command = pytest.importorskip("flower.command")
    assert command.is_flower_envvar("FLOWER_BASIC_AUTH")
    assert not command.is_flower_envvar("BASIC_AUTH_USER")


# --- KEDA -------------------------------------------------------------------------------


def _triggers(scaled: dict, kind: str) -> list[dict]:
    return [t for t in scaled["spec"]["triggers"] if t["type"] == kind]


@pytest.mark.parametrize("queue", WORKERS)
def test_scaledobject_scales_its_worker_on_its_queue(queue, base, secret):
    scaled = one(base, "ScaledObject", WORKERS[queue])
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target["name"] == WORKERS[queue]
    assert worker_container(base, queue)["args"][worker_container(base, queue)["args"].index("-Q") + 1] == queue
    (redis,) = _triggers(scaled, "redis")
    meta = redis["metadata"]
    assert meta["listName"] == queue
    assert int(meta["listLength"]) >= 1
    # At minReplicaCount 0 a job must wake a worker: anything above 0 would strand it.
    assert meta["activationListLength"] == "0"
    # The scaler runs in KEDA's namespace: the Service's full name, in this namespace.
    namespace = scaled["metadata"]["namespace"]
    assert meta["address"] == f"redis.{namespace}.svc:6379"
    assert meta.get("databaseIndex", "0") == "0"  # the /0 of IDENT_REDIS_URL
    auth = one(base, "TriggerAuthentication", redis["authenticationRef"]["name"])
    assert auth["metadata"]["namespace"] == namespace
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == \
        {("password", SECRET_NAME, "REDIS_PASSWORD")}
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]


def test_one_scaledobject_per_worker(base):
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in kinds(base, "ScaledObject")) == sorted(WORKERS.values())


@pytest.mark.parametrize("queue", WORKERS)
def test_scale_down_waits_out_every_job_already_taken(queue, base, settings):
    """The list does not hold jobs a worker has taken: scale-in must wait until those are done."""
    spec = one(base, "ScaledObject", WORKERS[queue])["spec"]
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    # A job held behind another waits for it: each may run IDENT_TASK_TIME_LIMIT.
    assert scale_down["stabilizationWindowSeconds"] > settings.prefetch_multiplier * settings.task_time_limit
    assert scale_down["policies"] and all(p["type"] == "Pods" and p["value"] == 1 for p in scale_down["policies"])
    assert spec["cooldownPeriod"] >= scale_down["stabilizationWindowSeconds"]
    assert spec["advanced"].get("restoreToOriginalReplicaCount") is not True


@pytest.mark.parametrize("queue", WORKERS)
def test_prometheus_component_keeps_busy_workers(queue, with_prometheus, base):
    scaled = one(with_prometheus, "ScaledObject", WORKERS[queue])
    assert _triggers(scaled, "redis") == _triggers(one(base, "ScaledObject", WORKERS[queue]), "redis")
    (prometheus,) = _triggers(scaled, "prometheus")
    meta = prometheus["metadata"]
    namespace = scaled["metadata"]["namespace"]
    assert f'queue="{queue}"' in meta["query"] and f'namespace="{namespace}"' in meta["query"]
    assert "ident_jobs_in_progress" in meta["query"]
    assert re.fullmatch(r"https?://[a-z0-9.-]+\.svc(\.cluster\.local)?:\d+", meta["serverAddress"])
    # One busy pod per replica: the HPA keeps at least as many pods as hold a job.
    assert meta["threshold"] == "1"
    assert prometheus.get("metricType", "AverageValue") == "AverageValue"


# --- the HTTP gateway ---------------------------------------------------------------------


def test_gateway_serves_with_keys_from_the_secret_and_no_model(base, config, secret):
    """docs/gateway.md: `ident serve` on 8080, ready on /healthz, keys from the Secret, no GPU, no models volume."""
    gateway = one(base, "Deployment", "gateway")
    service = one(base, "Service", "gateway")
    assert _selects(service, gateway)
    assert service["spec"]["ports"][0]["port"] == 8080
    (container,) = containers(gateway)
    assert container["command"] + container["args"] == ["ident", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080}
    env = {e["name"]: e for e in container["env"]}
    assert env["IDENT_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "GATEWAY_API_KEYS"
    variables = resolved_env(container, config, secret)
    assert variables["IDENT_API_KEYS"] == secret["GATEWAY_API_KEYS"]
    # The Redis URL is the workers' own.
    worker = resolved_env(containers(one(base, "Deployment", "vision-worker"))[0], config, secret)
    assert variables["IDENT_REDIS_URL"] == worker["IDENT_REDIS_URL"]
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert all(mount["mountPath"] != "/models" for mount in container.get("volumeMounts", []))
    settings = Settings.from_env({k: v for k, v in variables.items() if k.startswith("IDENT_")})
    assert settings.api_keys == (secret["GATEWAY_API_KEYS"],) and settings.gateway_wait_s == 30
