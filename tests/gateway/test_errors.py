"""One table from a job's typed error to its HTTP status, checked against the workers' own refusals."""

from __future__ import annotations

import io
import wave

import pytest

from gateway.errors import STATUS_BY_ERROR_TYPE, is_unsupported_media, job_error, status_for
from tasks import errors


@pytest.mark.parametrize("error_type, status", [
    ("InvalidInput", 422), ("LimitExceeded", 422), ("EnrollmentRefused", 422), ("NoFaceFound", 422),
    ("NoSpeechFound", 422), ("GalleryNotFound", 404), ("GalleryUnavailable", 503), ("GalleryMismatch", 409),
    ("SoftTimeLimitExceeded", 504), ("PoisonMessage", 500), ("KeyError", 500),
])
def test_status_by_type(error_type, status):
    assert status_for(error_type, "whatever") == status


def test_every_typed_error_of_the_contract_has_a_status():
    typed = {cls.__name__ for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.IdentError) and cls is not errors.IdentError}
    assert typed <= set(STATUS_BY_ERROR_TYPE)


def test_an_unexpected_errors_message_is_not_passed_on():
    error = job_error("ZeroDivisionError", "/srv/app/secret/path.py: division by zero", job_id="j1")
    assert error.status == 500 and "secret" not in error.message and error.body()["error"]["job_id"] == "j1"


def test_a_typed_errors_message_is_passed_on():
    error = job_error("GalleryNotFound", "gallery 'x' does not exist")
    assert error.body() == {"error": {"type": "GalleryNotFound", "message": "gallery 'x' does not exist"}}


def _worker_refusal(function, payload: bytes) -> str:
    with pytest.raises(errors.InvalidInput) as caught:
        function(payload)
    return str(caught.value)


GIF = b"GIF89a" + b"\x00" * 64
PDF = b"%PDF-1.7\n" + b"\x00" * 256


def _wav_truncated() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(b"\x00\x01" * 16000)
    return buffer.getvalue()[:40]


def test_the_vision_workers_refusal_of_another_format_is_415():
    from workers.vision.imaging import sniff_format

    message = _worker_refusal(sniff_format, GIF)
    assert is_unsupported_media("InvalidInput", message) and job_error("InvalidInput", message).status == 415


def test_the_audio_workers_refusal_of_another_format_is_415_but_a_broken_wav_is_422():
    from workers.audio.decoding import decode

    def decoded(payload):
        return decode(payload, 600.0)

    assert status_for("InvalidInput", _worker_refusal(decoded, PDF)) == 415
    assert status_for("InvalidInput", _worker_refusal(decoded, GIF)) == 415
    assert status_for("InvalidInput", _worker_refusal(decoded, _wav_truncated())) == 422
    # An empty payload is invalid input, not a wrong format.
    assert status_for("InvalidInput", _worker_refusal(decoded, b"")) == 422
