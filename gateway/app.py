"""The gateway's FastAPI app: ``make_gateway(settings)``.

Every endpoint under /v1 needs ``Authorization: Bearer KEY`` and counts
against its key's rate limit; /healthz, /openapi.json and /docs are open. A
call reads its media and fields, checks them, makes sure a worker consumes the
queue (else 503, nothing sent), sends the job and waits for its answer (or
answers 202 with ``?wait=0``). docs/gateway.md has the endpoints and the
errors table.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import anyio.to_thread
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import KeyRing
from gateway.body_limit import BodyLimit
from gateway.errors import (INVALID_INPUT, NO_WORKER, NOT_FOUND, TIMEOUT, UNAUTHORIZED, ApiError, error_description,
                            job_error)
from gateway.jobs import JobDesk, JobOutcome
from gateway.media import Submission, read_submission
from gateway.presence import FleetPresence, summarize
from gateway.rate_limit import RateLimit
from tasks import contract
from tasks.client import IdentClient
from tasks.settings import Settings

log = logging.getLogger("ident.gateway")

KINDS = ("vision", "audio")
# Calls that wait at once use a thread only to send; these many may send together.
SEND_THREADS = 64


@dataclass(frozen=True)
class Operation:
    """One endpoint's shape: its media parts, its fields, and the job it sends."""

    summary: str
    media: tuple[str, ...]
    make_call: Callable[[str, Submission], Callable[[IdentClient], object]]


def _analyze(kind, s):
    media, options = s.media("file"), s.options()
    return lambda client: client.analyze(kind, media, options)


def _verify(kind, s):
    first, second = s.media("file_a"), s.media("file_b")
    return lambda client: client.verify(kind, first, second)


def _enroll(kind, s):
    gallery, subject, media, options = s.field("gallery"), s.field("subject_id"), s.media("file"), s.options()
    return lambda client: client.enroll(kind, gallery, subject, media, options)


def _identify(kind, s):
    gallery, media, options = s.field("gallery"), s.media("file"), s.options()
    return lambda client: client.identify(kind, gallery, media, options)


def _forget(kind, s):
    gallery, subject = s.field("gallery"), s.field("subject_id")
    return lambda client: client.forget(kind, gallery, subject)


OPERATIONS = {
    "analyze": Operation("faces, liveness and embeddings (vision); speech, spoof score and voiceprint (audio)",
                         ("file",), _analyze),
    "verify": Operation("1:1: are file_a and file_b the same person / speaker?", ("file_a", "file_b"), _verify),
    "enroll": Operation("add one template of subject_id to gallery (created by its first enrolment)",
                        ("file",), _enroll),
    "identify": Operation("1:N: the gallery's best candidates and the open-set match", ("file",), _identify),
    "forget": Operation("delete every template of subject_id from gallery", (), _forget),
}


def _request_body_doc(media: tuple[str, ...]) -> dict:
    """The request body in the OpenAPI document: FastAPI cannot infer it, the endpoint reads the body itself."""
    if not media:
        return {}
    properties = {name: {"type": "string", "format": "binary"} for name in media}
    properties.update(gallery={"type": "string"}, subject_id={"type": "string"},
                      options={"type": "string", "description": "a JSON object (docs/contract.md)"})
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": properties, "required": list(media)}}}
    if len(media) == 1:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def make_gateway(settings: Settings, client: IdentClient | None = None) -> FastAPI:
    keys = KeyRing.from_settings(settings)
    desk = JobDesk(settings, client)
    presence = FleetPresence(desk.client)
    rate_limit = RateLimit(settings.api_rate_limit, desk.redis.connection_pool)
    bearer = HTTPBearer(auto_error=False, description="one of IDENT_API_KEYS")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = SEND_THREADS
        desk.start()
        presence.start()
        log.info("gateway ready: %d API key(s), rate limit %s", len(keys), settings.api_rate_limit or "none")
        try:
            yield
        finally:
            presence.stop()
            desk.stop()

    app = FastAPI(title="identification gateway", version="1",
                  description="The fleet's face and voice jobs over HTTP (docs/gateway.md).", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_payload_bytes=settings.max_payload_bytes)
    app.state.desk = desk
    app.state.presence = presence

    def caller(request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> str:
        """The key's digest; 401 without an accepted key, 429 over its rate. Sync: FastAPI runs it in a thread."""
        digest = keys.caller(request.headers.get("authorization"))
        if digest is None:
            raise ApiError(401, UNAUTHORIZED, "send an accepted API key as `Authorization: Bearer KEY`",
                           headers={"WWW-Authenticate": "Bearer"})
        rate_limit.check(digest)
        return digest

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(ApiError(422, INVALID_INPUT, problems).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = NOT_FOUND if exc.status_code == 404 else "HTTPError"
        return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(RedisError)
    async def redis_down(_request, exc):
        log.warning("Redis unavailable: %s", exc)
        return JSONResponse(ApiError(503, NO_WORKER, "the fleet's Redis cannot be reached; retry later").body(),
                            status_code=503, headers={"Retry-After": "5"})

    @app.get("/healthz", tags=["health"], summary="the gateway process answers (no key needed)")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/status", tags=["fleet"], summary="the fleet's workers and queues (the model_status broadcast)")
    async def status(_caller: str = Security(caller)):
        replies = await anyio.to_thread.run_sync(presence.refresh)
        return summarize(replies)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], summary="a job's state and its result or error")
    async def job(job_id: str, owner: str = Security(caller)):
        # Unknown and another key's job answer alike: an id's existence is not revealed.
        if not await anyio.to_thread.run_sync(desk.owned_by, job_id, owner):
            raise ApiError(404, NOT_FOUND, f"no job {job_id!r} for this key (or its result has expired)")
        outcome = await anyio.to_thread.run_sync(desk.read, job_id)
        return _job_body(job_id, outcome)

    def add_operation(kind: str, name: str, operation: Operation) -> None:
        task = f"{kind}.{name}"
        queue = contract.queue_for(task)

        async def endpoint(
            request: Request,
            owner: str = Security(caller),
            wait: float | None = Query(None, ge=0, description=(
                f"seconds to wait for the result (default and most: IDENT_GATEWAY_WAIT_S, {settings.gateway_wait_s:g}); "
                "0 answers 202 with the job id at once")),
            gallery: str | None = Query(None, description="the gallery (enroll, identify, forget)"),
            subject_id: str | None = Query(None, description="the subject (enroll, forget)"),
            options: str | None = Query(None, description='a JSON object of options, e.g. {"liveness": false}'),
        ):
            submission = await read_submission(request, operation.media, settings.max_payload_bytes)
            call = operation.make_call(kind, submission)
            if not await anyio.to_thread.run_sync(presence.serves, queue):
                raise ApiError(503, NO_WORKER, f"no worker consumes the {queue!r} queue now; nothing was sent, "
                               "retry later", headers={"Retry-After": "5"})
            timeout = settings.gateway_wait_s if wait is None else min(wait, settings.gateway_wait_s)
            sent = await desk.send(call, owner, wait=timeout > 0)
            location = f"/v1/jobs/{sent.id}"
            if timeout <= 0:
                return JSONResponse({"job_id": sent.id, "state": "PENDING"}, status_code=202,
                                    headers={"Location": location})
            outcome = await desk.wait(sent, timeout)
            if outcome is None:
                raise ApiError(504, TIMEOUT, f"no result within {timeout:g} s; the job goes on: GET {location}",
                               job_id=sent.id, headers={"Location": location})
            if outcome.state == "FAILURE":
                raise job_error(outcome.error_type, outcome.message, job_id=sent.id)
            return JSONResponse(outcome.result)

        endpoint.__name__ = f"{kind}_{name}"
        app.post(f"/v1/{kind}/{name}", tags=[kind], summary=operation.summary,
                 name=task, openapi_extra=_request_body_doc(operation.media))(endpoint)

    for kind in KINDS:
        for name, operation in OPERATIONS.items():
            add_operation(kind, name, operation)
    return app


def _job_body(job_id: str, outcome: JobOutcome) -> dict:
    body = {"job_id": job_id, "state": outcome.state}
    if outcome.state == "SUCCESS":
        body["result"] = outcome.result
    elif outcome.state == "FAILURE":
        body["error"] = error_description(outcome.error_type, outcome.message)
    return body
