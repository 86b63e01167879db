"""The Celery app factory shared by producers and both workers."""

from __future__ import annotations

import ssl
from urllib.parse import parse_qs, urlparse

from celery import Celery
from kombu import Queue

from tasks.contract import AUDIO_QUEUE, QUEUES, VISION_QUEUE
from tasks.redis_connection import sentinel_transport_options
from tasks.settings import Settings, load_settings


def celery_config(settings: Settings) -> dict:
    config = {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        # msgpack carries payload bytes as bytes; pickle would let anyone who can
        # write to the broker run code in the workers, so it is never accepted.
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "event_serializer": "json",
        # A job is acknowledged only once it is done, and a job whose process
        # died is put back: a crash never loses a job.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Each pool process has its next job waiting in its pipe (see
        # IDENT_PREFETCH_MULTIPLIER, workers/celery_internals.py); workers batching jobs
        # hold a batch each.
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "task_queues": tuple(Queue(name, routing_key=name) for name in QUEUES),
        "task_default_queue": VISION_QUEUE,
        "task_routes": {
            "vision.*": {"queue": VISION_QUEUE, "routing_key": VISION_QUEUE},
            "audio.*": {"queue": AUDIO_QUEUE, "routing_key": AUDIO_QUEUE},
        },
        "result_expires": settings.result_expires,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # kombu sweeps for unacknowledged jobs past their visibility timeout
            # (those of a worker that died whole) every interval x throttle
            # seconds: 10 x 10 by default, so a dead worker's jobs waited up to
            # 100 s more than IDENT_VISIBILITY_TIMEOUT. Sweep every
            # VT/10 seconds (1 to 10 s) instead, on every timer tick.
            "unacked_restore_interval": restore_interval(settings.visibility_timeout),
            "unacked_restore_throttle": 1,
            # The sweep holds a Redis lock for milliseconds; if its worker dies
            # holding it, the others wait out its expiry (300 s by default)
            # before they can sweep. Restores are transactions, so a lock that
            # expires early cannot hand a job out twice.
            "unacked_mutex_expire": 30,
            # One list per queue, so that a worker takes each job with an atomic
            # move into a hand-over list (workers/kombu_internals.py): none is lost if it dies.
            "priority_steps": [0],
            # Behind Sentinel (IDENT_REDIS_URL=sentinel://...): the master's name
            # and how to reach the Sentinels; kombu and Celery then ask them
            # for the master on every new connection.
            **sentinel_transport_options(settings),
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout,
                                             **sentinel_transport_options(settings)},
        # Keep trying through a Redis restart instead of giving up.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "redis_socket_keepalive": True,
        "redis_retry_on_timeout": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "worker_proc_alive_timeout": settings.process_init_timeout,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    tls = _tls_options(settings.redis_url, settings.redis_tls_ca_certs)
    if tls:
        config["broker_use_ssl"] = tls
        config["redis_backend_use_ssl"] = tls
    return config


def restore_interval(visibility_timeout: int) -> int:
    """Seconds between sweeps for jobs whose worker died: a tenth of the timeout, 1 to 10 s."""
    return max(1, min(10, visibility_timeout // 10))


def _tls_options(url: str, ca_certs: str = "") -> dict | None:
    """rediss:// URLs verify the server certificate unless the URL says otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "rediss":
        return None
    query = parse_qs(parsed.query)
    if "ssl_cert_reqs" in query:
        return None
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if ca_certs:
        options["ssl_ca_certs"] = ca_certs
    return options


def make_app(main: str = "identification", settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery(main, set_as_current=False)
    app.config_from_object(celery_config(settings))
    return app
