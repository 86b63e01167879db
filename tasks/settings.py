"""Every ``IDENT_*`` environment variable, read in one place.

Producers and workers share this object, so it imports nothing but the standard
library. The README's configuration table documents each field; the defaults
are explained here where the reason is not obvious.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import Field, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Callable, Mapping, get_type_hints
from urllib.parse import urlsplit

from tasks.errors import ConfigurationError
from tasks.redis_urls import is_sentinel_url, parse_sentinel_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The schemes that work as both broker and result backend URL: Celery takes a
# Unix socket only as redis+socket://, and its result backend then fails on the
# socket_keepalive option that tasks/app.py sets.
REDIS_SCHEMES = ("redis", "rediss")
DEVICES = ("auto", "cuda", "cpu")
CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def _default_models_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "identification" / "models"


def _default_samples_dir() -> Path:
    # ../shared/data beside a checkout of this repository.
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _default_data_dir() -> Path:
    # platformdirs knows each platform's user data folder (XDG on Linux,
    # Application Support on macOS); imported here, where the default is needed.
    import platformdirs

    return Path(platformdirs.user_data_dir("identification", appauthor=False))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_gpu_ids(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return tuple(int(p) for p in parts)


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _parse_optional_float(text: str) -> float | None:
    return None if text.strip() == "" else float(text)


def _parse_optional_int(text: str) -> int | None:
    return None if text.strip() == "" else int(text)


def _parse_redis_url(text: str) -> str:
    # Empty is unset, as for `ident up`, which then runs an embedded Redis.
    return text.strip() or DEFAULT_REDIS_URL


def _parse_path(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib's answer to ~user for a user that does not exist
        user = text.split("/", 1)[0]
        raise ValueError(f"{user} names no user with a home directory here: give an absolute path") from None


# How an environment variable's text becomes a field of each declared type. A
# field whose parsing is not its type's says so with field(metadata={"parse": ...}).
_PARSERS: dict[object, Callable[[str], object]] = {
    int: int, float: float, bool: _parse_bool, str: str, Path: _parse_path,
    tuple[int, ...]: _parse_gpu_ids, tuple[str, ...]: _parse_names, float | None: _parse_optional_float,
    int | None: _parse_optional_int,
}


def _parser_for(f: Field, annotation: object) -> Callable[[str], object]:
    parse = f.metadata.get("parse") or _PARSERS.get(annotation)
    if parse is None:
        raise TypeError(f"settings field {f.name!r} is declared {annotation!r}, which no parser reads: "
                        "add the type to _PARSERS or give the field metadata={'parse': ...}")
    return parse


@cache
def _field_parsers(cls: type) -> dict[str, Callable[[str], object]]:
    hints = get_type_hints(cls)
    return {f.name: _parser_for(f, hints[f.name]) for f in fields(cls)}


def redacted_url(url: str) -> str:
    """``url`` with everything between ``//`` and its last ``@`` replaced by ``**``, for messages.

    Up to the last ``@``: a password that is not percent-encoded may itself hold
    ``@``, ``/``, ``#`` or ``?``, and none of it may reach a log.
    """
    scheme, found, rest = url.partition("//")
    if not found or "@" not in rest:
        return url
    return f"{scheme}//**@{rest.rpartition('@')[2]}"


def _redis_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the fleet's Redis URL, or None."""
    if is_sentinel_url(url):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return str(exc)
        return None
    parsed = urlsplit(url)
    if parsed.scheme not in REDIS_SCHEMES:
        return ("it must be a redis:// or rediss:// (TLS) URL, or Sentinels as "
                "sentinel://HOST:26379;sentinel://HOST:26380")
    try:
        parsed.port
    except ValueError:
        if "@" in url:
            return ("its port is not a number from 0 to 65535, or its password holds / # ? or @, "
                    "which must be percent-encoded (%2F %23 %3F %40)")
        return "its port is not a number from 0 to 65535"
    # No host means localhost, to redis-py and kombu alike.
    database = parsed.path.strip("/")
    if database and not database.isdigit():
        return f"the database after the host must be a number, not {database!r}"
    return None


@dataclass(frozen=True)
class Settings:
    """The fleet's configuration. Build it with :meth:`from_env`."""

    # Broker and result backend share one Redis.
    redis_url: str = field(default=DEFAULT_REDIS_URL, metadata={"parse": _parse_redis_url})
    # CA bundle that signs the Redis server's certificate, for rediss:// URLs
    # (empty: the system's trust store).
    redis_tls_ca_certs: str = ""
    # Redis behind Sentinel (IDENT_REDIS_URL=sentinel://...;sentinel://...):
    # the master's name in the Sentinels' configuration, and their own
    # password (the master's goes in the URL).
    redis_sentinel_master: str = field(default="ident", metadata={"parse": str.strip})
    redis_sentinel_password: str = ""
    # A job is acknowledged only once its result has reached this many
    # replicas (Redis WAIT), so a master that dies takes no answered job's
    # result along. None: 1 behind Sentinel, 0 on one server. A replica that
    # does not confirm within the timeout is logged, and the job goes on.
    redis_wait_replicas: int | None = None
    redis_wait_timeout_ms: int = 1000
    # One hour: long enough for a producer that polls lazily, short enough that
    # embeddings (biometric data) do not linger in Redis.
    result_expires: int = 3600
    # Redis redelivers an unacknowledged job after this many seconds. It must be
    # longer than the longest job (the hard time limit below) or a slow job is
    # run twice; a shorter value hands a dead worker's jobs over sooner.
    visibility_timeout: int = 600
    models_dir: Path = field(default_factory=_default_models_dir)
    device: str = field(default="auto", metadata={"parse": lambda v: v.strip().lower()})
    gpu_ids: tuple[int, ...] = (0,)
    # Models kept on the CPU whatever IDENT_DEVICE says, by catalog key or role.
    # Silero VAD is tiny and runs one 32 ms window after another: on a GPU each
    # window would pay a launch and two copies, and take GPU memory besides.
    cpu_models: tuple[str, ...] = ("silero_vad",)
    # The CUDA memory arena of each session may grow to this many MiB; 0 = the
    # catalog's per-model limit (sized for a 2 GiB card, docs/gpu.md).
    gpu_mem_limit_mb: int = 0
    # cuDNN's convolution algorithm search: HEURISTIC asks cuDNN for its best
    # guess (fast start, little workspace); EXHAUSTIVE times every algorithm on
    # the first run of each shape and may allocate large workspaces.
    cudnn_conv_algo_search: str = field(default="HEURISTIC", metadata={"parse": lambda v: v.strip().upper()})
    # TF32 matmuls on Ampere and newer: faster, but embeddings then differ from
    # the CPU's beyond float32 rounding; off keeps CUDA and CPU results interchangeable.
    cuda_tf32: bool = False
    # ONNX Runtime intra-op threads per session; 0 sizes them from the cores
    # and the pool's concurrency so the pool never oversubscribes the CPU.
    cpu_threads: int = 0
    # Catalog keys chosen for the slots that have alternatives.
    face_detection_model: str = "yunet_2023mar"
    face_embedding_model: str = "arcface_mobilefacenet"
    speaker_model: str = "campplus_sv_zh_en"
    spoof_model: str = "aasist"
    liveness_ensemble: bool = True
    # Limits on what one job may ask of a worker.
    max_payload_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_audio_seconds: float = 600.0
    max_faces: int = 50
    task_soft_time_limit: int = 120
    task_time_limit: int = 180
    # A job whose process died this many times is failed instead of retried.
    max_deliveries: int = 3
    # Face detection.
    det_score_threshold: float = 0.6
    det_nms_iou: float = 0.3
    det_top_k: int = 5000
    # Decision thresholds; None means the value the catalog calibrated for the
    # model in use.
    face_match_threshold: float | None = None
    speaker_match_threshold: float | None = None
    spoof_threshold: float | None = None
    liveness_threshold: float = 0.5
    # The producer client passes payloads larger than this by reference: the
    # bytes go to Redis once, raw, instead of base64 inside the message and
    # again in the broker's unacknowledged-message copy.
    payload_ref_bytes: int = 32 * 1024
    # Jobs a worker holds per pool process. At 2 each process's next job is
    # already in its pipe when it finishes one (workers/celery_internals.py), instead of
    # being fetched from Redis and handed over then: queue overhead 3.8-4.5 ->
    # 1.3-1.7 ms in paired runs (docs/benchmarks.md). A held job waits for the
    # job ahead of it in the same process.
    prefetch_multiplier: int = 2
    # Micro-batching inside a worker process.
    max_batch: int = 1
    max_wait_ms: float = 5.0
    # A worker process loads and warms every model before taking jobs; Celery's
    # default allows 4 s for that, too little for a cold disk or a GPU.
    process_init_timeout: float = 120.0
    # The sample photos and recordings `ident demo` sends and `ident bench` cycles through.
    samples_dir: Path = field(default_factory=_default_samples_dir)
    # The fleet's own data on this host: the embedded PostgreSQL of the galleries.
    data_dir: Path = field(default_factory=_default_data_dir)
    # Galleries (1:N identification, docs/galleries.md). Empty: an embedded
    # PostgreSQL with pgvector under IDENT_DATA_DIR, shared by the host's workers.
    gallery_url: str = field(default="", metadata={"parse": str.strip})
    # Enrolment refuses a recording with less speech than this, and a face
    # whose box is narrower than this many pixels (too little detail to keep).
    gallery_min_speech_s: float = 1.0
    gallery_min_face_px: float = 40.0
    # A gallery is searched exactly (every template) until it holds this many
    # templates; past it, through its own HNSW index. Exact search's p99 passed
    # 10 ms at about 5300 128-d templates here (docs/benchmarks.md, "Galleries").
    gallery_index_min_templates: int = 5_000
    # HNSW's candidate list per search: genuine recall@1 0.98-1.0 at 1e4-1e5
    # templates, far less at 1e6 (docs/benchmarks.md, "Galleries").
    gallery_ef_search: int = 100
    # Indexed galleries are searched through each worker process's shortlist of
    # them (galleries/shortlist.py: 32 bytes per 128-d template in memory), and
    # through HNSW only while it is built; off: HNSW always.
    gallery_shortlist: bool = True
    # Open-set thresholds of identify. None: the threshold at which a gallery of
    # its size keeps the false-positive identification rate at IDENT_GALLERY_TARGET_FPIR,
    # from the model's calibrated impostor scores (galleries/thresholds.py).
    face_identify_threshold: float | None = None
    speaker_identify_threshold: float | None = None
    gallery_target_fpir: float = 0.01
    # Flower's basic auth for `ident up --flower`, user:password; a user alone
    # gets a random password, printed at start.
    flower_auth: str = "admin"
    # Each worker's main process serves /metrics (Prometheus), /healthz and
    # /readyz on this port (docs/operations.md, "Metrics and health"); 0 = off.
    # Two workers on one host need two ports.
    metrics_port: int = 0
    # The HTTP gateway (ident serve, docs/gateway.md).
    # The keys callers send as `Authorization: Bearer KEY`, comma-separated; and/or
    # a file of their sha256 hex digests, one a line, so that the keys themselves
    # need not be on the gateway's host. repr=False: a key never reaches a log.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str = field(default="", metadata={"parse": str.strip})
    # Requests per key, in the `limits` library's notation ("50/second",
    # "1000/minute", several joined by ";"); empty: no limit. Counted in the
    # fleet's Redis, so every gateway replica shares one limit per key.
    api_rate_limit: str = field(default="50/second", metadata={"parse": str.strip})
    gateway_host: str = field(default="127.0.0.1", metadata={"parse": str.strip})
    gateway_port: int = 8080
    # How long a call waits for its result by default (and at most, ?wait=S)
    # before it answers 504 with the job id, which GET /v1/jobs/{id} then reads.
    gateway_wait_s: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        parsers = _field_parsers(cls)
        values = {}
        for f in fields(cls):
            name = env_name(f.name)
            raw = env.get(name)
            if raw is None:
                continue
            try:
                values[f.name] = parsers[f.name](raw)
            except ValueError as exc:
                raise ConfigurationError(f"{name}={raw!r} is not valid: {exc}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        problem = _redis_url_problem(self.redis_url)
        if problem:
            raise ConfigurationError(
                f"IDENT_REDIS_URL={redacted_url(self.redis_url)!r} is not valid: {problem}. Give one such as "
                f"{DEFAULT_REDIS_URL} or redis://:PASSWORD@HOST:6379/0, or leave it unset (or empty) for "
                f"{DEFAULT_REDIS_URL}"
            )
        if is_sentinel_url(self.redis_url) and not self.redis_sentinel_master:
            raise ConfigurationError("IDENT_REDIS_URL names Sentinels but IDENT_REDIS_SENTINEL_MASTER is empty: give "
                                     "the master's name as the Sentinels know it (`sentinel monitor NAME ...`)")
        if self.redis_wait_replicas is not None and self.redis_wait_replicas < 0:
            raise ConfigurationError("IDENT_REDIS_WAIT_REPLICAS must be 0 or more (empty: 1 behind Sentinel, else 0)")
        if self.redis_wait_timeout_ms < 1:
            raise ConfigurationError("IDENT_REDIS_WAIT_TIMEOUT_MS must be at least 1: WAIT 0 would block forever "
                                     "while a replica is away")
        if self.device not in DEVICES:
            raise ConfigurationError(
                f"IDENT_DEVICE={self.device!r} is not valid: use one of {', '.join(DEVICES)}"
            )
        if not self.gpu_ids:
            raise ConfigurationError("IDENT_GPU_IDS is empty: give at least one GPU index, e.g. 0")
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ConfigurationError(
                "IDENT_TASK_SOFT_TIME_LIMIT must be below IDENT_TASK_TIME_LIMIT "
                f"({self.task_soft_time_limit} >= {self.task_time_limit})"
            )
        for name in ("max_payload_bytes", "max_pixels", "max_faces", "max_batch", "max_deliveries",
                     "prefetch_multiplier", "result_expires", "visibility_timeout", "task_soft_time_limit",
                     "det_top_k"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{env_name(name)} must be at least 1")
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise ConfigurationError(
                f"IDENT_CUDNN_CONV_ALGO_SEARCH={self.cudnn_conv_algo_search!r} is not valid: use one of "
                f"{', '.join(CONV_ALGO_SEARCHES)}"
            )
        for name in ("cpu_threads", "payload_ref_bytes", "max_wait_ms", "gpu_mem_limit_mb"):
            if not getattr(self, name) >= 0:
                raise ConfigurationError(f"{env_name(name)} must be 0 or more")
        # A batch waits this long for its first job's company: longer than a job
        # may run is a stall, not a latency trade (inf never flushes at all).
        if not self.max_wait_ms < self.task_soft_time_limit * 1000:
            raise ConfigurationError(
                f"IDENT_MAX_WAIT_MS={self.max_wait_ms:g} is not valid: it must be a finite number of milliseconds "
                f"below IDENT_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit} s = "
                f"{self.task_soft_time_limit * 1000} ms); a few milliseconds is usual"
            )
        if self.gallery_url and urlsplit(self.gallery_url).scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(
                f"IDENT_GALLERY_URL={redacted_url(self.gallery_url)!r} is not valid: it must be a postgresql:// URL "
                "such as postgresql://ident:PASSWORD@db:5432/ident, or empty for the embedded PostgreSQL"
            )
        for name in ("gallery_index_min_templates", "gallery_ef_search"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{env_name(name)} must be at least 1")
        if not 0 < self.gallery_target_fpir < 1:
            raise ConfigurationError(
                f"IDENT_GALLERY_TARGET_FPIR={self.gallery_target_fpir} is not valid: it is a rate above 0 and below 1, "
                "such as 0.01 (one stranger in a hundred matched)"
            )
        for name in ("gallery_min_speech_s", "gallery_min_face_px"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigurationError(f"{env_name(name)} must be a finite number of 0 or more")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(
                f"IDENT_METRICS_PORT={self.metrics_port} is not valid: it is a TCP port from 1 to 65535 "
                "(9808, say), or 0 for no metrics and health endpoints"
            )
        for name in ("max_audio_seconds", "process_init_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigurationError(f"{env_name(name)} must be a positive number")
        _validate_gateway(self)
        if any(gpu < 0 for gpu in self.gpu_ids):
            raise ConfigurationError(f"IDENT_GPU_IDS={self.gpu_ids} holds a negative index: GPUs count from 0")
        # NaN passes float() and then fails every comparison: a verdict that is always False.
        for name, low, high in (("det_score_threshold", 0, 1), ("det_nms_iou", 0, 1), ("liveness_threshold", 0, 1),
                                ("face_match_threshold", -1, 1), ("speaker_match_threshold", -1, 1),
                                ("face_identify_threshold", -1, 1), ("speaker_identify_threshold", -1, 1),
                                ("spoof_threshold", -math.inf, math.inf)):
            value = getattr(self, name)
            if value is not None and not (low <= value <= high and math.isfinite(value)):
                span = "a finite number" if math.isinf(low) else f"between {low} and {high}"
                raise ConfigurationError(f"{env_name(name)}={value} is not valid: it must be {span}")


    def payload_lifetime_s(self) -> int:
        """How long a job's payload and delivery counter stay in Redis: through every delivery it may get.

        A delivery may wait up to the visibility timeout before it is handed
        out again and then run up to the hard time limit; workers delete both
        keys once the job is done, so this only bounds what a lost job leaves.
        """
        return max(self.visibility_timeout, self.task_time_limit) * (self.max_deliveries + 1)

    def replicas_to_confirm(self) -> int:
        """How many replicas must hold a job's result before the job is acknowledged (IDENT_REDIS_WAIT_REPLICAS)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if is_sentinel_url(self.redis_url) else 0

    def warnings(self) -> list[str]:
        """Settings that work but that an operator should hear about."""
        found = []
        if self.visibility_timeout <= self.task_time_limit:
            found.append(
                f"IDENT_VISIBILITY_TIMEOUT ({self.visibility_timeout} s) is not above "
                f"IDENT_TASK_TIME_LIMIT ({self.task_time_limit} s): a job still running after "
                f"{self.visibility_timeout} s is handed to a second worker as well"
            )
        elif self.max_batch == 1 and self.visibility_timeout <= self.prefetch_multiplier * self.task_time_limit:
            found.append(
                f"IDENT_VISIBILITY_TIMEOUT ({self.visibility_timeout} s) is not above "
                f"IDENT_PREFETCH_MULTIPLIER x IDENT_TASK_TIME_LIMIT ({self.prefetch_multiplier} x "
                f"{self.task_time_limit} s): a job held behind a slow one may be handed to a second worker as well"
            )
        return found


def env_name(field_name: str) -> str:
    return "IDENT_" + field_name.upper()


def load_settings() -> Settings:
    return Settings.from_env()


# One rate in the `limits` library's notation: "50/second", "1000 per minute", "10/5 minutes".
_RATE = re.compile(r"^\s*\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day|month|year)s?\s*$", re.IGNORECASE)
# Short keys can be guessed; 16 characters is 96 bits even in base64.
MIN_API_KEY_LENGTH = 16


def _validate_gateway(settings: Settings) -> None:
    """The HTTP gateway's settings (docs/gateway.md); checked here so a bad value fails at start, not per request."""
    for key in settings.api_keys:
        # The key itself is never quoted: the message names its position only.
        if len(key) < MIN_API_KEY_LENGTH or any(c.isspace() for c in key):
            position = settings.api_keys.index(key) + 1
            raise ConfigurationError(
                f"IDENT_API_KEYS: key number {position} is shorter than {MIN_API_KEY_LENGTH} characters or holds "
                "whitespace; make each key with `openssl rand -hex 32`"
            )
    rates = [part for part in settings.api_rate_limit.replace(",", ";").split(";") if part.strip()]
    for rate in rates:
        if not _RATE.match(rate):
            raise ConfigurationError(
                f"IDENT_API_RATE_LIMIT={settings.api_rate_limit!r} is not valid: {rate.strip()!r} is not a rate such "
                "as 50/second or 1000/minute (several joined by ;), or leave it empty for no limit"
            )
    if not 1 <= settings.gateway_port <= 65535:
        raise ConfigurationError(
            f"IDENT_GATEWAY_PORT={settings.gateway_port} is not valid: it is a TCP port from 1 to 65535 (8080, say)"
        )
    if not settings.gateway_host:
        raise ConfigurationError("IDENT_GATEWAY_HOST is empty: give an address to listen on, such as 127.0.0.1 "
                                 "or 0.0.0.0 (every interface, as in a container)")
    if not 0 < settings.gateway_wait_s < math.inf:
        raise ConfigurationError(
            f"IDENT_GATEWAY_WAIT_S={settings.gateway_wait_s} is not valid: it is the seconds a call waits for its "
            "result, a positive number such as 30"
        )


_field_parsers(Settings)  # an annotation that no parser reads fails here, at import
