"""Every error the gateway answers, and the one table from a job's typed error to its HTTP status.

A failed job comes back through Celery's result with its exception's type name
and message (docs/contract.md, "Errors"); the gateway matches on the name, as a
producer without this package must, so the table below also covers errors
that are not in tasks/errors.py (Celery's time limits).
"""

from __future__ import annotations

# The job's error type -> the HTTP status the caller gets. Anything not listed
# is a 500 whose message is not passed on (it was not written for callers).
STATUS_BY_ERROR_TYPE: dict[str, int] = {
    # The caller's input: sending the same again cannot work.
    "InvalidInput": 422,
    "LimitExceeded": 422,
    "EnrollmentRefused": 422,
    "NoFaceFound": 422,
    "NoSpeechFound": 422,
    # The gallery exists but holds the other modality's or another model's templates.
    "GalleryMismatch": 409,
    "GalleryNotFound": 404,
    # The fleet, not the caller: try again later.
    "GalleryUnavailable": 503,
    "ModelUnavailable": 503,
    "DeviceUnavailable": 503,
    "ConfigurationError": 503,
    # Over IDENT_TASK_SOFT_TIME_LIMIT / IDENT_TASK_TIME_LIMIT in the worker.
    "SoftTimeLimitExceeded": 504,
    "TimeLimitExceeded": 504,
    "PoisonMessage": 500,
}

# Errors the gateway raises itself (no job involved), by the type named in the body.
UNSUPPORTED_MEDIA = "UnsupportedMediaType"
PAYLOAD_TOO_LARGE = "PayloadTooLarge"
UNAUTHORIZED = "Unauthorized"
RATE_LIMITED = "RateLimited"
NOT_FOUND = "NotFound"
NO_WORKER = "NoWorker"
TIMEOUT = "Timeout"
INVALID_INPUT = "InvalidInput"

# How the workers word a payload of a format they do not take (both are
# InvalidInput, like a truncated file of a format they do take): the vision
# worker's sniff_format (workers/vision/imaging.py) and the audio decoder
# (workers/audio/decoding.py), whose message ends with workers/formats.py's
# describe(). tests/gateway/test_errors.py runs the workers' own code on a GIF
# and on a PDF to keep these in step.
_VISION_UNSUPPORTED = "not a JPEG, PNG, WebP or BMP image ("
_AUDIO_UNREADABLE = "is not a readable audio file"
# describe()'s names of the formats the audio decoder does read: an unreadable
# file of one of these is broken (422), not of the wrong type (415).
_AUDIO_FORMATS = ("a WAV audio file", "a FLAC audio file", "an Ogg media file", "an MP3 audio file")


class ApiError(Exception):
    """An answer other than success: the status, the error's type and a message that says what to do."""

    def __init__(self, status: int, error_type: str, message: str, *, headers: dict[str, str] | None = None,
                 job_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}
        self.job_id = job_id

    def body(self) -> dict:
        error = {"type": self.error_type, "message": self.message}
        if self.job_id is not None:
            error["job_id"] = self.job_id
        return {"error": error}


def is_unsupported_media(error_type: str, message: str) -> bool:
    """Whether a worker's InvalidInput says the payload is of a format it does not take at all."""
    if error_type != "InvalidInput":
        return False
    if message.startswith(_VISION_UNSUPPORTED):
        return True
    return _AUDIO_UNREADABLE in message and not any(f"(it looks like {name}" in message for name in _AUDIO_FORMATS)


def status_for(error_type: str, message: str) -> int:
    if is_unsupported_media(error_type, message):
        return 415
    return STATUS_BY_ERROR_TYPE.get(error_type, 500)


def job_error(error_type: str, message: str, job_id: str | None = None) -> ApiError:
    """A failed job as the caller sees it: typed errors keep their name and message, others are not passed on."""
    status = status_for(error_type, message)
    if error_type not in STATUS_BY_ERROR_TYPE and status == 500:
        # An unexpected exception's text may quote internals; the worker's log has it.
        message = f"the job failed with {error_type}; the worker's log has the details"
    if status == 415:
        error_type = UNSUPPORTED_MEDIA
    return ApiError(status, error_type, message, job_id=job_id)


def error_description(error_type: str, message: str) -> dict:
    """{"type", "message"} of a failed job, for GET /v1/jobs/{id}."""
    return job_error(error_type, message).body()["error"]
