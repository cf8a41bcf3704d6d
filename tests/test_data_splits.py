"""Deterministic, stored splits guarded by the dataset fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weakbench.core.data import (
    CocoSource, DatasetSource, ImageRecord, load_or_make_splits, load_splits, make_splits, save_splits, split_path,
)
from weakbench.core.errors import DataError


class TinySource(DatasetSource):
    """A source of n records with no files (splits only look at records and fingerprint)."""

    def __init__(self, n: int, fingerprint: str = "0123456789abcdef"):
        self.name, self.root, self.fingerprint = "tiny", Path("/nowhere"), fingerprint
        self.records = [ImageRecord(i, i, Path(f"/nowhere/{i}.png"), 8, 8) for i in range(n)]


@pytest.fixture(scope="module")
def synthetic(synthetic_dir):
    return CocoSource(synthetic_dir, name="synthetic")


def test_deterministic_disjoint_cover(synthetic):
    a = make_splits(synthetic, seed=7)
    b = make_splits(synthetic, seed=7)
    c = make_splits(synthetic, seed=8)
    assert dict(a) == dict(b)
    assert dict(a) != dict(c)
    assert list(a) == ["train", "val", "test"]
    assert [len(a[k]) for k in a] == [57, 19, 20]  # floor(0.6·96), floor(0.2·96), rest
    everything = a["train"] + a["val"] + a["test"]
    assert sorted(everything) == list(range(96))
    assert all(v == sorted(v) for v in a.values())
    assert a.fingerprint == synthetic.fingerprint and a.seed == 7


@pytest.mark.parametrize("n,fractions,sizes", [
    (3, (0.6, 0.2, 0.2), [1, 1, 1]),
    (4, (1.0, 0.0, 0.0), [2, 1, 1]),
    (10, (0.5, 0.5, 0.0), [4, 5, 1]),
    (2, (0.6, 0.2, 0.2), [1, 0, 1]),
])
def test_every_split_non_empty_from_three_images(n, fractions, sizes):
    s = make_splits(TinySource(n), seed=0, fractions=fractions)
    assert [len(s[k]) for k in ("train", "val", "test")] == sizes
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(n))


def test_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        make_splits(TinySource(5), seed=0, fractions=(0.5, 0.2, 0.2))


def test_save_load_roundtrip_and_fingerprint_guard(synthetic, tmp_path):
    s = make_splits(synthetic, seed=1)
    path = save_splits(s, tmp_path / "sub" / "splits.json")
    doc = json.loads(path.read_text())
    assert doc["fingerprint"] == synthetic.fingerprint and doc["seed"] == 1
    loaded = load_splits(path, synthetic)
    assert dict(loaded) == dict(s) and loaded.fingerprint == s.fingerprint
    other = TinySource(96, fingerprint="ffffffffffffffff")
    with pytest.raises(DataError) as e:
        load_splits(path, other)
    msg = str(e.value)
    assert str(path) in msg and synthetic.fingerprint in msg and "ffffffffffffffff" in msg and "delete" in msg


def test_load_rejects_out_of_range_and_malformed(tmp_path):
    small = TinySource(5)
    path = save_splits(make_splits(TinySource(10), seed=0), tmp_path / "s.json")
    with pytest.raises(DataError, match=r"splits\.\w+: index \d+ outside \[0, 5\)"):
        load_splits(path, small)
    bad = tmp_path / "bad.json"
    bad.write_text('{"splits": {"train": [1, 2')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 1"):
        load_splits(bad)
    with pytest.raises(DataError, match="split file not found"):
        load_splits(tmp_path / "missing.json")


def test_load_or_make_is_stable(synthetic, tmp_path):
    path = split_path(tmp_path, synthetic, 3)
    assert path.name == f"synthetic-{synthetic.fingerprint}-seed3.json"
    first = load_or_make_splits(synthetic, 3, path)
    assert path.exists()
    second = load_or_make_splits(synthetic, 3, path)
    assert dict(first) == dict(second)
    with pytest.raises(DataError, match="seed=3"):
        load_or_make_splits(synthetic, 4, path)
