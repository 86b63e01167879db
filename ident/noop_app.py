"""A stock Celery app with one no-op task: the middle of the three in ``ident bench --kind queue``.

``celery -A ident.noop_app worker -Q <queue> -c 2`` runs it. It is Celery as
anyone would set it up: the stock prefork pool, the stock kombu Redis
transport and the stock Redis result backend, configured only as the fleet is
where that changes the per-job work (msgpack both ways, late acks, two jobs
prefetched per pool process, results kept an hour). It must import nothing
from ``tasks/`` or ``workers/``: making a fleet worker app puts the fleet's
own transport, pool and result backend in place (workers/kombu_internals.py,
workers/celery_internals.py), and this app is the comparison that shows what
the fleet's own code costs or saves. The transport is named explicitly, so it
stays kombu's stock one whatever else the process has imported.

The broker and the result backend are ``IDENT_REDIS_URL``, which the bench
always sets for this worker.
"""

from __future__ import annotations

import os

from celery import Celery

NOOP_TASK = "identbench.noop"
# Named, not resolved from the URL's scheme: stock kombu even in a process where
# something has installed another transport for redis://.
STOCK_TRANSPORT = "kombu.transport.redis:Transport"


def stock_config(url: str) -> dict:
    """The settings that the bench's producer and this worker share."""
    return {
        "broker_url": url,
        "broker_transport": STOCK_TRANSPORT,
        "result_backend": url,
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        # As the fleet (tasks/app.py): acknowledged once done, two jobs per pool process.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 2,
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
    }


app = Celery("identbench", set_as_current=False)
app.config_from_object(stock_config(os.environ.get("IDENT_REDIS_URL") or "redis://127.0.0.1:6379/0"))


@app.task(name=NOOP_TASK)
def noop() -> dict:
    return {"ok": True}
