"""What a gallery name and a subject id may be: 1-128 characters, none of them a control character."""

from __future__ import annotations

import unicodedata

from tasks.errors import InvalidInput

MAX_NAME_LENGTH = 128


def checked_name(value: object, what: str) -> str:
    """``value`` if it can name a gallery or a subject, else InvalidInput saying why.

    Control and format characters (newlines, NUL, bidi overrides) are refused:
    they would corrupt logs and tables and make two different names print alike.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInput(f"{what} is empty: give 1 to {MAX_NAME_LENGTH} printable characters")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{what} is {len(value)} characters long, over the limit of {MAX_NAME_LENGTH}")
    for position, char in enumerate(value):
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise InvalidInput(
                f"{what} holds a control or unassigned character (U+{ord(char):04X}) at position {position}: "
                "use printable characters only"
            )
    return value
