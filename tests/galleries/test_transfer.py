"""Gallery export and import files, against a real embedded PostgreSQL with pgvector."""

from __future__ import annotations

import base64
import json
import stat

import numpy as np
import pytest

from galleries import embedded, transfer
from galleries.database import Database
from galleries.store import EmbeddingModel, GalleryStore
from tasks.errors import GalleryMismatch, GalleryNotFound, InvalidInput

MODEL = EmbeddingModel("transfer_test_model", "a" * 64, 16, "vision")
OTHER_MODEL = EmbeddingModel("transfer_other_model", "b" * 64, 16, "vision")
VOICE_MODEL = EmbeddingModel("transfer_voice_model", "c" * 64, 16, "audio")


@pytest.fixture(scope="module")
def transfer_store(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("transfer-db")
    database = Database("", data_dir)
    try:
        yield GalleryStore(database)
    finally:
        database.close()
        embedded.stop(data_dir)


@pytest.fixture
def gallery(transfer_store, request) -> tuple[str, dict[tuple[str, str], np.ndarray]]:
    """A gallery of 4 subjects, 7 templates, with a threshold: its name and templates."""
    name = f"source-{request.node.name}"[:100]
    rng = np.random.default_rng(7)
    templates = {}
    for index, subject in enumerate(["alice", "bob", "Zoë Ünicode", "dave"]):
        for take in range(1 + index % 3):
            vector = rng.standard_normal(MODEL.dimensions).astype(np.float32)
            vector[0] = np.float32(1e-42) if take == 1 else vector[0]  # a subnormal float32 survives too
            source = f"sha256:{subject.encode().hex()[:20]:0<64}"[:71] if take == 0 else f"sha256:{take:064x}"
            transfer_store.enroll(name, subject, vector, MODEL, source)
            templates[(subject, source)] = vector
    transfer_store.set_threshold(name, 0.42)
    return name, templates


def exported(store: GalleryStore, name: str) -> dict[tuple[str, str], np.ndarray]:
    _gallery, rows = store.export_rows(name)
    return {(subject, source): embedding for subject, source, embedding, _when in rows}


def test_round_trip_into_another_name_keeps_every_float32_exactly(transfer_store, gallery, tmp_path):
    name, templates = gallery
    path = tmp_path / "staff.jsonl"
    ticks = []
    assert transfer.export_gallery(transfer_store, name, path, ticks.append) == len(templates) == 7
    assert sum(ticks) == 7
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "biometric templates are not world-readable"
    assert not list(tmp_path.glob(".*partial")), "no temporary file is left beside it"

    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header == {"format": "identification-gallery", "version": 1, "name": name, "modality": "vision",
                      "model": MODEL.key, "model_sha256": MODEL.sha256, "dimensions": 16, "threshold": 0.42}
    first = json.loads(lines[1])
    assert set(first) == {"subject_id", "source", "enrolled_at", "embedding"}
    assert np.array_equal(np.frombuffer(base64.b64decode(first["embedding"]), "<f4"),
                          templates[(first["subject_id"], first["source"])])

    imported = transfer.import_gallery(transfer_store, "copy-of-" + name, path)
    assert (imported.templates, imported.added, imported.skipped, imported.created) == (7, 7, 0, True)
    copy = transfer_store.gallery("copy-of-" + name)
    assert (copy.model, copy.model_sha256, copy.dimensions, copy.modality, copy.threshold) == (
        MODEL.key, MODEL.sha256, 16, "vision", pytest.approx(0.42))
    again = exported(transfer_store, "copy-of-" + name)
    assert set(again) == set(templates)
    for key, vector in templates.items():
        assert again[key].dtype == np.float32
        assert np.array_equal(again[key], vector), key
    stats = transfer_store.stats("copy-of-" + name)
    assert (stats["subjects"], stats["templates"]) == (4, 7)


def test_importing_again_adds_nothing_and_a_partial_import_is_completed(transfer_store, gallery, tmp_path,
                                                                        monkeypatch):
    name, templates = gallery
    path = tmp_path / "g.jsonl"
    transfer.export_gallery(transfer_store, name, path)
    # Three chunks of 3 templates: each committed on its own.
    monkeypatch.setattr(transfer, "CHUNK_TEMPLATES", 3)
    partial = tmp_path / "first-four.jsonl"
    partial.write_text("".join(path.read_text().splitlines(keepends=True)[:5]))
    target = "resumed-" + name
    assert transfer.import_gallery(transfer_store, target, partial).added == 4
    resumed = transfer.import_gallery(transfer_store, target, path)
    assert (resumed.templates, resumed.added, resumed.skipped, resumed.created) == (7, 3, 4, False)
    again = transfer.import_gallery(transfer_store, target, path)
    assert (again.added, again.skipped) == (0, 7)
    assert transfer_store.stats(target)["templates"] == 7
    # Into the gallery it came from: everything is there already.
    assert transfer.import_gallery(transfer_store, name, path).added == 0
    assert set(exported(transfer_store, target)) == set(templates)


def test_an_import_into_a_gallery_of_another_model_or_modality_is_refused(transfer_store, gallery, tmp_path):
    name, _templates = gallery
    path = tmp_path / "g.jsonl"
    transfer.export_gallery(transfer_store, name, path)
    other = "other-model-" + name
    transfer_store.enroll(other, "erin", np.ones(16, np.float32), OTHER_MODEL, "sha256:" + "e" * 64)
    with pytest.raises(GalleryMismatch, match="templates of different models cannot be compared"):
        transfer.import_gallery(transfer_store, other, path)
    voices = "voices-" + name
    transfer_store.enroll(voices, "erin", np.ones(16, np.float32), VOICE_MODEL, "sha256:" + "e" * 64)
    with pytest.raises(GalleryMismatch, match="holds audio templates"):
        transfer.import_gallery(transfer_store, voices, path)
    assert transfer_store.stats(other)["templates"] == 1 and transfer_store.stats(voices)["templates"] == 1


def _good_header(**changes) -> str:
    header = {"format": "identification-gallery", "version": 1, "name": "g", "modality": "vision",
              "model": MODEL.key, "model_sha256": MODEL.sha256, "dimensions": 16, "threshold": None}
    header.update(changes)
    return json.dumps({k: v for k, v in header.items() if v != "<drop>"})


def _good_row(**changes) -> str:
    row = {"subject_id": "alice", "source": "sha256:" + "1" * 64, "enrolled_at": "2025-01-02T03:04:05+00:00",
           "embedding": base64.b64encode(np.arange(1, 17, dtype="<f4").tobytes()).decode()}
    row.update(changes)
    return json.dumps({k: v for k, v in row.items() if v != "<drop>"})


@pytest.mark.parametrize(("header", "message"), [
    ("", "is empty"),
    ("not json", "line 1: not JSON"),
    ("[1, 2]", "line 1: a JSON list"),
    (_good_header(format="something-else"), "line 1: not a gallery file"),
    (_good_header(version=2), "line 1: format version '2' is not one this ident reads"),
    (_good_header(version=True), "line 1: format version"),
    (_good_header(dimensions="<drop>"), "line 1: the header lacks 'dimensions'"),
    (_good_header(extra=1), "line 1: the header has unknown field(s) 'extra'"),
    (_good_header(modality="smell"), "line 1: modality 'smell'"),
    (_good_header(model_sha256="ABC"), "line 1: model_sha256 must be 64 lowercase hex"),
    (_good_header(dimensions=0), "line 1: dimensions must be a whole number"),
    (_good_header(dimensions=16.0), "line 1: dimensions must be a whole number"),
    (_good_header(threshold=1.5), "line 1: threshold must be null or a cosine similarity"),
    (_good_header(name="bad\nname"), "line 1: the header's name holds a control"),
    ('{"format": "identification-gallery", "version": 1, "threshold": NaN}', "line 1: not JSON"),
])
def test_a_bad_header_is_refused_naming_line_1(transfer_store, tmp_path, header, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(header + ("\n" + _good_row() + "\n" if header else ""))
    with pytest.raises(InvalidInput, match="line 1: " if header else "is empty") as raised:
        transfer.import_gallery(transfer_store, "never-created", path)
    assert message in str(raised.value) and str(path) in str(raised.value)
    with pytest.raises(GalleryNotFound):
        transfer_store.gallery("never-created")


@pytest.mark.parametrize(("bad_line", "message"), [
    ("{not json", "not JSON"),
    ("", "empty; every line of a gallery file is one JSON object"),
    ('"a string"', "a JSON str where a template (an object) was expected"),
    (_good_row(embedding="not base64!"), "embedding is not valid base64"),
    (_good_row(embedding=base64.b64encode(b"\0" * 60).decode()), "embedding holds 60 bytes; the header's 16 "
                                                                   "dimensions of float32 take 64"),
    (_good_row(embedding=base64.b64encode(np.full(16, np.nan, "<f4").tobytes()).decode()),
     "embedding holds NaN or infinite values"),
    (_good_row(embedding=base64.b64encode(np.zeros(16, "<f4").tobytes()).decode()), "embedding is all zeros"),
    (_good_row(embedding=[1.0] * 16), "embedding must be a base64 string"),
    (_good_row(subject_id="ali\x00ce"), "subject_id holds a control or unassigned character"),
    (_good_row(subject_id=""), "subject_id is empty"),
    (_good_row(source=""), "source must be 1 to 256 printable characters"),
    (_good_row(enrolled_at="yesterday"), "enrolled_at must be an ISO 8601 time"),
    (_good_row(source="<drop>"), "the template lacks 'source'"),
    (_good_row(score=1), "the template has unknown field(s) 'score'"),
])
def test_a_bad_template_line_is_refused_by_its_number_and_nothing_is_imported(transfer_store, tmp_path, bad_line,
                                                                               message):
    path = tmp_path / "bad.jsonl"
    good = [_good_row(subject_id=f"s{i}") for i in range(3)]
    path.write_text("\n".join([_good_header(), *good, bad_line, _good_row(subject_id="last")]) + "\n")
    with pytest.raises(InvalidInput) as raised:
        transfer.import_gallery(transfer_store, "never-created-either", path)
    assert f"{path}, line 5: {message}" in str(raised.value)
    with pytest.raises(GalleryNotFound):
        transfer_store.gallery("never-created-either")


def test_a_file_of_another_shape_is_refused_before_it_is_read_whole(tmp_path):
    path = tmp_path / "huge-line.jsonl"
    path.write_bytes(_good_header().encode() + b"\n" + b"x" * (transfer.MAX_LINE_BYTES + 10) + b"\n")
    with pytest.raises(InvalidInput, match="line 2: longer than"):
        transfer.check_file(path)
    path.write_bytes(b"\xff\xfe" + _good_header().encode())
    with pytest.raises(InvalidInput, match="line 1: not UTF-8"):
        transfer.check_file(path)
    with pytest.raises(InvalidInput, match="cannot read"):
        transfer.check_file(tmp_path / "missing.jsonl")


def test_a_file_without_a_final_newline_or_with_crlf_line_ends_imports(transfer_store, tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes("\r\n".join([_good_header(threshold=0.5), _good_row(), _good_row(subject_id="bob")]).encode())
    checked = transfer.check_file(path)
    assert checked.templates == 2 and checked.header.threshold == 0.5
    imported = transfer.import_gallery(transfer_store, "from-crlf", path, checked=checked)
    assert (imported.added, imported.created) == (2, True)
    assert transfer_store.gallery("from-crlf").threshold == pytest.approx(0.5)


def test_exporting_a_gallery_that_does_not_exist_or_to_a_missing_folder_writes_nothing(transfer_store, gallery,
                                                                                       tmp_path):
    path = tmp_path / "none.jsonl"
    with pytest.raises(GalleryNotFound):
        transfer.export_gallery(transfer_store, "no-such-gallery", path)
    assert list(tmp_path.iterdir()) == []
    name, _templates = gallery
    with pytest.raises(InvalidInput, match="cannot write"):
        transfer.export_gallery(transfer_store, name, tmp_path / "no" / "such" / "folder.jsonl")
    # The export's transaction was ended: the store still answers.
    assert transfer_store.stats(name)["templates"] == 7


def test_the_module_warns_that_the_file_holds_biometric_templates():
    assert "biometric templates" in transfer.__doc__
