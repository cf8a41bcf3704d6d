"""The class filter (``--classes``, the space file's ``classes``) on COCO and wsolevaluation sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from weakbench.core.data import CocoSource, load_splits, make_splits, open_dataset, save_splits
from weakbench.core.errors import ConfigError, DataError
from weakbench.platform.search_space import parse_search_space

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_coco_filter_keeps_only_the_named_classes(synthetic_dir):
    full = CocoSource(synthetic_dir)
    sub = open_dataset(synthetic_dir, classes="ring,disc")  # order given does not matter: dataset order
    assert sub.class_names == ["disc", "ring"] and sub.num_classes == 2 and sub.classes == ("disc", "ring")
    assert sub.name == "synthetic-disc+ring" and full.classes is None
    assert sub.fingerprint != full.fingerprint
    assert open_dataset(synthetic_dir, classes=["disc", "ring"]).fingerprint == sub.fingerprint
    # the images kept are exactly those with a disc or a ring, with only those instances, renumbered
    disc, ring = full.class_names.index("disc"), full.class_names.index("ring")
    want = [r.image_id for r in full.records if full.labels_matrix()[r.index, [disc, ring]].any()]
    assert [r.image_id for r in sub.records] == want and 0 < len(want) < len(full)
    for rec in sub.records[:10]:
        i = full.index_of(rec.image_id)
        a, b = full.annotations(i), sub.annotations(rec.index)
        keep = np.isin(a.box_classes, [disc, ring])
        np.testing.assert_array_equal(b.boxes, a.boxes[keep])
        np.testing.assert_array_equal(b.box_classes, np.where(a.box_classes[keep] == disc, 0, 1))
        np.testing.assert_array_equal(b.instance_masks, a.instance_masks[keep])
        assert set(np.unique(b.semantic_mask)) <= {0, 1, 2}
        assert b.labels.tolist() == [float(disc in a.box_classes), float(ring in a.box_classes)]


def test_stored_splits_say_which_classes_and_refuse_the_other_dataset(synthetic_dir, tmp_path):
    full, sub = CocoSource(synthetic_dir), open_dataset(synthetic_dir, classes="square")
    path = save_splits(make_splits(sub, 0), tmp_path / "s.json")
    doc = json.loads(path.read_text())
    assert doc["classes"] == ["square"] and doc["num_records"] == len(sub) and doc["dataset"] == "synthetic-square"
    assert load_splits(path, sub).classes == ("square",)
    with pytest.raises(DataError, match="fingerprint"):
        load_splits(path, full)
    assert load_splits(save_splits(make_splits(full, 0), tmp_path / "f.json"), full).classes is None


def test_coco128_person(coco128_dir):
    src = open_dataset(coco128_dir, classes="person")
    assert src.name == "coco128-person" and src.class_names == ["person"]
    # 259 person annotations on 61 images, 5 of them crowd regions (no box, ignored pixels)
    assert len(src) == 61 and sum(src.gt_boxes(i)[0].shape[0] for i in range(len(src))) == 254
    assert sum(len(src.annotation_ids(i, crowd=True)) for i in range(len(src))) == 5


def test_unknown_or_empty_class_names_are_one_line_errors(synthetic_dir):
    with pytest.raises(DataError, match=r"instances\.json: classes: 'dog' is not a class of this dataset .*disc"):
        open_dataset(synthetic_dir, classes="disc,dog")
    with pytest.raises(DataError, match="empty class name"):
        open_dataset(synthetic_dir, classes="disc,,ring")


def _wsol(tmp_path):
    root = tmp_path / "W"
    lines = {"image_ids.txt": [], "class_labels.txt": [], "image_sizes.txt": [], "localization.txt": []}
    for k, label in enumerate([0, 2, 1, 2]):
        name = f"im/{k}.png"
        (root / "im").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 10), (k * 40, 0, 0)).save(root / name)
        lines["image_ids.txt"].append(name)
        lines["class_labels.txt"].append(f"{name},{label}")
        lines["image_sizes.txt"].append(f"{name},20,10")
        lines["localization.txt"].append(f"{name},1,1,{5 + k},8")
    meta = root / "test"
    meta.mkdir()
    for f, ls in lines.items():
        (meta / f).write_text("\n".join(ls) + "\n")
    (meta / "class_names.txt").write_text("cat\ndog\nemu\n")
    return meta


def test_wsol_filter(tmp_path):
    meta = _wsol(tmp_path)
    full = open_dataset(meta)
    sub = open_dataset(meta, classes="emu")
    assert sub.class_names == ["emu"] and sub.name == "W-test-emu" and sub.fingerprint != full.fingerprint
    assert [r.image_id for r in sub.records] == ["im/1.png", "im/3.png"]
    assert sub.labels_matrix().tolist() == [[1.0], [1.0]]
    assert sub.gt_boxes(1)[0].tolist() == [[1, 1, 8, 8]] and sub.gt_boxes(1)[1].tolist() == [0]
    two = open_dataset(meta, classes="emu,cat")
    assert two.class_names == ["cat", "emu"] and two.labels_matrix().argmax(1).tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="class_labels.txt: classes: 'owl'"):
        open_dataset(meta, classes="owl")


def test_space_file_key(tmp_path):
    space = parse_search_space({"method": "bbam", "classes": ["person", "dog"]})
    assert space.classes == "person,dog"
    assert parse_search_space({"method": "bbam"}).classes is None
    with pytest.raises(ConfigError, match="classes: expected a list"):
        parse_search_space({"method": "bbam", "classes": [1]}, source="x.yaml")


def test_cli_data_command_filters(tmp_path, synthetic_dir):
    from typer.testing import CliRunner

    from weakbench import cli

    res = CliRunner().invoke(cli.app, ["data", str(synthetic_dir), "--classes", "disc", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "synthetic-disc:" in res.output and "1 classes" in res.output
