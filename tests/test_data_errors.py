"""Bad input gives one-line DataErrors naming the file and the field."""

from __future__ import annotations

import json
import shutil

import pytest

from weakbench.core.data import CocoSource, open_dataset
from weakbench.core.errors import DataError


@pytest.fixture
def coco_copy(synthetic_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(synthetic_dir, dst)
    return dst


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_json(root, fn):
    f = root / "annotations" / "instances.json"
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))
    return f


def test_missing_directory(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "nope")
    msg = _one_line(e)
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "instances.json" in msg


def test_empty_directory_lists_what_was_expected(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path)
    msg = _one_line(e)
    assert str(tmp_path) in msg and "empty directory" in msg
    for expected in ("annotations/instances.json", "image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt"):
        assert expected in msg


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("{}")
    with pytest.raises(DataError, match="not a directory"):
        open_dataset(f)


def test_malformed_json_names_file_and_position(coco_copy):
    f = coco_copy / "annotations" / "instances.json"
    f.write_text('{"images": [\n  {"id": 1,, "file_name": "a.png"}]}')
    with pytest.raises(DataError) as e:
        open_dataset(coco_copy)
    msg = _one_line(e)
    assert str(f) in msg and "malformed JSON at line 2 column 12" in msg


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["annotations"][12].pop("bbox"), "annotations[12].bbox: missing field"),
    (lambda d: d["annotations"][3].__setitem__("bbox", [1, 2, 3]), "annotations[3].bbox: expected 4 numbers"),
    (lambda d: d["annotations"][5].__setitem__("category_id", 99), "annotations[5].category_id: 99 is not the id"),
    (lambda d: d["annotations"][7].__setitem__("image_id", 12345), "annotations[7].image_id: 12345 is not the id"),
    (lambda d: d["images"][2].pop("width"), "images[2].width: missing field"),
    (lambda d: d["images"][4].__setitem__("height", 0), "images[4].height: expected a positive integer"),
    (lambda d: d["categories"][1].__setitem__("id", 1), "categories[1].id: duplicate category id 1"),
    (lambda d: d.pop("categories"), "categories: missing field"),
    (lambda d: d["annotations"][0].__setitem__("segmentation", [[1, 2, 3]]), "annotations[0].segmentation[0]: expected a polygon"),
])
def test_bad_field_is_named(coco_copy, edit, field):
    f = _edit_json(coco_copy, edit)
    with pytest.raises(DataError) as e:
        open_dataset(coco_copy)
    msg = _one_line(e)
    assert msg.startswith(f"{f}: ") and field in msg


def test_no_images(coco_copy):
    f = _edit_json(coco_copy, lambda d: (d.__setitem__("images", []), d.__setitem__("annotations", [])))
    with pytest.raises(DataError, match=r"images: no images"):
        open_dataset(coco_copy)
    assert f.exists()


def test_missing_image_file_is_named(coco_copy):
    (coco_copy / "images" / "000007.png").unlink()
    with pytest.raises(DataError) as e:
        open_dataset(coco_copy)
    msg = _one_line(e)
    assert "000007.png" in msg and "missing" in msg


def test_undecodable_and_truncated_images(coco_copy, coco128_dir):
    bad = coco_copy / "images" / "000003.png"
    bad.write_bytes(b"\x00garbage, not an image" * 10)
    src = CocoSource(coco_copy)
    with pytest.raises(DataError) as e:
        src.load_image(3)
    msg = _one_line(e)
    assert str(bad) in msg and "cannot decode" in msg
    src.load_image(4)  # the others still load
    # a real JPEG cut in half
    jpg = sorted((coco128_dir / "images").glob("*.jpg"))[0]
    data = jpg.read_bytes()
    cut = coco_copy / "images" / "000004.png"
    cut.write_bytes(data[: len(data) // 2])
    from PIL import Image
    with Image.open(jpg) as im:
        w, h = im.size
    _edit_json(coco_copy, lambda d: d["images"][4].update(width=w, height=h))
    with pytest.raises(DataError) as e:
        CocoSource(coco_copy).load_image(4)
    msg = _one_line(e)
    assert str(cut) in msg and "cannot decode" in msg


def test_undecodable_jpg_in_coco128_copy(coco128_dir, tmp_path):
    dst = tmp_path / "coco"
    (dst / "annotations").mkdir(parents=True)
    shutil.copy(coco128_dir / "annotations" / "instances.json", dst / "annotations")
    (dst / "images").mkdir()
    for p in (coco128_dir / "images").iterdir():  # links keep the copy cheap
        (dst / "images" / p.name).symlink_to(p)
    src = open_dataset(dst)
    victim = src.records[10].path
    victim.unlink()
    victim.write_bytes(b"\xff\xd8\xff garbage bytes")
    with pytest.raises(DataError) as e:
        src.load_image(10)
    msg = _one_line(e)
    assert str(victim) in msg and "cannot decode" in msg


def test_size_mismatch_is_an_error(coco_copy):
    _edit_json(coco_copy, lambda d: d["images"][0].update(width=200))  # wider: its boxes stay inside
    with pytest.raises(DataError, match=r"000000\.png: image is 96x96 but the annotations declare width=200"):
        CocoSource(coco_copy).load_image(0)


def test_annotations_elsewhere_is_explained(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text("{}")
    with pytest.raises(DataError, match="no annotations/instances.json"):
        open_dataset(tmp_path)
