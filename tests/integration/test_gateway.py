"""The HTTP gateway (`python -m ident.serve`, a real uvicorn process) in front of the session's real fleet.

The session's fleet (tests/integration/conftest.py: one vision worker with two
pool processes, one audio worker, the embedded PostgreSQL of the galleries)
answers every job. Three gateway processes run on it: the main one, one with a
tight rate limit, and one on a Redis of its own with no worker at all (503).
Every photo and recording is from ../shared/data, chosen through labels.json.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis as redis_py

from ident.fleet import EmbeddedRedis, free_port
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

KEY = "integration-key-0123456789abcdef"
OTHER_KEY = "integration-other-key-0123456789"
LIMITED_KEY = "integration-limited-key-012345678"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
# The gateway's own body limit, below the workers' 25 MiB so that 413 is cheap to reach.
GATEWAY_MAX_PAYLOAD = 1_500_000
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + b"\x00" * 64
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"0" * 256


class GatewayProcess:
    """``python -m ident.serve`` on a free port, as `ident serve` runs it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ident.serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"], env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited {self.process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"the gateway did not answer /healthz: {log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def gateway_env(base: dict[str, str], **ident: object) -> dict[str, str]:
    env = dict(base)
    env.update(IDENT_API_KEYS=f"{KEY},{OTHER_KEY}", IDENT_API_RATE_LIMIT="1000/second",
               IDENT_MAX_PAYLOAD_BYTES=str(GATEWAY_MAX_PAYLOAD), IDENT_GATEWAY_WAIT_S="120")
    env.update({f"IDENT_{name.upper()}": str(value) for name, value in ident.items()})
    return env


@pytest.fixture(scope="module")
def gateway(fleet, fleet_env, logs_dir):
    server = GatewayProcess(gateway_env(fleet_env), logs_dir / "gateway.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=150) as client:
        yield client


@pytest.fixture(scope="module")
def limited_gateway(fleet, fleet_env, logs_dir):
    server = GatewayProcess(gateway_env(fleet_env, api_keys=LIMITED_KEY, api_rate_limit="3/minute"),
                            logs_dir / "gateway-limited.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idle_redis():
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def idle_gateway(idle_redis, fleet_env, logs_dir):
    """A gateway on a Redis that no worker consumes from."""
    server = GatewayProcess(gateway_env(fleet_env, redis_url=idle_redis.url), logs_dir / "gateway-idle.log")
    yield server
    server.stop()


def _read(data_path: Path, relative: str) -> bytes:
    return (data_path / relative).read_bytes()


# --- the surface ---------------------------------------------------------------


def test_openapi_lists_the_endpoints_and_docs_are_open(http):
    paths = set(http.get("/openapi.json").json()["paths"])
    for kind in ("vision", "audio"):
        assert {f"/v1/{kind}/{op}" for op in ("analyze", "verify", "enroll", "identify", "forget")} <= paths
    assert {"/v1/jobs/{job_id}", "/v1/status", "/healthz"} <= paths
    assert http.get("/docs").status_code == 200 and http.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-key-0123456789abcdef"},
                                     {"Authorization": f"Token {KEY}"}])
def test_401_without_a_valid_key(http, headers, data_path, labels):
    photo = _read(data_path, labels["persons"]["barack_obama"][0])
    for method, path, content in (("POST", "/v1/vision/analyze", photo), ("GET", "/v1/status", None),
                                  ("GET", f"/v1/jobs/{uuid.uuid4()}", None)):
        response = http.request(method, path, headers=headers, content=content)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["type"] == "Unauthorized"


def test_the_gateway_process_loads_no_model_library(gateway):
    maps = Path(f"/proc/{gateway.process.pid}/maps").read_text()
    for library in ("numpy", "cv2", "onnxruntime"):
        assert f"/{library}" not in maps, library


def test_status_summarises_the_broadcast(http):
    status = http.get("/v1/status", headers=AUTH).json()
    assert status["queues"]["vision"] == {"workers": 1, "processes": 2, "ready": 2}
    assert status["queues"]["audio"]["ready"] == 1
    assert {w["worker"] for w in status["workers"]} == {"vision-a@itest", "audio-a@itest"}


# --- real jobs -----------------------------------------------------------------


def test_vision_analyze_with_the_photo_as_the_body(http, data_path, labels):
    (entry,) = [e for e in labels["files"] if e["path"] == "images/multi_face/two_people.jpg"]
    response = http.post("/v1/vision/analyze", headers={**AUTH, "Content-Type": "image/jpeg"},
                         content=_read(data_path, entry["path"]))
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["faces"]) == entry["labels"]["face_count"]
    assert len(result["faces"][0]["embedding"]) == 128 and result["execution_provider"] == "CPUExecutionProvider"


def test_vision_analyze_as_a_multipart_file_with_options(http, data_path, labels):
    files = {"file": ("face.jpg", _read(data_path, labels["persons"]["joe_biden"][0]), "image/jpeg")}
    response = http.post("/v1/vision/analyze", headers=AUTH, files=files,
                         data={"options": '{"embed": false, "liveness": false}'})
    assert response.status_code == 200, response.text
    face = response.json()["faces"][0]
    assert face["embedding"] is None and face["liveness"] is None


def test_vision_verify_same_and_different_people(http, data_path, labels):
    obama, biden = labels["persons"]["barack_obama"], labels["persons"]["joe_biden"]
    same = http.post("/v1/vision/verify", headers=AUTH,
                     files={"file_a": _read(data_path, obama[0]), "file_b": _read(data_path, obama[1])}).json()
    other = http.post("/v1/vision/verify", headers=AUTH,
                      files={"file_a": _read(data_path, obama[0]), "file_b": _read(data_path, biden[0])}).json()
    assert same["same_person"] is True and other["same_person"] is False
    assert same["similarity"] > other["similarity"]


def test_audio_analyze_and_verify(http, data_path, labels):
    first, second = labels["speakers"]["librispeech_1688"][:2]
    stranger = labels["speakers"]["librispeech_533"][0]
    analysed = http.post("/v1/audio/analyze", headers=AUTH, content=_read(data_path, first))
    assert analysed.status_code == 200, analysed.text
    result = analysed.json()
    assert result["speech_segments"] and len(result["embedding"]) > 0 and result["spoof"] is not None
    same = http.post("/v1/audio/verify", headers=AUTH,
                     files={"file_a": _read(data_path, first), "file_b": _read(data_path, second)}).json()
    other = http.post("/v1/audio/verify", headers=AUTH,
                      files={"file_a": _read(data_path, first), "file_b": _read(data_path, stranger)}).json()
    assert same["same_speaker"] is True and other["same_speaker"] is False


def test_vision_enroll_identify_forget(http, data_path, labels):
    gallery = f"http-people-{uuid.uuid4().hex[:8]}"
    obama = labels["persons"]["barack_obama"]
    enrolled = http.post("/v1/vision/enroll", headers=AUTH, params={"gallery": gallery, "subject_id": "barack_obama"},
                         content=_read(data_path, obama[0]))
    assert enrolled.status_code == 200, enrolled.text
    assert enrolled.json()["templates"] == 1
    # Fields as form fields this time.
    found = http.post("/v1/vision/identify", headers=AUTH, data={"gallery": gallery},
                      files={"file": _read(data_path, obama[1])}).json()
    assert found["faces"][0]["match"] == "barack_obama"
    stranger = http.post("/v1/vision/identify", headers=AUTH, params={"gallery": gallery},
                         content=_read(data_path, labels["persons"]["jennifer_aniston"][0])).json()
    assert stranger["faces"][0]["match"] is None
    forgotten = http.post("/v1/vision/forget", headers=AUTH, params={"gallery": gallery, "subject_id": "barack_obama"})
    assert forgotten.json()["deleted"] == 1


def test_audio_enroll_and_identify(http, data_path, labels):
    gallery = f"http-voices-{uuid.uuid4().hex[:8]}"
    first, second = labels["speakers"]["librispeech_1998"][:2]
    enrolled = http.post("/v1/audio/enroll", headers=AUTH, params={"gallery": gallery, "subject_id": "s1998"},
                         content=_read(data_path, first))
    assert enrolled.status_code == 200, enrolled.text
    found = http.post("/v1/audio/identify", headers=AUTH, params={"gallery": gallery},
                      content=_read(data_path, second)).json()
    assert found["match"] == "s1998"


# --- every error status ------------------------------------------------------


def test_422_for_the_workers_typed_input_errors(http, data_path, labels):
    no_face = "images/no_face/rocket.jpg"
    face = labels["persons"]["barack_obama"][0]
    response = http.post("/v1/vision/verify", headers=AUTH,
                         files={"file_a": _read(data_path, face), "file_b": _read(data_path, no_face)})
    assert response.status_code == 422 and response.json()["error"]["type"] == "NoFaceFound"
    assert response.json()["error"]["job_id"]
    truncated = _read(data_path, face)[:200]
    response = http.post("/v1/vision/analyze", headers=AUTH, content=truncated)
    assert response.status_code == 422 and response.json()["error"]["type"] == "InvalidInput"
    response = http.post("/v1/vision/analyze", headers=AUTH, params={"options": '{"no_such_option": 1}'},
                         content=_read(data_path, face))
    assert response.status_code == 422 and response.json()["error"]["type"] == "InvalidInput"


def test_415_for_an_unsupported_media_type(http):
    image = http.post("/v1/vision/analyze", headers=AUTH, content=GIF)
    assert image.status_code == 415, image.text
    assert image.json()["error"]["type"] == "UnsupportedMediaType" and "GIF" in image.json()["error"]["message"]
    audio = http.post("/v1/audio/analyze", headers=AUTH, content=PDF)
    assert audio.status_code == 415 and "PDF" in audio.json()["error"]["message"]


def test_413_from_content_length(http):
    response = http.post("/v1/vision/analyze", headers=AUTH, content=b"\xff\xd8\xff" + b"0" * (2 * GATEWAY_MAX_PAYLOAD))
    assert response.status_code == 413 and response.json()["error"]["type"] == "PayloadTooLarge"


def test_413_for_a_chunked_body_before_it_ends(gateway):
    """A chunked body that never ends is answered 413 once it passes the limit: the gateway did not wait for the rest."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/audio/analyze HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {KEY}\r\n"
                      "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n").encode())
        chunk = b"0" * 65536
        sent = 0
        sock.settimeout(0.05)
        answer = b""
        while sent < 4 * GATEWAY_MAX_PAYLOAD and not answer:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                pass
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Cut off within a few chunks past the limit, and long before the 4x the client would have sent.
    assert sent < GATEWAY_MAX_PAYLOAD + 64 * 1024 + 8 * len(chunk)


def test_404_for_a_gallery_that_does_not_exist(http, data_path, labels):
    response = http.post("/v1/vision/identify", headers=AUTH, params={"gallery": f"none-{uuid.uuid4().hex[:8]}"},
                         content=_read(data_path, labels["persons"]["barack_obama"][0]))
    assert response.status_code == 404 and response.json()["error"]["type"] == "GalleryNotFound"


def test_503_with_no_worker_and_nothing_is_sent(idle_gateway, idle_redis, data_path, labels):
    response = httpx.post(f"{idle_gateway.url}/v1/vision/analyze", headers=AUTH, timeout=30,
                          content=_read(data_path, labels["persons"]["barack_obama"][0]))
    assert response.status_code == 503 and response.json()["error"]["type"] == "NoWorker"
    assert response.headers["retry-after"]
    redis = redis_py.Redis.from_url(idle_redis.url)
    assert redis.llen("vision") == 0 and not list(redis.scan_iter("ident:payload:*"))


def test_504_on_a_tiny_wait_then_the_job_is_read_by_id(http, data_path, labels):
    response = http.post("/v1/vision/analyze", headers=AUTH, params={"wait": "0.001"},
                         content=_read(data_path, labels["persons"]["angelina_jolie"][0]))
    assert response.status_code == 504, response.text
    job_id = response.json()["error"]["job_id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert _poll(http, job_id)["state"] == "SUCCESS"


def test_202_then_get_the_job(http, data_path, labels):
    response = http.post("/v1/audio/analyze", headers=AUTH, params={"wait": "0"},
                         content=_read(data_path, labels["speakers"]["librispeech_2414"][0]))
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    first = http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert first["state"] in ("PENDING", "STARTED", "SUCCESS")
    done = _poll(http, job_id)
    assert done["state"] == "SUCCESS" and done["result"]["speech_segments"]


def test_a_failed_job_reads_as_failure_with_its_error(http):
    job_id = http.post("/v1/vision/analyze", headers=AUTH, params={"wait": "0"}, content=GIF).json()["job_id"]
    done = _poll(http, job_id)
    assert done["state"] == "FAILURE" and done["error"]["type"] == "UnsupportedMediaType"


def test_404_for_another_keys_job_and_for_an_unknown_one(http, data_path, labels):
    job_id = http.post("/v1/vision/analyze", headers=AUTH, params={"wait": "0"},
                       content=_read(data_path, labels["persons"]["joe_biden"][1])).json()["job_id"]
    theirs = http.get(f"/v1/jobs/{job_id}", headers=OTHER)
    unknown = http.get(f"/v1/jobs/{uuid.uuid4()}", headers=AUTH)
    assert theirs.status_code == unknown.status_code == 404
    # The same answer either way: the id's existence is not revealed.
    assert theirs.json()["error"]["type"] == unknown.json()["error"]["type"] == "NotFound"
    assert _poll(http, job_id)["state"] == "SUCCESS"


def test_40_calls_in_parallel_are_all_answered(gateway, data_path, labels):
    photos = [_read(data_path, path) for person in ("barack_obama", "joe_biden", "angelina_jolie")
              for path in labels["persons"][person]]
    recordings = [_read(data_path, path) for path in labels["speakers"]["librispeech_1688"]]

    def one(index: int):
        kind, payloads = ("audio", recordings) if index % 4 == 3 else ("vision", photos)
        with httpx.Client(base_url=gateway.url, timeout=300) as client:
            return kind, client.post(f"/v1/{kind}/analyze", headers=AUTH, content=payloads[index % len(payloads)])

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(one, range(40)))
    assert [response.status_code for _kind, response in answers] == [200] * 40
    for kind, response in answers:
        assert ("faces" if kind == "vision" else "speech_segments") in response.json()


def test_429_with_retry_after_over_the_rate_limit(limited_gateway):
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    answers = [httpx.get(f"{limited_gateway.url}/v1/status", headers=headers, timeout=30) for _ in range(4)]
    assert [a.status_code for a in answers[:3]] == [200] * 3
    limited = answers[3]
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "RateLimited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # A request without a valid key is refused before it is counted.
    assert httpx.get(f"{limited_gateway.url}/v1/status", timeout=30).status_code == 401


def _poll(http, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if body["state"] in ("SUCCESS", "FAILURE"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done within {timeout} s")

