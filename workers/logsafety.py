"""Keep biometric data out of worker logs.

Faces and voices are biometric data: no payload byte, embedding or landmark
array may reach a log at any level. Two things stand in the way by default:
Celery logs every task's return value on success (the whole result, embeddings
included), and its debug logs print task arguments (the payload). The success
line is shortened, and a filter on every handler replaces any bytes or long
numeric sequence in a log record's arguments with a size placeholder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from celery.app import trace

# Celery's default success line ends in ": %(return_value)s".
trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"

_MAX_NUMBERS = 16


def redact(value):
    """A log-safe stand-in for ``value``: sizes instead of contents."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_NUMBERS or any(isinstance(v, (list, tuple, bytes, bytearray, Mapping)) for v in value):
            return f"<{type(value).__name__} of {len(value)} items>"
        return value
    if isinstance(value, str) and len(value) > 512:
        # Long text in an argument is a base64 payload or a serialized result.
        return f"<{len(value)} characters>"
    return value


class RedactBiometrics(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            if isinstance(record.args, Mapping):
                record.args = {key: redact(value) for key, value in record.args.items()}
            else:
                record.args = tuple(redact(value) for value in record.args)
        return True


_FILTER = RedactBiometrics()


def install(logger=None, **kwargs) -> None:
    """Attach the filter to every handler of ``logger`` and of the root logger."""
    for target in {logger or logging.getLogger(), logging.getLogger()}:
        for handler in target.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
