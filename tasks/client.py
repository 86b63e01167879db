"""A small producer client.

Other services need not use it: ``send_task`` by name with msgpack is the
whole protocol (see docs/contract.md). This wrapper spares them the names,
passes large payloads by reference, and gives the fleet-wide status broadcast.
"""

from __future__ import annotations

import time
import uuid

from celery import Celery
from celery.result import AsyncResult

from tasks import contract
from tasks.app import make_app
from tasks.replicas import ReplicaConfirmation
from tasks.settings import Settings, load_settings


# Written after each job is sent, behind Sentinel (IdentClient._confirm_sent): its value is never read.
SENT_FENCE_KEY = "ident:client:sent-fence"
SENT_FENCE_TTL_MS = 60_000


class IdentClient:
    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.settings = settings or load_settings()
        self.app = app or make_app("identification-client", self.settings)
        self._replica_confirmation = ReplicaConfirmation.from_settings(self.settings)

    def _argument(self, payload):
        """Payloads over IDENT_PAYLOAD_REF_BYTES travel by reference, raw, once."""
        if not isinstance(payload, (bytes, bytearray)) or len(payload) <= self.settings.payload_ref_bytes:
            return payload
        key = f"{contract.PAYLOAD_KEY_PREFIX}{uuid.uuid4().hex}"
        # Workers delete it once the job is done.
        self.app.backend.client.set(key, bytes(payload), ex=self.settings.payload_lifetime_s())
        return {contract.PAYLOAD_REF_FIELD: key}

    def _send(self, name: str, *args) -> AsyncResult:
        arguments = [self._argument(a) for a in args]
        # argsrepr keeps payload bytes out of worker logs and monitoring events.
        # The send time, taken once the payloads are in Redis, is what the
        # workers measure a job's queue wait from (ident_queue_wait_seconds):
        # Celery's own messages carry none.
        result = self.app.send_task(
            name, args=arguments, argsrepr=f"<{len(args)} arguments>",
            headers={contract.SENT_AT_HEADER: time.time()},
        )
        self._confirm_sent()
        return result

    def _confirm_sent(self) -> None:
        """Return only once the job (and its payloads) reached IDENT_REDIS_WAIT_REPLICAS replicas, or the WAIT timeout passed.

        Behind Sentinel a master that dies a millisecond after it queued a job
        may not have passed it on yet, and the promoted replica never saw it.
        kombu publishes on a connection of its own, and Redis's WAIT counts
        the writes of its own connection only; but replication keeps the
        master's order, so a write made here after the job's, once confirmed,
        confirms the job's too. Short of replicas, the job goes anyway, and
        jobs stop waiting for a while (tasks/replicas.py).
        """
        if self._replica_confirmation.replicas > 0:
            self._replica_confirmation.write(
                self.app.backend.client, lambda pipe: pipe.set(SENT_FENCE_KEY, time.time(), px=SENT_FENCE_TTL_MS),
                "a job just sent")

    def analyze_image(self, image: bytes, options: dict | None = None) -> AsyncResult:
        return self._send(contract.VISION_ANALYZE, image, options)

    def verify_faces(self, image_a: bytes, image_b: bytes) -> AsyncResult:
        return self._send(contract.VISION_VERIFY, image_a, image_b)

    def analyze_audio(self, audio: bytes, options: dict | None = None) -> AsyncResult:
        return self._send(contract.AUDIO_ANALYZE, audio, options)

    def verify_speakers(self, audio_a: bytes, audio_b: bytes) -> AsyncResult:
        return self._send(contract.AUDIO_VERIFY, audio_a, audio_b)

    def analyze(self, kind: str, payload: bytes, options: dict | None = None) -> AsyncResult:
        return self._send(f"{kind}.analyze", payload, options)

    def verify(self, kind: str, first: bytes, second: bytes) -> AsyncResult:
        return self._send(f"{kind}.verify", first, second)

    def enroll(self, kind: str, gallery: str, subject_id: str, payload: bytes,
               options: dict | None = None) -> AsyncResult:
        """Add one template of ``subject_id`` to ``gallery`` (created on first use)."""
        return self._send(f"{kind}.enroll", gallery, subject_id, payload, options)

    def identify(self, kind: str, gallery: str, payload: bytes, options: dict | None = None) -> AsyncResult:
        """The gallery's best candidates for each face (vision) or for the voice (audio), with the open-set match."""
        return self._send(f"{kind}.identify", gallery, payload, options)

    def forget(self, kind: str, gallery: str, subject_id: str) -> AsyncResult:
        """Delete every template of ``subject_id``; the result's ``deleted`` says how many."""
        return self._send(f"{kind}.forget", gallery, subject_id)

    def status(self, kind: str) -> AsyncResult:
        """The seed's Vision.GetStatus / Audio.GetStatus: answered by one pool process."""
        return self._send(f"{kind}.get_status")

    def model_status(self, timeout: float = 2.0) -> list[dict]:
        """Every pool process of every worker: [{worker name: {"processes": [...]}}]."""
        with self.app.connection_for_read() as connection:
            connection_errors = connection.connection_errors
        try:
            return self.app.control.broadcast(contract.MODEL_STATUS_COMMAND, reply=True, timeout=timeout)
        except connection_errors:
            # A connection pooled before a Redis restart fails once; the retry reconnects.
            return self.app.control.broadcast(contract.MODEL_STATUS_COMMAND, reply=True, timeout=timeout)
