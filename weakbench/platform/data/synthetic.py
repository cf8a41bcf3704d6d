"""The embedded default dataset: coloured shapes on textured noise, written in COCO format.

``generate_synthetic_coco`` writes ``images/*.png`` and ``annotations/instances.json`` (RLE
segmentations, ``bbox``, ``area``, ``iscrowd = 0``) plus a ``fingerprint`` file, so the default
run needs no download and goes through :class:`~.coco.CocoSource` like real data.

Each image has 1–3 non-overlapping instances (bounding boxes at least 2 px apart) of classes
drawn uniformly; class ``c`` has its own shape *and* its own hue (disc red, square green,
triangle blue, ring yellow, cross magenta, diamond cyan), with a small per-instance colour
jitter, on a low-saturation background of smooth noise plus pixel noise. Instance sizes are
22–45 % of the image side. Output bytes depend only on the arguments (numpy ``PCG64`` seeded
with ``seed``; PNGs written by PIL without timestamps).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from weakbench.platform.errors import ConfigError

__all__ = ["generate_synthetic_coco", "SYNTHETIC_VERSION", "SHAPES", "ensure_synthetic"]

SYNTHETIC_VERSION = 1
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
_COLOURS = ((215, 45, 40), (45, 175, 60), (50, 85, 225), (225, 200, 35), (200, 60, 200), (40, 195, 200))
FINGERPRINT_FILE = "fingerprint"


def _shape_mask(shape: str, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Binary (size, size) mask of ``shape`` drawn inside ``box = (x0, y0, x1, y1)`` (inclusive)."""
    x0, y0, x1, y1 = box
    s = x1 - x0
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    if shape == "disc":
        d.ellipse([x0, y0, x1, y1], fill=1)
    elif shape == "square":
        m = round(0.1 * s)
        d.rectangle([x0 + m, y0 + m, x1 - m, y1 - m], fill=1)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=1)
    elif shape == "ring":
        d.ellipse([x0, y0, x1, y1], fill=1)
        m = round(0.3 * s)
        d.ellipse([x0 + m, y0 + m, x1 - m, y1 - m], fill=0)
    elif shape == "cross":
        m = round(0.33 * s)
        d.rectangle([x0 + m, y0, x1 - m, y1], fill=1)
        d.rectangle([x0, y0 + m, x1, y1 - m], fill=1)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    return np.asarray(img, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured, low-saturation background, float (size, size, 3) in [0, 255]."""
    grid = rng.uniform(60, 170, size=(6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    noise = rng.normal(0, 14, size=(size, size, 3)).astype(np.float32)
    return smooth[..., None] + tint + noise


def generate_synthetic_coco(out_dir: str | Path, *, num_images: int = 96, num_classes: int = 4,
                            image_size: int = 96, seed: int = 0) -> Path:
    """Write the synthetic shapes dataset in COCO format to ``out_dir``.

    Args:
        out_dir: target directory (created; existing files of the same names are overwritten).
        num_images: number of images (>= 1).
        num_classes: number of classes, 1..6 (shapes ``disc, square, triangle, ring, cross,
            diamond`` in that order).
        image_size: side of the square RGB images, pixels (>= 32).
        seed: the only source of randomness; the same arguments give the same bytes.

    Returns:
        ``out_dir`` as a Path, containing ``images/000000.png …``, ``annotations/instances.json``
        and ``fingerprint`` (the :class:`~.coco.CocoSource` fingerprint of the result).

    Raises:
        ConfigError: an argument out of range.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ConfigError(f"synthetic dataset: num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if num_images < 1:
        raise ConfigError(f"synthetic dataset: num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ConfigError(f"synthetic dataset: image_size must be >= 32 pixels, got {image_size}")
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    images, annotations = [], []
    ann_id = 1
    lo, hi = max(8, round(0.22 * image_size)), max(10, round(0.45 * image_size))
    for i in range(num_images):
        canvas = _background(rng, image_size)
        placed: list[tuple[int, int, int, int]] = []
        n_inst = int(rng.integers(1, 4))
        for _ in range(n_inst):
            cls = int(rng.integers(num_classes))
            for _try in range(30):
                s = int(rng.integers(lo, hi + 1))
                x0 = int(rng.integers(0, image_size - s))
                y0 = int(rng.integers(0, image_size - s))
                box = (x0, y0, x0 + s - 1, y0 + s - 1)
                if all(box[0] > b[2] + 2 or box[2] < b[0] - 2 or box[1] > b[3] + 2 or box[3] < b[1] - 2 for b in placed):
                    break
            else:
                continue  # no room left; keep the instances placed so far
            placed.append(box)
            mask = _shape_mask(SHAPES[cls], image_size, box)
            colour = np.clip(np.array(_COLOURS[cls], dtype=np.float32) + rng.uniform(-20, 20, size=3), 0, 255)
            shade = rng.normal(0, 6, size=(int(mask.sum()), 1)).astype(np.float32)
            canvas[mask] = colour + shade
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": ann_id, "image_id": i + 1, "category_id": cls + 1, "iscrowd": 0,
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                "area": float(mask.sum()),
                "segmentation": {"size": [image_size, image_size], "counts": rle["counts"].decode("ascii")},
            })
            ann_id += 1
        name = f"{i:06d}.png"
        Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB").save(out / "images" / name, format="PNG")
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
    doc = {
        "info": {"description": "weakbench synthetic shapes", "version": str(SYNTHETIC_VERSION),
                 "num_images": num_images, "num_classes": num_classes, "image_size": image_size, "seed": seed},
        "licenses": [],
        "categories": [{"id": c + 1, "name": SHAPES[c], "supercategory": "shape"} for c in range(num_classes)],
        "images": images,
        "annotations": annotations,
    }
    (out / "annotations" / "instances.json").write_text(json.dumps(doc, indent=1) + "\n")
    from weakbench.platform.data.coco import CocoSource

    (out / FINGERPRINT_FILE).write_text(CocoSource(out, name="synthetic").fingerprint + "\n")
    return out


def _valid_cache(path: Path) -> bool:
    from weakbench.platform.data.coco import CocoSource
    from weakbench.platform.errors import DataError

    f = path / FINGERPRINT_FILE
    if not f.is_file():
        return False
    try:
        return CocoSource(path, name="synthetic").fingerprint == f.read_text().strip()
    except DataError:
        return False


def ensure_synthetic(cache_dir: str | Path, seed: int = 0) -> Path:
    """Return ``cache_dir / f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}"``, generating it if absent
    or if its ``fingerprint`` file does not match its content.

    Safe when several processes (Ray workers) call it at once: each generates into a private
    temporary directory and renames it into place; the loser of the race discards its copy.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}"
    if target.is_dir() and _valid_cache(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    generate_synthetic_coco(tmp, seed=seed)
    if target.exists() and not _valid_cache(target):  # stale or corrupt: move aside, then delete
        trash = cache_dir / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            pass
    try:
        os.rename(tmp, target)
    except OSError:  # another process put a copy in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
