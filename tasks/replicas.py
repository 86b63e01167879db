"""Writes confirmed on Redis replicas (``WAIT``) before a job goes on.

Redis replicates asynchronously: a master that dies a millisecond after a
write may take it along, while later writes may already be on the replica
that Sentinel promotes. ``WAIT`` after the writes that must survive a
failover, in the same pipeline (Redis counts a client's writes per
connection), closes that gap:

* a job's result (workers/celery_internals.py, ``FleetResultBackend``), which
  the pool process stores before it reports the job done; the main process
  acknowledges the job only after that report, so an acknowledged job's
  result is on a replica;
* the hand-over bookkeeping (workers/kombu_internals.py, ``QoS.append``): the
  job's unacknowledged record, which lets the fleet put it back if its worker dies;
* a job just sent, with its by-reference payloads (tasks/client.py,
  ``IdentClient``), so that the promoted replica has every job a producer
  was told was sent.

A replica that does not confirm within ``IDENT_REDIS_WAIT_TIMEOUT_MS`` is
logged, and for :data:`RECHECK_S` seconds no write waits: a missing replica
must not make every job a second slower (Redis's ``min-replicas-to-write`` is
the server's own guard for operators who would rather refuse writes).
"""

from __future__ import annotations

import logging
import time

from tasks.settings import Settings, load_settings

log = logging.getLogger(__name__)

# How long writes stop waiting after replicas failed to confirm one in time.
RECHECK_S = 10.0


class ReplicaConfirmation:
    """When to append ``WAIT`` to a pipeline, and what its reply says."""

    def __init__(self, replicas: int, timeout_ms: int, clock=time.monotonic) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._clock = clock
        self._skip_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "ReplicaConfirmation":
        settings = settings or load_settings()
        return cls(settings.replicas_to_confirm(), settings.redis_wait_timeout_ms)

    def write(self, client, queue_writes, what: str) -> list:
        """Run the writes ``queue_writes(pipe)`` queues, then ``WAIT`` if writes wait now, on one connection.

        Returns the writes' replies; raises the first that failed. ``what``
        names the writes in the warning when replicas fall short.
        """
        with client.pipeline(transaction=False) as pipe:
            queue_writes(pipe)
            waits = self.add_to(pipe)
            replies = pipe.execute(raise_on_error=False)
        written = replies[:-1] if waits else replies
        for reply in written:
            if isinstance(reply, Exception):
                raise reply
        if waits:
            self.check(replies[-1], what)
        return written

    def add_to(self, pipe) -> bool:
        """Append ``WAIT`` to ``pipe`` (a non-transactional pipeline) if writes wait now; True if it did."""
        if self.replicas <= 0 or self._clock() < self._skip_until:
            return False
        pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        return True

    def check(self, confirmed, what: str) -> None:
        """Judge ``WAIT``'s reply (the number of replicas that confirmed, or the error it raised)."""
        if isinstance(confirmed, Exception):
            # A Redis that forbids WAIT (a managed service's ACL) cannot confirm anything.
            self._skip_until = self._clock() + RECHECK_S
            log.warning("Redis refused WAIT (%s: %s): %s is not confirmed on any replica; "
                        "writes stop waiting for %.0f s", type(confirmed).__name__, confirmed, what, RECHECK_S)
            return
        if int(confirmed) < self.replicas:
            self._skip_until = self._clock() + RECHECK_S
            log.warning("%s reached %d of the %d replica(s) IDENT_REDIS_WAIT_REPLICAS asks for within %d ms; "
                        "jobs go on unconfirmed for %.0f s, then wait again. A master lost now may take such "
                        "writes along: check the replicas (INFO replication)",
                        what, int(confirmed), self.replicas, self.timeout_ms, RECHECK_S)
