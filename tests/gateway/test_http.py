"""The gateway's HTTP surface that needs no fleet: OpenAPI, keys, sizes, forms (the ASGI app, no Redis)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.body_limit import MULTIPART_SLACK_BYTES, BodyLimit
from tests.gateway.helpers import AUTH, KEY, call, gateway

OPERATIONS = ("analyze", "verify", "enroll", "identify", "forget")


@pytest.fixture(scope="module")
def app():
    return gateway(IDENT_MAX_PAYLOAD_BYTES="100000")


def test_the_openapi_document_lists_every_endpoint(app):
    response = call(app, "GET", "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    paths = set(document["paths"])
    assert {f"/v1/{kind}/{op}" for kind in ("vision", "audio") for op in OPERATIONS} <= paths
    assert {"/v1/jobs/{job_id}", "/v1/status", "/healthz"} <= paths
    verify = document["paths"]["/v1/vision/verify"]["post"]
    assert set(verify["requestBody"]["content"]["multipart/form-data"]["schema"]["required"]) == {"file_a", "file_b"}
    assert "application/octet-stream" in document["paths"]["/v1/audio/analyze"]["post"]["requestBody"]["content"]
    assert "HTTPBearer" in document["components"]["securitySchemes"]


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/healthz"])
def test_open_without_a_key(app, path):
    assert call(app, "GET", path).status_code == 200


@pytest.mark.parametrize("method, path", [("GET", "/v1/status"), ("GET", "/v1/jobs/abc"),
                                          *[("POST", f"/v1/{k}/{op}") for k in ("vision", "audio") for op in OPERATIONS]])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"},
                                     {"Authorization": f"Basic {KEY}"}])
def test_401_without_an_accepted_key(app, method, path, headers):
    response = call(app, method, path, headers=headers, content=b"\xff\xd8\xff" if method == "POST" else None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "Unauthorized"


def test_413_from_content_length_before_the_body_is_read(app):
    response = call(app, "POST", "/v1/vision/analyze", headers=AUTH, content=b"x" * (100000 + MULTIPART_SLACK_BYTES + 1))
    assert response.status_code == 413 and response.json()["error"]["type"] == "PayloadTooLarge"


def test_verify_takes_two_payloads_under_the_limit(app):
    # Two payloads under the limit each pass the size checks; with no fleet here, nothing is sent: 503.
    files = {"file_a": b"a" * 90000, "file_b": b"b" * 90000}
    response = call(app, "POST", "/v1/vision/verify", headers=AUTH, files=files)
    assert response.status_code == 503 and response.json()["error"]["type"] == "NoWorker"


def test_413_for_one_part_over_the_limit(app):
    files = {"file_a": b"a" * 100001, "file_b": b"b"}
    response = call(app, "POST", "/v1/vision/verify", headers=AUTH, files=files)
    assert response.status_code == 413 and "'file_a' is 100001 bytes" in response.json()["error"]["message"]


def test_a_chunked_body_is_cut_off_at_the_first_chunk_past_the_limit():
    """BodyLimit on its own: the app stops receiving once the count passes the limit."""
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 40000, "more_body": True}  # an endless body

    async def reader(scope, receive, send):
        while True:
            await receive()

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/audio/analyze", "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(Exception) as caught:
        asyncio.run(BodyLimit(reader, max_payload_bytes=100000)(scope, receive, send))
    assert getattr(caught.value, "status", None) == 413
    # 100000 + 64 KiB fits in 5 chunks of 40000 bytes: the 5th passes it and is the last one read.
    assert len(pulled) == 5


@pytest.mark.parametrize("path, params, files, message", [
    ("/v1/vision/analyze", {}, None, "no media in 'file'"),
    ("/v1/audio/verify", {}, {"file_a": b"RIFF"}, "'file_a' and 'file_b'"),
    ("/v1/vision/enroll", {"gallery": "g"}, {"file": b"\xff\xd8\xff"}, "'subject_id' is missing"),
    ("/v1/audio/identify", {}, {"file": b"RIFF"}, "'gallery' is missing"),
    ("/v1/vision/forget", {"subject_id": "s"}, None, "'gallery' is missing"),
    ("/v1/vision/analyze", {"options": "[1, 2]"}, {"file": b"\xff\xd8\xff"}, "options must be a JSON object"),
    ("/v1/vision/analyze", {"wait": "-1"}, {"file": b"\xff\xd8\xff"}, "wait"),
    ("/v1/vision/analyze", {}, {"image": b"\xff\xd8\xff"}, "unexpected file part 'image'"),
])
def test_422_for_what_the_gateway_can_tell_before_sending(app, path, params, files, message):
    response = call(app, "POST", path, headers=AUTH, params=params, files=files)
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["type"] == "InvalidInput" and message in body["error"]["message"], body


def test_form_fields_are_read_beside_the_file(app):
    # A form with gallery and subject_id but no media: the missing media is what is reported.
    response = call(app, "POST", "/v1/vision/enroll", headers=AUTH,
                    data={"gallery": "g", "subject_id": "s", "options": json.dumps({"liveness": False})})
    assert response.status_code == 422 and "no media in 'file'" in response.json()["error"]["message"]


def test_unknown_paths_answer_json(app):
    response = call(app, "GET", "/v2/anything", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFound"
