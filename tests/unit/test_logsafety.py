import logging

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
