"""The shared leaves of opd.io: folders written atomically, and the number format people read."""

from __future__ import annotations

import pytest

from opd.io import atomic_folder, fmt


def test_an_atomic_folder_appears_complete_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stale = tmp_path / ".model.tmp"  # left by a killed attempt
    stale.mkdir()
    (stale / "half.txt").write_text("half")
    with atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # untouched until the block ends
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_atomic_folder_leaves_the_old_one_and_no_temporary(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise OSError("disk full")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_atomic_folder_completes_one_other_processes_began(tmp_path):
    begun = tmp_path / "step-2.tmp"
    (begun / "optimizer").mkdir(parents=True)
    (begun / "optimizer" / "shard-0").write_text("shard")
    with atomic_folder(tmp_path / "step-2", begun=begun) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "step-2").iterdir()) == ["manifest.json", "optimizer"]
    assert not begun.exists()


def test_fmt_writes_missing_values_booleans_and_floats_the_same_way_everywhere():
    assert [fmt(None), fmt(True), fmt(False), fmt(3), fmt("x")] == ["–", "yes", "no", "3", "x"]
    assert fmt(0.123456) == "0.123" and fmt(0.123456, ".4g") == "0.1235"
    assert fmt(-0.5, "+.3f") == "-0.500"
