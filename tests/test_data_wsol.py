"""wsolevaluation metadata reader on tiny metadata sets written by the tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from weakbench.core.data import EvalDataset, WsolMetadataSource, collate_eval, open_dataset
from weakbench.core.errors import DataError


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _image(path, w, h, colour=(120, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


@pytest.fixture
def boxes_set(tmp_path):
    """CUB-like layout: <root>/test/ metadata, images under <root>/ (the metadata dir's parent)."""
    root = tmp_path / "CUB"
    _image(root / "birds/a.png", 40, 20)
    _image(root / "birds/b.png", 10, 30)
    _image(root / "fish/c.png", 16, 16)
    meta = root / "test"
    _write(meta / "image_ids.txt", ["birds/a.png", "birds/b.png", "fish/c.png"])
    _write(meta / "class_labels.txt", ["birds/a.png,0", "birds/b.png,0", "fish/c.png,2"])
    _write(meta / "image_sizes.txt", ["birds/a.png,40,20", "birds/b.png,10,30", "fish/c.png,16,16"])
    _write(meta / "localization.txt", ["birds/a.png,1,2,30,18", "birds/a.png,5,5,9,9", "birds/b.png,0,0,10,30",
                                       "fish/c.png,3,4,12,15"])
    return meta


def test_boxes_variant(boxes_set):
    src = open_dataset(boxes_set)
    assert isinstance(src, WsolMetadataSource)
    assert src.name == "CUB-test" and src.multilabel is False and src.has_masks is False
    assert src.num_classes == 3 and src.class_names == ["0", "1", "2"]
    assert [r.image_id for r in src.records] == ["birds/a.png", "birds/b.png", "fish/c.png"]
    assert src.records[0].path == boxes_set.parent / "birds/a.png"
    assert (src.records[1].width, src.records[1].height) == (10, 30)
    a = src.annotations(0)
    np.testing.assert_array_equal(a.boxes, [[1, 2, 30, 18], [5, 5, 9, 9]])
    assert a.boxes.dtype == np.float32 and a.box_classes.tolist() == [0, 0]
    assert a.labels.tolist() == [1, 0, 0]
    assert a.instance_masks is None and a.semantic_mask is None and a.ignore_mask is None
    assert src.annotations(2).box_classes.tolist() == [2]
    assert src.labels_matrix().tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert src.load_image(0).size == (40, 20)
    ds = EvalDataset(src, [0, 2], 32)
    batch = collate_eval([ds[0], ds[1]])
    # int(x·32/40), int(y·32/20): (1,2,30,18) → (0,3,24,28); (5,5,9,9) → (4,8,7,14)
    assert batch["boxes"][0].tolist() == [[0, 3, 24, 28], [4, 8, 7, 14]]
    assert batch["boxes"][1].tolist() == [[6, 8, 24, 30]]
    assert batch["has_masks"].tolist() == [False, False]
    assert not batch["masks"].any() and (batch["semantic"] == 255).all() and not batch["ignore"].any()


def test_image_root_override_and_class_names(boxes_set, tmp_path):
    moved = tmp_path / "elsewhere"
    (boxes_set.parent).rename(moved)
    meta = moved / "test"
    _write(meta / "class_names.txt", ["albatross", "heron", "trout"])
    with pytest.raises(DataError, match="missing"):
        open_dataset(meta, image_root=tmp_path / "nothing-here")
    src = open_dataset(meta, image_root=moved)
    assert src.class_names == ["albatross", "heron", "trout"]
    assert src.records[2].path == moved / "fish/c.png"


def test_mask_variant(tmp_path):
    root = tmp_path / "OpenImages"
    _image(root / "val/x.png", 12, 8)
    _image(root / "val/y.png", 6, 6)
    m1 = np.zeros((8, 12), np.uint8)
    m1[1:4, 2:6] = 255
    m2 = np.zeros((8, 12), np.uint8)
    m2[5:7, 7:11] = 1  # any grey value > 0 is foreground
    ign = np.zeros((8, 12), np.uint8)
    ign[0:8, 0:4] = 255  # overlaps m1 in columns 2..3
    for name, arr in (("m1", m1), ("m2", m2), ("ign", ign)):
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "masks" / f"{name}.png")
    half = np.zeros((3, 3), np.uint8)  # smaller than the image: resized (nearest) to 6x6
    half[0, 0] = 200
    Image.fromarray(half).save(root / "masks" / "small.png")
    meta = root / "val_meta"
    _write(meta / "image_ids.txt", ["val/x.png", "val/y.png"])
    _write(meta / "class_labels.txt", ["val/x.png,1", "val/y.png,0"])
    _write(meta / "image_sizes.txt", ["val/x.png,12,8", "val/y.png,6,6"])
    _write(meta / "localization.txt", ["val/x.png,masks/m1.png,masks/ign.png", "val/x.png,masks/m2.png,",
                                       "val/y.png,masks/small.png,"])
    src = open_dataset(meta, image_root=root)
    assert src.has_masks and src.num_classes == 2
    a = src.annotations(0)
    np.testing.assert_array_equal(a.instance_masks, np.stack([m1 > 0, m2 > 0]))
    np.testing.assert_array_equal(a.boxes, [[2, 1, 6, 4], [7, 5, 11, 7]])
    assert a.box_classes.tolist() == [1, 1]
    np.testing.assert_array_equal(a.ignore_mask, (ign > 0) & ~(m1 > 0))  # wsolevaluation: ignore minus objects
    want_sem = np.where((m1 > 0) | (m2 > 0), 2, 0).astype(np.uint8)
    want_sem[a.ignore_mask] = 255
    np.testing.assert_array_equal(a.semantic_mask, want_sem)
    b = src.annotations(1)
    assert b.ignore_mask is None
    assert b.instance_masks[0].sum() == 4 and b.instance_masks[0][:2, :2].all()
    assert b.boxes.tolist() == [[0, 0, 2, 2]]
    ds = EvalDataset(src, [0], 24)
    item = ds[0]
    assert item["has_masks"].item() is True
    # 12x8 → 24x24 repeats each pixel 2 (x) · 3 (y) times
    assert item["masks"][1].sum().item() == ((m1 > 0).sum() + (m2 > 0).sum()) * 6 and not item["masks"][0].any()
    assert item["boxes"].tolist() == [[4, 3, 12, 12], [14, 15, 22, 21]]


@pytest.mark.parametrize("file,content,needle", [
    ("class_labels.txt", ["birds/a.png,zero"], r"class_labels\.txt: line 1: label 'zero' is not an integer"),
    ("image_sizes.txt", ["birds/a.png,40"], r"image_sizes\.txt: line 1: expected '<path>,<width>,<height>'"),
    ("localization.txt", ["birds/a.png,1,2,x,4"], r"localization\.txt: line 1: box coordinates"),
    ("localization.txt", ["nobody.png,1,2,3,4"], r"localization\.txt: line 1: image 'nobody.png' is not listed"),
    ("image_ids.txt", [], r"image_ids\.txt: no images"),
])
def test_malformed_metadata_names_file_and_line(boxes_set, file, content, needle):
    _write(boxes_set / file, content)
    with pytest.raises(DataError, match=needle):
        open_dataset(boxes_set)


def test_missing_label_for_an_image(boxes_set):
    _write(boxes_set / "class_labels.txt", ["birds/a.png,0", "birds/b.png,0"])
    with pytest.raises(DataError, match=r"class_labels\.txt: no label for image 'fish/c.png'"):
        open_dataset(boxes_set)
