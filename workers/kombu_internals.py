"""Every use of kombu's internals, in one place: its Redis transport, with two changes.

One Redis client per channel, and no job lost in the hand-over. Only worker
processes use it: :func:`install`, called when a worker app is made
(workers/wiring.py), makes it what ``redis://``, ``rediss://`` and
``sentinel://`` (kombu's Sentinel transport, same changes) mean in that
process; producers that import the contract (tasks/) keep stock kombu.
Celery's ``broker_transport`` setting would name the class without touching
kombu's table, but the connection's URL then starts with the class's path
instead of ``redis://``, and Flower's broker view, which reads the scheme,
stops working.

**One client per channel.** kombu 5.x builds a new ``redis.Redis`` object
every time it publishes a job, records a job as unacknowledged or
acknowledges it (``Channel.conn_or_acquire``). With redis-py 8 each of those
objects copies ~170 response callbacks, about 0.2 ms of CPU: three per job,
paid by the producer and by the worker's main process between two jobs (see
docs/benchmarks.md). The client object holds no connection of its own (it
borrows one from the channel's pool for each command), so one per channel
serves every call as well, and is rebuilt if the pool is.

**The hand-over.** kombu takes a job with ``BRPOP``, which removes it from
the queue, and records it as unacknowledged in a second command. A worker
killed between the two (or a Redis that stops before its reply leaves) loses
the job: it is in no queue and no unacknowledged record. Here a consumer of
one queue takes the job with ``BLMOVE`` instead, which moves it atomically
into a hand-over list; recording it as unacknowledged takes it out of that
list in the same atomic step, confirmed on ``IDENT_REDIS_WAIT_REPLICAS``
replicas before the job runs (tasks/replicas.py). A job left in the list outlived its consumer:
the unacknowledged-job sweep puts it back on its queue once it has been there
for the visibility timeout, as kombu does for unacknowledged jobs. ``BLMOVE``
takes one source list, so this needs one list per queue: the fleet runs with
``priority_steps`` ``[0]`` (tasks/app.py), and the sweep moves jobs that a
stock kombu producer queued under a priority list back onto the queue.
Consumers of several queues, a ``global_keyprefix`` and Redis before 6.2
(no ``BLMOVE``) keep kombu's ``BRPOP`` and its gap, with a warning that says why.

The wire format and the keys in Redis are otherwise kombu's own: producers on
stock kombu interoperate with these workers, and URLs, logs and Flower's broker
view keep showing ``redis://``.

kombu internals this relies on (tests/unit/test_library_internals.py checks
each against the installed kombu): ``TRANSPORT_ALIASES`` and ``_transport_cache``,
``Channel.conn_or_acquire``,
``_create_client``, ``_brpop_start``/``_brpop_read``, ``_queue_cycle``,
``_in_poll``, ``_flush_brpop_reauth``, ``connection._deliver``, and
``QoS.append``/``restore_visible``/``pipe_or_acquire``/``_vrestore_count``; and, for the
lists that :func:`queued_job_lists` names (``ident_queue_length``, workers/scrape_gauges.py),
how kombu names a priority sub-list (``Channel.sep``, ``PRIORITY_STEPS``) and ``Channel.unacked_key``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

from tasks.replicas import ReplicaConfirmation

# URL scheme -> the class of this module that serves it.
TRANSPORTS = {"redis": "Transport", "rediss": "Transport", "sentinel": "SentinelTransport"}

logger = logging.getLogger(__name__)

# Puts back, in one atomic step, the jobs a consumer moved into the hand-over
# list and never recorded (it died in between): those seen there for the
# visibility timeout. An item's first sighting is kept under the SHA-1 of its
# bytes, so no JSON is parsed here. Jobs under stock kombu priority lists
# (KEYS[4] on) are moved onto the queue, oldest served first.
RESTORE_HANDED_OVER = """
local queue, handover, seen = KEYS[1], KEYS[2], KEYS[3]
local now, grace = tonumber(ARGV[1]), tonumber(ARGV[2])
local restored, stray = 0, 0
for i = 4, #KEYS do
  local item = redis.call('LPOP', KEYS[i])
  while item do
    redis.call('RPUSH', queue, item)
    stray = stray + 1
    item = redis.call('LPOP', KEYS[i])
  end
end
local present = {}
for _, item in ipairs(redis.call('LRANGE', handover, 0, -1)) do
  local id = redis.sha1hex(item)
  local first = tonumber(redis.call('HGET', seen, id))
  if not first then
    redis.call('HSET', seen, id, now)
    present[id] = true
  elseif now - first >= grace then
    redis.call('LREM', handover, 1, item)
    redis.call('HDEL', seen, id)
    redis.call('RPUSH', queue, item)
    restored = restored + 1
  else
    present[id] = true
  end
end
for _, id in ipairs(redis.call('HKEYS', seen)) do
  if not present[id] then redis.call('HDEL', seen, id) end
end
return {restored, stray}
"""

# kombu's unacknowledged record of a job (its index entry and its message),
# and the job out of the hand-over list, in one atomic step. A script, not
# MULTI/EXEC, so that WAIT can follow it on the same connection.
RECORD_HANDED_OVER = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('LREM', KEYS[3], 1, ARGV[4])
"""


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag):
        handed_over = self.channel.handed_over.pop(delivery_tag, None)
        if handed_over is None:
            return super().append(message, delivery_tag)
        handover_key, item = handed_over
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        channel = self.channel
        with channel.conn_or_acquire() as client:
            if channel._record_script is None:
                channel._record_script = client.register_script(RECORD_HANDED_OVER)
            channel.replica_confirmation.write(
                client, lambda pipe: channel._record_script(
                    keys=[self.unacked_index_key, self.unacked_key, handover_key],
                    args=[time(), delivery_tag, record, item], client=pipe),
                "a job's hand-over")
        virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, start=0, num=10, interval=10):
        super().restore_visible(start, num, interval)
        # The same throttle as kombu's sweep above.
        if (self._vrestore_count - 1) % (interval or 1) == 0:
            self.channel.restore_handed_over()


class Channel(kombu_redis.Channel):
    QoS = QoS
    _reused_client = None
    _restore_script = None
    _record_script = None
    _warned_no_handover: str | None = None

    def __init__(self, *args, **kwargs):
        # The queue the outstanding BLMOVE takes from, and the jobs it
        # delivered that are not recorded yet: delivery tag -> (list, bytes).
        self.handover_source: str | None = None
        self.handed_over: dict[str, tuple[str, bytes]] = {}
        self.replica_confirmation = ReplicaConfirmation.from_settings()
        super().__init__(*args, **kwargs)

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        reused = self._reused_client
        if reused is None or reused.connection_pool is not self.pool:
            reused = self._reused_client = self._create_client()
        yield reused

    def handover_key(self, queue: str) -> str:
        return handover_key(self.unacked_key, queue)

    @cached_property
    def server_has_blmove(self) -> bool:
        with self.conn_or_acquire() as client:
            version = str(client.info("server").get("redis_version", "0"))
        return tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) >= (6, 2)

    def _single_source(self) -> str | None:
        queues = self.active_queues
        if not queues:
            return None
        why_not = self._why_no_handover(queues)
        if why_not:
            if why_not != self._warned_no_handover:
                self._warned_no_handover = why_not
                logger.warning("jobs are taken with BRPOP, not through the hand-over list, because %s: a job "
                               "in transit is lost if this worker dies as Redis hands it over "
                               "(docs/security.md, \"A job in transit\")", why_not)
            return None
        return queues[0]

    def _why_no_handover(self, queues: list[str]) -> str | None:
        if len(queues) != 1:
            return f"this worker consumes {len(queues)} queues ({', '.join(queues)}); give each its own worker"
        if list(self.priority_steps) != [0]:
            return "priority_steps is not [0]"
        if self.global_keyprefix:
            return "a global_keyprefix is set"
        if not self.server_has_blmove:
            return "this Redis predates 6.2 and has no BLMOVE; upgrade it"
        return None

    def _brpop_start(self, timeout=None):
        source = self._single_source()
        if source is None:
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.handover_source = source
        self.client.connection.send_command("BLMOVE", source, self.handover_key(source), "RIGHT", "LEFT",
                                            timeout or 0)

    def _brpop_read(self, **options):
        source, self.handover_source = self.handover_source, None
        if source is None:
            return super()._brpop_read(**options)
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                # As kombu does: reconnect on the next turn. A job moved before
                # the connection broke waits in the hand-over list for the sweep.
                self.client.connection.disconnect()
                raise
            if item is None:
                raise Empty()
            self._queue_cycle.rotate(source)
            self._deliver_handed_over(source, item)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_handed_over(self, source: str, item: bytes) -> None:
        payload = loads(bytes_to_str(item))
        tag = payload["properties"]["delivery_tag"]
        handover_key = self.handover_key(source)
        self.handed_over[tag] = (handover_key, item)
        try:
            self.connection._deliver(payload, source)
        except BaseException:
            # Left in the hand-over list, the job is put back by the sweep.
            self.handed_over.pop(tag, None)
            raise
        if self.handed_over.pop(tag, None) is not None:
            # Taken without acknowledgement (no_ack): nothing will record it.
            with self.conn_or_acquire() as client:
                client.lrem(handover_key, 1, item)

    def restore_handed_over(self) -> None:
        """Put back the jobs that a consumer of these queues took and never recorded."""
        with self.conn_or_acquire() as client:
            if self._restore_script is None:
                self._restore_script = client.register_script(RESTORE_HANDED_OVER)
            for queue in self.active_queues:
                stray = [f"{queue}{self.sep}{step}" for step in kombu_redis.PRIORITY_STEPS if step] \
                    if list(self.priority_steps) == [0] else []
                keys = [queue, self.handover_key(queue), f"{self.handover_key(queue)}:seen", *stray]
                restored, moved = self._restore_script(keys=keys, args=[time(), self.visibility_timeout],
                                                       client=client)
                if restored:
                    logger.warning("%d %s job(s) put back on the queue: a worker took them and died "
                                   "before recording them", restored, queue)
                if moved:
                    logger.warning("%d %s job(s) moved from kombu priority lists onto the queue: the fleet "
                                   "reads one list per queue (priorities are not supported)", moved, queue)


def handover_key(unacked_key: str, queue: str) -> str:
    """The hand-over list of ``queue``'s consumers (one per queue, shared by every worker on it)."""
    return f"{unacked_key}:handover:{queue}"


def queued_job_lists(queue: str, transport_options: Mapping | None = None) -> list[str]:
    """Every Redis list that holds jobs of ``queue`` that no worker holds: what ``ident_queue_length`` sums.

    * the queue's own list, where the fleet's producers put every job;
    * kombu's priority sub-lists, named as kombu names them (the queue, its
      ``sep``, a step of ``PRIORITY_STEPS``: ``vision\x06\x163``), where a
      stock kombu producer that sends a priority puts its jobs; the
      unacknowledged-job sweep moves them onto the queue (the fleet reads one list);
    * the queue's hand-over list. A job is there for the instant between a
      consumer's ``BLMOVE`` and its unacknowledged record, or, when that
      consumer died in between, until the sweep puts it back on the queue
      after the visibility timeout: either way no live worker counts it as in
      progress, and it still has to be served, so it counts as queued.

    Jobs a worker has taken (kombu's ``unacked`` hash) are that worker's, in
    its ``ident_jobs_in_progress``; a dead worker's are in neither until the
    sweep puts them back. ``transport_options`` are Celery's
    ``broker_transport_options``, which may rename the separator, the
    unacknowledged key or prefix every key.
    """
    options = transport_options or {}
    sep = options.get("sep", Channel.sep)
    unacked_key = options.get("unacked_key", Channel.unacked_key)
    prefix = options.get("global_keyprefix") or ""
    lists = [queue, *(f"{queue}{sep}{step}" for step in kombu_redis.PRIORITY_STEPS if step),
             handover_key(unacked_key, queue)]
    return [f"{prefix}{key}" for key in lists]


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel on the master that Sentinel names: kombu's Sentinel channel finds it on each new connection."""


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(Transport, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Resolve ``redis://``, ``rediss://`` and ``sentinel://`` broker URLs to this module's transports from now on."""
    for scheme, transport in TRANSPORTS.items():
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{transport}"
        # kombu caches each alias once resolved; a stale entry would keep the stock class.
        kombu.transport._transport_cache.pop(scheme, None)  # noqa: SLF001
