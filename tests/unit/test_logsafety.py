import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.logsafety import RedactBiometrics, redact


def test_payloads_and_embeddings_are_replaced_by_sizes():
    assert redact(b"\xff\xd8secret") == "<8 bytes>"
    assert redact([0.1] * 128) == "<list of 128 items>"
    assert redact({"embedding": [0.5] * 192, "score": 0.9}) == {"embedding": "<list of 192 items>", "score": 0.9}
    assert redact([[1.0, 2.0]] * 5) == "<list of 5 items>"
    assert redact("x" * 1000) == "<1000 characters>"
    assert redact((1, "vision")) == (1, "vision")


def test_filter_rewrites_record_arguments():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "got %r and %s", (b"\x00" * 50, [0.25] * 64), None)
    RedactBiometrics().filter(record)
    assert record.getMessage() == "got '<50 bytes>' and <list of 64 items>"


def test_text_showing_payload_bytes_is_recognised():
    from workers.logsafety import holds_payload, scrub

    assert holds_payload("(b'\\xff\\xd8\\xff\\xe0', None)")
    assert holds_payload("{'argsrepr': \"[b'52494646']\"}")
    assert holds_payload("('/9j/4AAQSkZJRgABAQEASABIAAD/4gJASUNDX1BST0ZJTEUAAQEAAAIw', None)")
    # Not payloads: a dict key 'b', paths, hex digests, plain words.
    assert not holds_payload("{'b': 1, 'a': 2}")
    assert not holds_payload("/work/main/.venv/lib/python3.11/site-packages/celery/app/trace.py")
    assert not holds_payload("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert scrub("Apply (args:('vision.analyze', b'\\xff\\xd8'))") == (
        "Apply (args:('vision.analyze', <13 characters withheld: they may hold payload bytes>"
    )


def test_filter_scrubs_preformatted_messages():
    text = "TaskPool: Apply (args:('vision.analyze', 'id-1', {'lang': 'py'}, b'\\x92\\x91\\xc4\\x10JFIF'))"
    record = logging.LogRecord("t", logging.DEBUG, __file__, 1, "%s", (text,), None)
    RedactBiometrics().filter(record)
    message = record.getMessage()
    assert message.startswith("TaskPool: Apply (args:('vision.analyze', 'id-1'") and "JFIF" not in message


def test_argument_reprs_show_sizes():
    from workers.logsafety import redact_arguments

    assert redact_arguments((b"\xff" * 10, None)) == ("<10 bytes>", None)
    assert redact_arguments(("QUJD" * 40, {"max_faces": 2})) == ("<160 characters>", {"max_faces": 2})
    assert redact_arguments(({"payload_ref": "ident:payload:abc"},)) == ({"payload_ref": "ident:payload:abc"},)


def test_the_tracers_result_repr_is_celerys_saferepr_of_the_redacted_result():
    from celery.utils.saferepr import saferepr

    from workers.logsafety import redacted_saferepr as _redacted_saferepr

    results = [
        {"faces": [{"embedding": [0.1] * 512, "box": [1, 2, 3, 4]}], "image": {"width": 640, "height": 427},
         "timings_ms": {"total": 12.5}, "execution_provider": "CPUExecutionProvider", "message": None},
        {"faces": [], "score": float("nan"), "flags": (True, False), "name": "x" * 500},
        {"a": {"b": {"c": {"d": 1}}}},  # deeper than Celery shows
        {"long": ["y" * 400] * 3},  # longer than the limit
        {1: "an int key", "set": {1, 2}},  # not plain
        b"\xff\xd8 payload",
        [0.25] * 64,
    ]
    for result in results:
        assert _redacted_saferepr(result, 1024) == saferepr(redact(result), 1024)
        assert _redacted_saferepr(result) == saferepr(redact(result))


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT | st.binary(max_size=40)
_VALUES = st.recursive(_LEAVES, lambda children: st.lists(children, max_size=6) | st.tuples(children, children)
                       | st.dictionaries(_TEXT, children, max_size=6), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(result=st.dictionaries(_TEXT | st.integers(), _VALUES, max_size=12),
       maxlen=st.integers(min_value=0, max_value=600))
def test_the_shortened_redaction_shows_exactly_what_redacting_everything_shows(result, maxlen):
    """Past what saferepr shows of a result, items are left unredacted (they are never rendered):
    the text must be the same as if everything had been redacted, for any result and any limit."""
    from celery.utils.saferepr import saferepr

    from workers.logsafety import redacted_saferepr

    assert redacted_saferepr(result, maxlen) == saferepr(redact(result), maxlen)
