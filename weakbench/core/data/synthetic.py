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

Variants (``variant=``; on the command line ``--data synthetic:<variant>``, see
:func:`parse_synthetic`):

* ``"default"``: the above (byte-identical to every earlier release of version 1).
* ``"touching"``: the default look (same shapes and hues), but instances may touch and overlap, of
  any class, and about half of the images hold a group of two or three instances of *one* class
  placed side by side so that their boxes touch or overlap (CCGR's stop rule and instance
  separation need such pairs). 1–4 instances per image. A later instance occludes an earlier one;
  annotations are the *visible* masks (COCO convention) and boxes are those masks' extents; no
  instance keeps less than half of its own area or fewer than 40 pixels.
* ``"hard"``: the touching placement, plus appearance that a colour CRF cannot segment from the
  box alone: non-convex and thin shapes (``star, crescent, ell, bar, hoop, chevron``), each
  instance filled with an oriented stripe texture and coloured only part of the way from the
  local background towards its class hue (low contrast), on a cluttered background of smooth noise,
  stronger pixel noise and 6–12 unannotated distractor blobs and strokes in background-like colours.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from weakbench.core.errors import ConfigError

__all__ = ["generate_synthetic_coco", "SYNTHETIC_VERSION", "SHAPES", "HARD_SHAPES", "SYNTHETIC_VARIANTS",
           "ensure_synthetic", "parse_synthetic", "synthetic_name"]

SYNTHETIC_VERSION = 1
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
_COLOURS = ((215, 45, 40), (45, 175, 60), (50, 85, 225), (225, 200, 35), (200, 60, 200), (40, 195, 200))
HARD_SHAPES = ("star", "crescent", "ell", "bar", "hoop", "chevron")
SYNTHETIC_VARIANTS = ("default", "touching", "hard")
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


def _hard_shape_mask(shape: str, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Binary (size, size) mask of a non-convex or thin ``shape`` of :data:`HARD_SHAPES` inside
    ``box = (x0, y0, x1, y1)`` (inclusive)."""
    x0, y0, x1, y1 = box
    s = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    if shape == "star":  # five points, inner radius 0.4 of the outer
        pts = []
        for k in range(10):
            r = (s / 2) * (1.0 if k % 2 == 0 else 0.4)
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
        d.polygon(pts, fill=1)
    elif shape == "crescent":
        d.ellipse([x0, y0, x1, y1], fill=1)
        m = round(0.35 * s)
        d.ellipse([x0 + m, y0 - round(0.05 * s), x1 + m, y1 - round(0.05 * s)], fill=0)
    elif shape == "ell":
        t = max(2, round(0.28 * s))
        d.rectangle([x0, y0, x0 + t, y1], fill=1)
        d.rectangle([x0, y1 - t, x1, y1], fill=1)
    elif shape == "bar":  # a thin diagonal stroke
        d.line([(x0, y1), (x1, y0)], fill=1, width=max(2, round(0.16 * s)))
    elif shape == "hoop":  # a thin ring
        d.ellipse([x0, y0, x1, y1], fill=1)
        m = max(2, round(0.13 * s))
        d.ellipse([x0 + m, y0 + m, x1 - m, y1 - m], fill=0)
    elif shape == "chevron":
        w = max(2, round(0.18 * s))
        d.line([(x0, y0), (cx, y1), (x1, y0)], fill=1, width=w, joint="curve")
    else:  # pragma: no cover - HARD_SHAPES is closed
        raise ValueError(shape)
    return np.asarray(img, dtype=bool)


def _cluttered_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """The ``hard`` variant's background, float (size, size, 3) in [0, 255]: smooth noise, strong
    pixel noise and 6–12 unannotated blobs and strokes in muted colours."""
    canvas = _background(rng, size)
    canvas += rng.normal(0, 10, size=(size, size, 3)).astype(np.float32)
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(6, 13))):
        layer.paste(0, (0, 0, size, size))
        a, b = rng.integers(0, size, size=2)
        r = int(rng.integers(max(3, size // 16), max(4, size // 5)))
        if rng.random() < 0.5:
            d.ellipse([int(a) - r, int(b) - r, int(a) + r, int(b) + int(rng.integers(r // 2, 2 * r))], fill=1)
        else:
            c, e = rng.integers(0, size, size=2)
            d.line([(int(a), int(b)), (int(c), int(e))], fill=1, width=int(rng.integers(2, max(3, size // 24))))
        m = np.asarray(layer, dtype=bool)
        canvas[m] = rng.uniform(70, 190) + rng.uniform(-30, 30, size=3).astype(np.float32)
    return canvas


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """An oriented sinusoidal stripe texture, float (size, size, 1), amplitude 22 grey levels."""
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 7.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (np.cos(ang) * xx + np.sin(ang) * yy) * (2 * np.pi / period)
    return (22.0 * np.sin(phase))[..., None].astype(np.float32)


def _variant_image(rng: np.random.Generator, variant: str, num_classes: int, image_size: int,
                   lo: int, hi: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image of the ``touching`` or ``hard`` variant: ``(canvas float (S, S, 3), [(class, visible
    mask bool (S, S)), ...])`` in painting order (later instances occlude earlier ones)."""
    hard = variant == "hard"
    canvas = _cluttered_background(rng, image_size) if hard else _background(rng, image_size)
    shapes, draw = (HARD_SHAPES, _hard_shape_mask) if hard else (SHAPES, _shape_mask)
    plan: list[tuple[int, bool]] = []  # (class, place next to the previous instance)
    if rng.random() < 0.5:  # a group of one class whose members touch or overlap
        c = int(rng.integers(num_classes))
        plan += [(c, False)] + [(c, True)] * int(rng.integers(1, 3))
    plan += [(int(rng.integers(num_classes)), False) for _ in range(int(rng.integers(1, 3)) - (1 if plan else 0))]
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    classes: list[int] = []
    prev_box = None
    for cls, beside in plan:
        for _try in range(40):
            s = int(rng.integers(lo, hi + 1))
            if beside and prev_box is not None:  # touching or overlapping the previous box
                px0, py0, px1, py1 = prev_box
                ps = px1 - px0 + 1
                side = int(rng.integers(4))
                gap = int(rng.integers(-round(0.35 * min(s, ps)), 1))  # ≤ 0: boxes touch or overlap
                off = int(rng.integers(-s // 2, ps - s // 2 + 1))
                x0, y0 = {0: (px1 + 1 + gap, py0 + off), 1: (px0 - s - gap, py0 + off),
                          2: (px0 + off, py1 + 1 + gap), 3: (px0 + off, py0 - s - gap)}[side]
                if not (0 <= x0 <= image_size - s and 0 <= y0 <= image_size - s):
                    continue
            else:
                x0 = int(rng.integers(0, image_size - s))
                y0 = int(rng.integers(0, image_size - s))
            box = (x0, y0, x0 + s - 1, y0 + s - 1)
            mask = draw(shapes[cls], image_size, box)
            if mask.sum() < 40:
                continue
            left = [v & ~mask for v in visible]
            if all(lv.sum() >= max(40, 0.5 * f.sum()) for lv, f in zip(left, full)):
                break
        else:
            continue  # no room left; keep the instances placed so far
        visible = left + [mask]
        full.append(mask)
        classes.append(cls)
        prev_box = box
        colour = np.array(_COLOURS[cls], dtype=np.float32) + rng.uniform(-20, 20, size=3).astype(np.float32)
        if hard:  # only part of the way from the local background to the class hue, textured
            alpha = rng.uniform(0.35, 0.6)
            local = canvas[mask].mean(axis=0)
            fill = (1 - alpha) * local + alpha * colour + _stripes(rng, image_size)[mask]
            fill += rng.normal(0, 12, size=(int(mask.sum()), 3)).astype(np.float32)
        else:
            fill = colour + rng.normal(0, 6, size=(int(mask.sum()), 1)).astype(np.float32)
        canvas[mask] = np.clip(fill, 0, 255)
    return canvas, list(zip(classes, visible))


def generate_synthetic_coco(out_dir: str | Path, *, num_images: int = 96, num_classes: int = 4,
                            image_size: int = 96, seed: int = 0, variant: str = "default") -> Path:
    """Write the synthetic shapes dataset in COCO format to ``out_dir``.

    Args:
        out_dir: target directory (created; existing files of the same names are overwritten).
        num_images: number of images (>= 1).
        num_classes: number of classes, 1..6 (shapes ``disc, square, triangle, ring, cross,
            diamond`` in that order).
        image_size: side of the square RGB images, pixels (>= 32).
        seed: the only source of randomness; the same arguments give the same bytes.
        variant: ``"default"``, ``"touching"`` or ``"hard"`` (module docstring); the default's
            bytes do not depend on the other variants' existence. Category names are
            :data:`HARD_SHAPES` for ``"hard"``, :data:`SHAPES` otherwise.

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
    if variant not in SYNTHETIC_VARIANTS:
        raise ConfigError(f"synthetic dataset: variant {variant!r} is unknown; use one of {', '.join(SYNTHETIC_VARIANTS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    images, annotations = [], []
    ann_id = 1
    lo, hi = max(8, round(0.22 * image_size)), max(10, round(0.45 * image_size))
    for i in range(num_images):
        if variant != "default":
            canvas, instances = _variant_image(rng, variant, num_classes, image_size, lo, hi)
            for cls, mask in instances:
                annotations.append(_annotation(ann_id, i + 1, cls, mask, image_size))
                ann_id += 1
            name = f"{i:06d}.png"
            Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB").save(
                out / "images" / name, format="PNG")
            images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
            continue
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
            annotations.append(_annotation(ann_id, i + 1, cls, mask, image_size))
            ann_id += 1
        name = f"{i:06d}.png"
        Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB").save(out / "images" / name, format="PNG")
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
    info = {"description": "weakbench synthetic shapes", "version": str(SYNTHETIC_VERSION),
            "num_images": num_images, "num_classes": num_classes, "image_size": image_size, "seed": seed}
    if variant != "default":  # the default's bytes stay as they were
        info["variant"] = variant
    names = HARD_SHAPES if variant == "hard" else SHAPES
    doc = {
        "info": info,
        "licenses": [],
        "categories": [{"id": c + 1, "name": names[c], "supercategory": "shape"} for c in range(num_classes)],
        "images": images,
        "annotations": annotations,
    }
    (out / "annotations" / "instances.json").write_text(json.dumps(doc, indent=1) + "\n")
    from weakbench.core.data.coco import CocoSource

    (out / FINGERPRINT_FILE).write_text(CocoSource(out, name="synthetic").fingerprint + "\n")
    return out


def _annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray, image_size: int) -> dict:
    """The COCO annotation of one instance: RLE of ``mask``, its pixel extent as ``bbox``, its area."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    return {
        "id": ann_id, "image_id": image_id, "category_id": cls + 1, "iscrowd": 0,
        "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
        "area": float(mask.sum()),
        "segmentation": {"size": [image_size, image_size], "counts": rle["counts"].decode("ascii")},
    }


def parse_synthetic(data: str | None) -> str | None:
    """The synthetic variant a ``--data`` value names, or None for a directory.

    ``None`` and ``"synthetic"`` name the default; ``"synthetic:touching"`` and
    ``"synthetic:hard"`` the variants (``"synthetic:default"`` the default too). A value starting with
    ``"synthetic:"`` is never a path.

    Raises:
        ConfigError: ``synthetic:<name>`` with an unknown name (lists the variants).
    """
    if data is None or data == "synthetic":
        return "default"
    if not isinstance(data, str) or not data.startswith("synthetic:"):
        return None
    v = data.split(":", 1)[1]
    if v not in SYNTHETIC_VARIANTS:
        raise ConfigError(f"--data {data}: unknown synthetic variant {v!r}; use synthetic, "
                          + ", ".join(f"synthetic:{x}" for x in SYNTHETIC_VARIANTS[1:]))
    return v


def synthetic_name(variant: str) -> str:
    """Dataset name of a synthetic variant: ``"synthetic"`` for the default, ``"synthetic-<variant>"`` otherwise."""
    return "synthetic" if variant == "default" else f"synthetic-{variant}"


def _valid_cache(path: Path) -> bool:
    from weakbench.core.data.coco import CocoSource
    from weakbench.core.errors import DataError

    f = path / FINGERPRINT_FILE
    if not f.is_file():
        return False
    try:
        return CocoSource(path, name="synthetic").fingerprint == f.read_text().strip()
    except DataError:
        return False


def ensure_synthetic(cache_dir: str | Path, seed: int = 0, variant: str = "default") -> Path:
    """Return ``cache_dir / f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}"`` (a variant:
    ``synthetic-v1-<variant>-seed<seed>``), generating it if absent or if its ``fingerprint``
    file does not match its content.

    Safe when several processes (Ray workers) call it at once: each generates into a private
    temporary directory and renames it into place; the loser of the race discards its copy.
    """
    cache_dir = Path(cache_dir).expanduser()
    tag = "" if variant == "default" else f"-{variant}"
    target = cache_dir / f"synthetic-v{SYNTHETIC_VERSION}{tag}-seed{seed}"
    if target.is_dir() and _valid_cache(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    generate_synthetic_coco(tmp, seed=seed, variant=variant)
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
