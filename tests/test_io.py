"""weakbench.core.io: the one atomic write every store uses."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from weakbench.core.io import atomic_write, atomic_write_text, fsync_dir


def test_text_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "a.json"
    atomic_write_text(f, "old")
    atomic_write_text(f, "néw", fsync=True)
    assert f.read_text(encoding="utf-8") == "néw"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    f = tmp_path / "chunk.pt"
    torch.save({"k": 1}, f)
    with pytest.raises(RuntimeError, match="half"):
        with atomic_write(f) as out:
            out.write(b"half a file")
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # written beside, hidden
            raise RuntimeError("half")
    assert torch.load(f) == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["chunk.pt"]


def test_binary_writers_take_the_open_file(tmp_path):
    with atomic_write(tmp_path / "t.parquet", fsync=True) as f:
        pq.write_table(pa.table({"x": [1, 2]}), f)
    with atomic_write(tmp_path / "m.pt") as f:
        torch.save({"w": torch.ones(2)}, f)
    assert pq.read_table(tmp_path / "t.parquet")["x"].to_pylist() == [1, 2]
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.ones(2))


def test_the_file_gets_the_umask_permissions_of_a_plain_open(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_missing_directory_raises_oserror_and_fsync_dir_is_best_effort(tmp_path):
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "missing" / "a.txt", "x")
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # ignored
