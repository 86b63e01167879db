"""Keep biometric data out of worker logs and monitoring events.

Faces and voices are biometric data: no payload byte, embedding or landmark
array may reach a log at any level, nor an event (what Flower shows). What
stands in the way by default, and what is done about it:

* Celery logs every task's return value on success (embeddings included):
  the filter below drops it from the success line.
* The result's repr also rides on the ``task-succeeded`` event: the tracer's
  ``saferepr`` is given redacted results (sizes instead of arrays; installed
  by workers/celery_internals.py).
* A producer that does not set ``argsrepr`` (plain ``send_task``) gets one
  made by Celery from the arguments: a repr of the payload, which the worker
  logs, sends in ``task-received`` events and answers to ``inspect``. The
  worker rebuilds ``argsrepr`` and ``kwargsrepr`` from the arguments,
  redacted (``SafeRequest`` in workers/celery_internals.py, the request class
  of every fleet task).
* Debug and error logs print message headers and bodies (``TaskPool: Apply``,
  undecodable or unknown messages): a filter on every handler replaces bytes,
  long numeric sequences and text that holds a bytes literal or a long base64
  run, in a record's arguments, its message and its traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from celery.utils.saferepr import saferepr

_MAX_NUMBERS = 16
# Arguments shown in argsrepr: longer text is a base64 payload.
_MAX_ARGUMENT_TEXT = 64
# b'... or b"... not preceded by a word character or a quote: a bytes literal
# inside a repr (but not the string 'b' of a dict key).
_BYTES_LITERAL = re.compile(r"(?<![\w'\"])b['\"]")
# A run of base64 characters long enough to carry 36 bytes of a payload.
_BASE64_MIN = 48
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{%d,}" % _BASE64_MIN)
_DIGIT = re.compile(r"[0-9]")


_PLAIN_SCALARS = (int, float, bool, type(None))


def redact(value):
    """A log-safe stand-in for ``value``: sizes instead of contents."""
    kind = type(value)
    # Exact types first: a result holds dozens of values, and ABC checks are slow.
    if kind in _PLAIN_SCALARS:
        return value
    if kind is dict or isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_NUMBERS or any(isinstance(v, (list, tuple, bytes, bytearray, Mapping)) for v in value):
            return f"<{type(value).__name__} of {len(value)} items>"
        return value
    if isinstance(value, str):
        if holds_payload(value):
            # A repr of a message (TaskPool: Apply, undecodable bodies): keep what comes before the bytes.
            return scrub(value)
        if len(value) > 512:
            # Long text in an argument is a base64 payload or a serialized result.
            return f"<{len(value)} characters>"
    return value


def holds_payload(text: str) -> bool:
    """Whether ``text`` shows raw bytes (a bytes literal) or a base64-encoded run of them."""
    if len(text) < _BASE64_MIN and "b'" not in text and 'b"' not in text:
        return False  # the common case, a short plain string, without a regex (every result holds dozens)
    if _BYTES_LITERAL.search(text):
        return True
    for run in _BASE64_RUN.findall(text):
        # Base64 of binary data mixes cases and digits; paths, words and hex digests do not.
        if run != run.lower() and run != run.upper() and _DIGIT.search(run):
            return True
    return False


def scrub(text: str) -> str:
    """``text`` up to the first trace of payload, then only how much was left out."""
    cut = len(text)
    match = _BYTES_LITERAL.search(text)
    if match:
        cut = match.start()
    for run in _BASE64_RUN.finditer(text):
        if holds_payload(run.group()):
            cut = min(cut, run.start())
            break
    if cut == len(text):
        return text
    return f"{text[:cut]}<{len(text) - cut} characters withheld: they may hold payload bytes>"


def redact_arguments(args) -> tuple:
    """A task's positional arguments for display: payloads become sizes."""
    return tuple(redact_argument(value) for value in (args or ()))


def redact_argument(value):
    if isinstance(value, str) and len(value) > _MAX_ARGUMENT_TEXT:
        return f"<{len(value)} characters>"
    if isinstance(value, Mapping):
        return {key: redact_argument(item) for key, item in value.items()}
    return redact(value)


_SCALARS = (int, float, type(None))


def _plain_text(text: str) -> bool:
    """Text that repr() writes as saferepr does: saferepr keeps control characters and backslashes
    as they are and escapes a quote where repr switches to double quotes."""
    return text.isprintable() and "'" not in text and "\\" not in text


def _nests_plainly(value, levels: int) -> bool:
    """Only dicts with plain text keys, lists, tuples and scalars, at most ``levels`` containers deep."""
    if isinstance(value, str):
        return _plain_text(value)
    if isinstance(value, _SCALARS):
        return True
    if levels == 0:
        return False
    if type(value) is dict:
        return all(type(key) is str and _plain_text(key) and _nests_plainly(item, levels - 1)
                   for key, item in value.items())
    if type(value) in (list, tuple):
        return all(_nests_plainly(item, levels - 1) for item in value)
    return False


def redacted_saferepr(value, maxlen=None, maxlevels=3, seen=None):
    redacted = _redacted_as_shown(value, maxlen) if maxlen is not None and type(value) is dict else redact(value)
    # Celery's saferepr writes its text token by token: 0.2 ms of a pool
    # process's CPU for every vision result. For a redacted result (a small
    # tree of plain values) the builtin repr writes the same text, ~10x faster;
    # anything deeper, longer or less plain still goes through saferepr.
    if _nests_plainly(redacted, maxlevels):
        text = repr(redacted)
        if maxlen is None or len(text) <= maxlen:
            return text
    return saferepr(redacted, maxlen, maxlevels, seen)




def _redacted_as_shown(value: dict, maxlen: int) -> dict:
    """``redact(value)`` as far as ``saferepr(..., maxlen)`` shows it; past that, the items as they are.

    Celery's saferepr stops once its text reaches ``maxlen`` and shows only
    the closing brackets after that, so the items it never reaches need no
    redaction: a 2 KB status result is shown to 256 characters, and redacting
    the rest cost more than all of the task's own work. Each item's width
    counted here is at most what saferepr writes for it; where saferepr might
    shorten a text (a long key or string near the limit), everything is redacted.
    """
    shown: dict = {}
    used = 1  # "{"
    items = iter(value.items())
    for index, (key, item) in enumerate(items):
        redacted = shown[key] = redact(item)
        key_width = _shown_width(key, maxlen - used)
        value_width = None if key_width is None else _shown_width(redacted, maxlen - used - key_width)
        if value_width is None:
            return redact(value)
        used += (2 if index else 0) + key_width + 2 + value_width  # ", " key ": " value
        if used >= maxlen:
            shown.update(items)  # never shown
            return shown
    return shown


def _shown_width(value, room: int) -> int | None:
    """The least saferepr writes for ``value``; None when it might shorten it to fit ``room``."""
    kind = type(value)
    if kind is str:
        width = len(value) + 2
    elif kind in (int, float, bool):
        width = len(str(value))
    elif value is None:
        width = 4
    elif kind in (dict, list, tuple):
        return 2
    else:
        return 0
    return width if width < room - 3 else None


# Celery's success line, "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
# without the return value.
SUCCESS_LINE = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


class RedactBiometrics(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping) and "return_value" in record.args and "%(return_value)" in str(record.msg):
            record.msg = SUCCESS_LINE
            record.args = {key: value for key, value in record.args.items() if key != "return_value"}
        if record.args:
            if isinstance(record.args, Mapping):
                record.args = {key: redact(value) for key, value in record.args.items()}
            else:
                record.args = tuple(redact(value) for value in record.args)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a broken record is the handler's to report
            return True
        if holds_payload(message):
            record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            try:
                text = logging.Formatter().formatException(record.exc_info)
            except Exception:  # noqa: BLE001 -- leave it to the handler's formatter
                return True
            if holds_payload(text):
                record.exc_text = scrub(text)
        return True


_FILTER = RedactBiometrics()


def install(logger=None, **kwargs) -> None:
    """Attach the filter to every handler of ``logger`` and of the root logger."""
    for target in {logger or logging.getLogger(), logging.getLogger()}:
        for handler in target.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
