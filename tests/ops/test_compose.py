"""The Compose files: valid against the Compose Specification's own JSON Schema,
and holding the promises docs/gpu.md makes about them.

Compose substitutes ``${VAR:-default}`` before it validates, so the tests do the
same, with the values of .env.example; a required ``${VAR:?msg}`` that nothing
sets fails the test as it would fail ``docker compose up``.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

from tasks.settings import Settings, env_name  # noqa: E402
from tests.conftest import REPO_ROOT, shared_dir  # noqa: E402

COMPOSE_FILES = sorted(
    p
    for pattern in ("compose*.yml", "compose*.yaml", "docker-compose*.yml", "docker-compose*.yaml")
    for p in REPO_ROOT.glob(pattern)
)
WORKERS = ("vision-worker", "audio-worker")


class UnsetVariable(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


_NAMED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def interpolate(value, env: dict[str, str], used: set[str] | None = None):
    """Compose's variable substitution over a loaded YAML tree (values, not keys), defaults nested as Compose nests them."""
    used = set() if used is None else used
    if isinstance(value, dict):
        return {k: interpolate(v, env, used) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, used) for v in value]
    if not isinstance(value, str):
        return value
    out, i = [], 0
    while i < len(value):
        if value[i] != "$" or i + 1 == len(value):
            out.append(value[i])
            i += 1
        elif value[i + 1] == "$":
            out.append("$")
            i += 2
        elif value[i + 1] == "{":
            end = _closing_brace(value, i + 2)
            out.append(_resolve(value[i + 2:end], env, used))
            i = end + 1
        else:
            named = _NAMED.match(value, i + 1)
            if named is None:
                out.append("$")
                i += 1
                continue
            used.add(named.group(0))
            out.append(env.get(named.group(0), ""))
            i = named.end()
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    for index in range(start, len(text)):
        if text.startswith("${", index):
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unclosed ${{ in {text!r}")


def _resolve(braced: str, env: dict[str, str], used: set[str]) -> str:
    parsed = _BRACED.match(braced)
    if parsed is None:
        raise ValueError(f"invalid interpolation ${{{braced}}}")
    name, op, arg = parsed.group("name"), parsed.group("op"), parsed.group("arg")
    used.add(name)
    current = env.get(name)
    empty = current is None or (current == "" and op is not None and op.startswith(":"))
    if op in (":-", "-"):
        return interpolate(arg, env, used) if empty else current
    if op in (":?", "?"):
        if empty:
            raise UnsetVariable(f"{name}: {arg}")
        return current
    if op in (":+", "+"):
        return "" if empty else interpolate(arg, env, used)
    return current or ""


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def schema() -> dict:
    import json

    path = shared_dir() / "schemas" / "compose-spec.json"
    if not path.is_file():
        pytest.fail(f"the Compose Specification schema is not at {path}: set IDENT_SHARED_DIR")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(REPO_ROOT / ".env.example")


def load(path: Path, env: dict[str, str], used: set[str] | None = None) -> dict:
    return interpolate(yaml.safe_load(path.read_text()), env, used)


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_gpu_and_cpu_compose_files():
    names = {p.name for p in COMPOSE_FILES}
    assert {"compose.gpu.yml", "compose.cpu.yml"} <= names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_valid_against_the_compose_specification(path, schema, example_env):
    document = load(path, example_env)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_env_example_sets_every_variable_the_file_uses(path, example_env):
    used: set[str] = set()
    load(path, example_env, used)
    assert used - set(example_env) == set(), "add these to .env.example"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_required_secrets_refuse_to_default(path, example_env):
    for secret in ("IDENT_REDIS_PASSWORD", "IDENT_POSTGRES_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD",
                   "IDENT_MODELS_HOST_DIR"):
        env = {k: v for k, v in example_env.items() if k != secret}
        with pytest.raises(UnsetVariable, match=secret):
            load(path, env)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_redis_is_private_persistent_and_health_checked(path, example_env):
    redis = load(path, example_env)["services"]["redis"]
    assert "ports" not in redis and "expose" not in redis
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command and "--requirepass" in command
    assert redis["environment"]["REDIS_PASSWORD"] == example_env["IDENT_REDIS_PASSWORD"]
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli -a" in test and "ping" in test
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_gallery_database_is_pgvector_private_persistent_and_health_checked(path, example_env):
    postgres = load(path, example_env)["services"]["postgres"]
    image, _, tag = postgres["image"].partition(":")
    assert image == "pgvector/pgvector" and tag.startswith("0.8") and "-pg" in tag
    assert "ports" not in postgres and "expose" not in postgres
    assert postgres["environment"]["POSTGRES_PASSWORD"] == example_env["IDENT_POSTGRES_PASSWORD"]
    assert postgres["environment"]["POSTGRES_USER"] == "ident" == postgres["environment"]["POSTGRES_DB"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    url = load(path, example_env)["services"]["vision-worker"]["environment"]["IDENT_GALLERY_URL"]
    assert url == f"postgresql://ident:{example_env['IDENT_POSTGRES_PASSWORD']}@postgres:5432/ident"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_flower_always_has_basic_auth(path, example_env):
    flower = raw(path)["services"]["flower"]
    assert flower["command"].startswith("celery -A workers.vision flower")
    assert re.search(r"--basic-auth=\$\{FLOWER_USER:\?[^}]*\}:\$\{FLOWER_PASSWORD:\?[^}]*\}", flower["command"])
    resolved = load(path, example_env)["services"]["flower"]
    user, password = example_env["FLOWER_USER"], example_env["FLOWER_PASSWORD"]
    assert f"--basic-auth={user}:{password}" in resolved["command"]
    assert any(str(p).endswith(":5555") for p in resolved["ports"])


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_worker_commands_and_wiring(path, example_env):
    services = raw(path)["services"]
    for kind in ("vision", "audio"):
        worker = services[f"{kind}-worker"]
        concurrency = f"IDENT_{kind.upper()}_CONCURRENCY"
        # On a GPU, one pool process per worker: both workers then fit a 2 GiB card (docs/gpu.md).
        default = 1 if path.name == "compose.gpu.yml" else 2
        assert (
            worker["command"]
            == f"celery -A workers.{kind} worker -Q {kind} -c ${{{concurrency}:-{default}}} -E --loglevel=INFO"
        )
        assert worker["depends_on"] == {"redis": {"condition": "service_healthy"},
                                        "postgres": {"condition": "service_healthy"}}
        env = worker["environment"]
        assert env["IDENT_REDIS_URL"] == "${IDENT_REDIS_URL:-redis://:${IDENT_REDIS_PASSWORD}@redis:6379/0}"
        assert env["IDENT_GALLERY_URL"] == "postgresql://ident:${IDENT_POSTGRES_PASSWORD}@postgres:5432/ident"
        assert env["IDENT_MODELS_DIR"] == "/models"
        assert any(str(v).endswith(":/models:ro") for v in worker["volumes"])
        assert "ports" not in worker


def test_gpu_workers_reserve_pinned_nvidia_gpus(example_env):
    services = load(REPO_ROOT / "compose.gpu.yml", example_env)["services"]
    workers = {name: s for name, s in services.items() if "worker" in name}
    assert set(WORKERS) <= set(workers)
    pinned = {}
    for name, service in workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        (nvidia,) = [d for d in devices if d.get("driver") == "nvidia"]
        assert "gpu" in nvidia["capabilities"]
        assert "count" not in nvidia and len(nvidia["device_ids"]) == 1, f"{name} must pin one GPU"
        pinned[name] = nvidia["device_ids"][0]
        # Reserved GPUs are renumbered from 0 inside the container.
        assert service["environment"]["IDENT_GPU_IDS"] == "0"
        assert service["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert pinned["vision-worker"] == example_env["IDENT_VISION_GPU"]
    assert pinned["vision-worker-gpu1"] == example_env["IDENT_VISION_GPU1"] != pinned["vision-worker"]
    assert services["vision-worker-gpu1"]["profiles"] == ["multi-gpu"]
    assert "deploy" not in services["flower"] and "deploy" not in services["redis"]


def test_cpu_variant_has_no_gpu_and_says_so(example_env):
    services = load(REPO_ROOT / "compose.cpu.yml", example_env)["services"]
    for name, service in services.items():
        assert "gpus" not in service and "devices" not in service
        assert "devices" not in ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {})
    for name in WORKERS:
        assert services[name]["environment"]["IDENT_DEVICE"] == "cpu"
    gpu = load(REPO_ROOT / "compose.gpu.yml", example_env)["services"]
    assert set(services) == {name for name, s in gpu.items() if not s.get("profiles")}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_defaults_match_the_settings_defaults(path):
    """A `${IDENT_X:-d}` default that drifted from tasks/settings.py would
    silently change a deployment's behaviour."""
    defaults = Settings()
    text = path.read_text()
    checked = 0
    for f in fields(Settings):
        for match in re.finditer(r"\$\{" + env_name(f.name) + r":-([^}]*)\}", text):
            if f.name == "device":
                continue  # compose.gpu.yml's `cuda` is a deliberate choice, see the comment there
            if "${" in match.group(1):
                continue  # a default built from other variables, such as IDENT_REDIS_URL's
            parsed = Settings.from_env({env_name(f.name): match.group(1)})
            assert getattr(parsed, f.name) == getattr(defaults, f.name), f"{env_name(f.name)} default"
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_ident_variable_passed_to_a_container_is_a_setting(path, example_env):
    known = {env_name(f.name) for f in fields(Settings)}
    for name, service in load(path, example_env)["services"].items():
        environment = service.get("environment") or {}
        passed = {k for k in environment if k.startswith("IDENT_")}
        assert passed <= known, f"{name}: {sorted(passed - known)} are not in tasks/settings.py"


def test_env_example_settings_are_the_defaults(example_env):
    defaults = Settings()
    settings_vars = {env_name(f.name): f.name for f in fields(Settings)}
    for key, value in example_env.items():
        if key in settings_vars and key != "IDENT_DEVICE":
            parsed = Settings.from_env({key: value})
            assert getattr(parsed, settings_vars[key]) == getattr(defaults, settings_vars[key]), key


def test_dockerfile_runs_as_non_root_and_mounts_models():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    # The line's pinned onnxruntime-gpu and NVIDIA libraries, under that line's constraints.
    assert re.search(r"^ARG CUDA_LINE=cuda13$", text, re.M)
    assert 'python -m models.cuda_builds line "${CUDA_LINE}" --json' in text
    assert 'pip install -c "/src/${constraints}" "/src[worker]" -r /tmp/packages.txt' in text
    assert ".onnx" not in "".join(l for l in text.splitlines() if l.startswith(("COPY", "ADD")))
    assert "*.onnx" in (REPO_ROOT / ".dockerignore").read_text()


def test_interpolation_rules():
    env = {"A": "x", "EMPTY": ""}
    assert interpolate("${A:-d} ${B:-d} ${EMPTY:-d} ${EMPTY-d} $$A $A ${A:+set}", env) == "x d d  $A x set"
    assert interpolate("${B:-p${A}q} ${A:-p${B}q} ${B:-${EMPTY:-deep}}", env) == "pxq x deep"
    with pytest.raises(UnsetVariable):
        interpolate("${EMPTY:?needed}", env)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_gateway_runs_apart_with_keys_from_the_env_file(path, example_env):
    """The HTTP gateway (docs/gateway.md): same image, `ident serve`, no model, never started without keys."""
    services = load(path, example_env)["services"]
    gateway, flower = services["gateway"], services["flower"]
    assert gateway["image"] == services["vision-worker"]["image"]
    assert gateway["command"] == "ident serve --host 0.0.0.0 --port 8080"
    assert gateway["environment"]["IDENT_API_KEYS"] == example_env["GATEWAY_API_KEYS"]
    # It reaches Redis exactly as the rest of the fleet does.
    assert {k: v for k, v in gateway["environment"].items() if "REDIS" in k} == \
        {k: v for k, v in flower["environment"].items() if "REDIS" in k}
    assert gateway["ports"] == [f"{example_env['GATEWAY_BIND']}:{example_env['GATEWAY_PORT']}:8080"]
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert "volumes" not in gateway and "deploy" not in gateway
    env = {k: v for k, v in example_env.items() if k != "GATEWAY_API_KEYS"}
    with pytest.raises(UnsetVariable, match="GATEWAY_API_KEYS"):
        load(path, env)
