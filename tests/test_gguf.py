"""GGUF files as models (`opd.models.gguf`) without a real checkpoint: which paths name one,
and the one-line refusals a user meets; `make test-real` converts two real files."""

from __future__ import annotations

import pytest

import opd
from opd.errors import OPDError
from opd.models.gguf import converted_folder, gguf_file


def test_which_paths_name_a_gguf_file(tmp_path, tiny_pair):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.gguf").write_bytes(b"GGUF")
    assert gguf_file(str(lone / "model.gguf")) == lone / "model.gguf"
    assert gguf_file(str(lone)) == lone / "model.gguf"
    assert gguf_file(str(tiny_pair["student"])) is None  # an HF folder
    assert gguf_file("http://127.0.0.1:8000") is None
    assert converted_folder(str(tiny_pair["student"]), "student") == str(tiny_pair["student"])


def test_a_folder_with_several_gguf_files_is_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(OPDError, match=r"holds several GGUF files \(a.gguf, b.gguf\); give the "
                                       r"path of one of them"):
        gguf_file(str(tmp_path))


def test_a_file_transformers_cannot_read_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch,
                                                                           tiny_pair):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf")
    with pytest.raises(OPDError, match=r"^model: transformers \S+ cannot dequantize bad.gguf: "
                                       r".*not a GGUF file"):
        opd.evaluate(str(bad), str(tiny_pair["prompts"]))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
