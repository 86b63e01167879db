"""Typed errors of the public contract.

Workers raise these; Celery carries the type name and message back to the
producer (``AsyncResult.get()`` re-raises an exception of the same name even
when the producer does not install this package). Every message says what was
wrong and what to do about it.
"""

from __future__ import annotations


class IdentError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidInput(IdentError):
    """The payload cannot be used: empty, undecodable, truncated or of a wrong type.

    The producer should not retry the same bytes.
    """


class LimitExceeded(InvalidInput):
    """The payload is over a configured limit (bytes, pixels, seconds).

    The message names the ``IDENT_*`` variable and by how much it was exceeded.
    """

    @classmethod
    def check(cls, what: str, value: float, limit: float, env_var: str, unit: str = "") -> None:
        """Raise when ``value`` is over ``limit``; the message carries both and the ratio."""
        if value > limit:
            suffix = f" {unit}" if unit else ""
            raise cls(
                f"{what} is {value:g}{suffix}, over the limit of {limit:g}{suffix} "
                f"({value / limit:.2f}x; raise {env_var} to allow it)"
            )


class NoFaceFound(IdentError):
    """A 1:1 face comparison was asked for an image in which no face was found."""


class EnrollmentRefused(InvalidInput):
    """A gallery enrolment whose media cannot make a trustworthy template.

    The message says why: no face, more than one face (and how many), a face
    too small, liveness or anti-spoofing calling it a spoof, too little speech.
    Nothing was stored; send other media.
    """


class GalleryNotFound(IdentError):
    """identify or forget named a gallery that does not exist (enrolling into it creates it)."""


class GalleryMismatch(IdentError):
    """A gallery holds another modality's or another model's templates than this worker makes.

    Templates of different models cannot be compared: re-enrol the gallery's
    subjects with the worker's model, or run a worker with the gallery's model.
    """


class GalleryUnavailable(IdentError):
    """The gallery database cannot be used: unreachable, or it cannot compute vector distances.

    The job was not done (nothing enrolled, nothing forgotten); the worker
    keeps serving other jobs and reconnects on the next gallery job.
    """


class NoSpeechFound(IdentError):
    """A 1:1 speaker comparison was asked for a recording with no speech in it."""


class PoisonMessage(IdentError):
    """A job killed its worker process on every delivery and was given up."""


class ConfigurationError(IdentError):
    """An ``IDENT_*`` variable holds a value that cannot work."""


class ModelUnavailable(IdentError):
    """A catalog model file is missing, or its sha256 does not match the catalog."""


class DeviceUnavailable(IdentError):
    """``IDENT_DEVICE=cuda`` was asked for and the CUDA execution provider cannot run."""
