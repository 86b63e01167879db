"""What a gallery name and a subject id may be (galleries/names.py), and that the store asks it first."""

from __future__ import annotations

import numpy as np
import pytest

from galleries.names import MAX_NAME_LENGTH, checked_name
from tasks.errors import GalleryNotFound, InvalidInput

from .conftest import FACE, unit_vectors


@pytest.mark.parametrize("value", [
    "a",
    "front-door",
    "José Ñúñez",
    "Łódź staff 2024",
    "山田太郎",
    "مريم",
    "Zoë 🙂",
    "with spaces inside",
    "x" * MAX_NAME_LENGTH,
    "é" * MAX_NAME_LENGTH,  # the limit counts characters, not UTF-8 bytes
])
def test_printable_names_are_accepted_unchanged(value):
    assert checked_name(value, "gallery name") == value


@pytest.mark.parametrize("value", ["", " ", "   ", "\t", "\n\n", "\u3000"])
def test_empty_and_whitespace_only_names_are_refused(value):
    with pytest.raises(InvalidInput, match="gallery name is empty"):
        checked_name(value, "gallery name")


def test_a_name_over_128_characters_is_refused_with_its_length():
    with pytest.raises(InvalidInput, match=r"subject_id is 129 characters long, over the limit of 128"):
        checked_name("x" * 129, "subject_id")


@pytest.mark.parametrize(("value", "code", "position"), [
    ("line\nbreak", "U+000A", 4),
    ("nul\x00byte", "U+0000", 3),
    ("\x1b[31mred", "U+001B", 0),
    ("tab\tinside", "U+0009", 3),
    ("del\x7f", "U+007F", 3),
    ("admin\u202etxt.exe", "U+202E", 5),  # right-to-left override: prints as another name
    ("zero\u200bwidth", "U+200B", 4),
    ("bom\ufeff", "U+FEFF", 3),
    ("lone\ud800surrogate", "U+D800", 4),
    ("private\ue000use", "U+E000", 7),
    ("unassigned\u0378", "U+0378", 10),
])
def test_control_format_and_unassigned_characters_are_refused_where_they_are(value, code, position):
    with pytest.raises(InvalidInput) as refused:
        checked_name(value, "subject_id")
    message = str(refused.value)
    assert message.startswith("subject_id holds a control or unassigned character")
    assert f"({code}) at position {position}" in message


@pytest.mark.parametrize(("value", "type_name"), [
    (None, "NoneType"), (5, "int"), (b"bytes", "bytes"), (["a"], "list"), (3.5, "float"),
])
def test_a_name_that_is_not_a_string_is_refused(value, type_name):
    with pytest.raises(InvalidInput, match=f"gallery name must be a string, got {type_name}"):
        checked_name(value, "gallery name")


def test_the_store_refuses_a_bad_name_before_it_creates_anything(store, names, rng):
    gallery = names()
    vector = unit_vectors(rng, 1)[0]
    with pytest.raises(InvalidInput, match="gallery name holds a control"):
        store.enroll(gallery + "\n", "alice", vector, FACE, "src")
    with pytest.raises(InvalidInput, match="subject_id is empty"):
        store.enroll(gallery, "  ", vector, FACE, "src")
    with pytest.raises(InvalidInput, match="gallery name must be a string"):
        store.identify(None, [vector], FACE)
    with pytest.raises(InvalidInput, match="subject_id holds a control"):
        store.forget(gallery, "bob\x00", "vision")
    # The refused enrolment did not make the gallery.
    with pytest.raises(GalleryNotFound):
        store.stats(gallery)
    assert gallery not in [row["name"] for row in store.galleries()]


def test_unicode_names_work_end_to_end(store, names, rng):
    gallery = "Galería " + names("ñ")
    vectors = unit_vectors(rng, 2)
    store.enroll(gallery, "José Ñúñez", vectors[0], FACE, "s1")
    store.enroll(gallery, "山田太郎", vectors[1], FACE, "s1")
    _, (candidates,) = store.identify(gallery, [vectors[0]], FACE, top_k=2)
    assert [c.subject_id for c in candidates] == ["José Ñúñez", "山田太郎"]
    assert store.forget(gallery, "José Ñúñez", "vision") == 1
    assert store.stats(gallery)["subjects"] == 1
    assert np.isclose(candidates[0].score, 1.0, atol=1e-6)
