"""Checks before a sweep: boxes inside their image (refused, never clipped), symlink loops named,
every image decoded in parallel and the result cached by fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest

from weakbench.core.data import check_images, open_dataset, resolve_path
from weakbench.core.errors import DataError


@pytest.fixture
def coco_copy(synthetic_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(synthetic_dir, dst)
    return dst


def _move_first_box(root, bbox):
    f = root / "annotations" / "instances.json"
    d = json.loads(f.read_text())
    a = d["annotations"][0]
    a["bbox"] = bbox
    im = next(i for i in d["images"] if i["id"] == a["image_id"])
    f.write_text(json.dumps(d))
    return a, im


def test_coco_box_outside_its_image_is_refused_with_the_fix(coco_copy):
    d = json.loads((coco_copy / "annotations" / "instances.json").read_text())
    w = d["images"][0]["width"]
    a, im = _move_first_box(coco_copy, [w + 50, 10, 100, 100])
    with pytest.raises(DataError) as e:
        open_dataset(coco_copy)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("instances.json", "annotations[0].bbox", f"annotation id {a['id']}", f"image id {im['id']}",
                   im["file_name"], "[x, y, w, h]", f"> width {im['width']}", "fix the box", "never clipped"):
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("bbox, ok", [([-0.5, 0, 10, 10], True), ([-2, 0, 10, 10], False), ([0, -3, 5, 5], False)])
def test_coco_box_tolerance_is_one_pixel(coco_copy, bbox, ok):
    _move_first_box(coco_copy, bbox)
    if ok:
        open_dataset(coco_copy)
    else:
        with pytest.raises(DataError, match="lies outside the image"):
            open_dataset(coco_copy)


def test_wsol_box_outside_its_image_is_refused(tmp_path):
    from PIL import Image

    meta = tmp_path / "CUB" / "test"
    meta.mkdir(parents=True)
    Image.new("RGB", (40, 20)).save(tmp_path / "CUB" / "a.png")
    (meta / "image_ids.txt").write_text("a.png\n")
    (meta / "class_labels.txt").write_text("a.png,0\n")
    (meta / "image_sizes.txt").write_text("a.png,40,20\n")
    (meta / "localization.txt").write_text("a.png,1,2,60,18\n")
    with pytest.raises(DataError) as e:
        open_dataset(meta)
    msg = str(e.value)
    assert "localization.txt: line 1" in msg and "x1 = 60 > width 40" in msg and "never clipped" in msg


def test_symlink_loop_is_named(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    for fn in (lambda: open_dataset(a), lambda: resolve_path(a)):
        with pytest.raises(DataError, match="symbolic link loop") as e:
            fn()
        assert str(a) in str(e.value) and "--data" in str(e.value)


def test_images_decoded_in_parallel_and_cached(coco_copy, tmp_path):
    cache = tmp_path / "cache"
    src = open_dataset(coco_copy)
    assert check_images(src, cache, progress=False) is True
    assert (cache / "checked" / f"{src.fingerprint}.json").is_file()
    assert check_images(src, cache, progress=False) is False  # cached: nothing decoded
    # a broken image of another size changes the fingerprint: checked again, and refused
    images = sorted((coco_copy / "images").iterdir())
    images[1].write_bytes(b"not an image")
    images[4].write_bytes(b"not an image either")
    src2 = open_dataset(coco_copy)
    assert src2.fingerprint != src.fingerprint
    with pytest.raises(DataError) as e:
        check_images(src2, cache, progress=True)
    msg = str(e.value)
    assert msg.startswith("2 of ") and "cannot decode image" in msg and str(images[1]) in msg and str(images[4]) in msg
    assert not (cache / "checked" / f"{src2.fingerprint}.json").exists()
