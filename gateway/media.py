"""A request's media and fields: the raw body, or a multipart form's parts.

The media is either the whole body (any Content-Type but a form) or a
multipart part named ``file`` (``file_a`` and ``file_b`` for verify); the
other fields (gallery, subject_id, options) come from the query string or,
when the body is a form, from its fields, the query winning when both have one.
The body has already passed gateway/body_limit.py's size check as it streamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.requests import Request

from gateway.errors import INVALID_INPUT, PAYLOAD_TOO_LARGE, ApiError

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass
class Submission:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    def field(self, name: str, required: bool = True) -> str | None:
        value = self.fields.get(name)
        if value is None and required:
            raise ApiError(422, INVALID_INPUT, f"{name!r} is missing: give it as a query parameter or a form field")
        return value

    def media(self, name: str) -> bytes:
        data = self.files.get(name)
        if not data:
            how = ("send it as the request body or as a multipart part named 'file'" if name == "file"
                   else "send a multipart form with the parts 'file_a' and 'file_b'")
            raise ApiError(422, INVALID_INPUT, f"no media in {name!r} (or it is empty): {how}")
        return data

    def options(self) -> dict | None:
        text = self.fields.get("options")
        if text is None or not text.strip():
            return None
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ApiError(422, INVALID_INPUT,
                           'options must be a JSON object, such as {"liveness": false}; see docs/contract.md')
        return value


async def read_submission(request: Request, media_names: tuple[str, ...], max_payload_bytes: int) -> Submission:
    """The request's fields and media; ApiError 422 for a malformed form, 413 for one part over the limit."""
    submission = Submission()
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in FORM_TYPES:
        try:
            form = await request.form(max_files=len(media_names) or 1, max_fields=16)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 -- starlette's parse errors have no common public base
            raise ApiError(422, INVALID_INPUT, f"the form cannot be read: {exc}") from None
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name not in media_names:
                        raise ApiError(422, INVALID_INPUT, f"unexpected file part {name!r}: this endpoint takes "
                                       f"{', '.join(repr(n) for n in media_names) or 'no file'}")
                    submission.files[name] = await value.read()
                else:
                    submission.fields[name] = value
        finally:
            await form.close()
    elif media_names:
        body = await request.body()
        if body:
            submission.files[media_names[0]] = body
    # The query string wins over the form for the same field.
    submission.fields.update({name: value for name, value in request.query_params.items() if name != "wait"})
    for name, data in submission.files.items():
        if len(data) > max_payload_bytes:
            raise ApiError(413, PAYLOAD_TOO_LARGE, f"{name!r} is {len(data)} bytes, over IDENT_MAX_PAYLOAD_BYTES "
                           f"({max_payload_bytes}): send a smaller file")
    return submission
