"""atomic_write: a failed write leaves the old file and no temporary file behind."""

import pytest

from cnnkit.atomic import atomic_write, remove_stale_temp_files


def test_a_clean_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".epoch-001.safetensors.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "epoch-001.safetensors").write_bytes(b"whole")
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".epoch-001.safetensors.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-001.safetensors"]
    assert remove_stale_temp_files(tmp_path / "missing") == []
