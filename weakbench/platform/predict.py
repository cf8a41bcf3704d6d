"""Run a registered or logged model on new images and write overlays: CAMs for classifier
methods, instance masks for detection methods (``InstancePredictor``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from weakbench.methods.base import normalize_maps, resize_maps
from weakbench.core.errors import DataError
from weakbench.platform.registry import load_predictor  # noqa: F401  (re-exported: one loader)
from weakbench.core.overlay import cam_overlay, instance_overlay


@dataclass
class Prediction:
    """One image's prediction: the classes kept, their probabilities, and the overlay files."""

    image: Path
    classes: list[str]
    probabilities: list[float]
    overlays: list[Path]


def _load_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: image does not decode ({e}); give a JPEG or PNG file") from None


@torch.no_grad()
def predict_images(predictor, images: list[Path], out_dir: Path, *, threshold: float = 0.5, max_classes: int = 3) -> list[Prediction]:
    """Predict classes and write one overlay PNG per kept class, at the image's original size.

    Args:
        predictor: a loaded ``CamPredictor``.
        images: image files (JPEG/PNG).
        out_dir: created if needed; files are named ``<stem>_<class>.png``.
        threshold: probability (sigmoid for multi-label, softmax otherwise) a class needs to be kept;
            the top class is always kept.
        max_classes: at most this many classes per image.

    Raises:
        DataError: an image is missing or does not decode (names the file).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor.eval()
    if predictor.kind == "instance":
        return _predict_instances(predictor, images, out_dir)
    s = predictor.input_size
    mean = torch.tensor(predictor.mean).view(3, 1, 1)
    std = torch.tensor(predictor.std).view(3, 1, 1)
    results = []
    for path in images:
        img = _load_image(Path(path))
        x = torch.from_numpy(np.asarray(img.resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = ((x - mean) / std)[None]
        logits, cams = predictor(x)
        probs = torch.sigmoid(logits[0]) if predictor.multilabel else torch.softmax(logits[0], dim=0)
        order = probs.argsort(descending=True)[:max_classes].tolist()
        keep = [order[0]] + [c for c in order[1:] if probs[c] >= threshold]
        w, h = img.size
        maps = normalize_maps(resize_maps(cams[0, keep], (h, w)))
        written = []
        for k, c in enumerate(keep):
            name = predictor.class_names[c]
            overlay = cam_overlay(np.asarray(img), maps[k].numpy(), title=f"{name} {probs[c]:.2f}")
            target = out_dir / f"{Path(path).stem}_{name.replace(' ', '_').replace('/', '_')}.png"
            overlay.save(target)
            written.append(target)
        results.append(Prediction(Path(path), [predictor.class_names[c] for c in keep], [float(probs[c]) for c in keep], written))
    return results


def _predict_instances(predictor, images: list[Path], out_dir: Path) -> list[Prediction]:
    """One overlay per image with every detection's mask, box and ``class score`` caption."""
    results = []
    for path in images:
        img = _load_image(Path(path))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        det = predictor([x])[0]
        names = [predictor.class_names[int(c)] for c in det["labels"].tolist()]
        scores = [float(v) for v in det["scores"].tolist()]
        overlay = instance_overlay(np.asarray(img), det["masks"].cpu().numpy(), det["boxes"].tolist(),
                                   [f"{n} {q:.2f}" for n, q in zip(names, scores)],
                                   title=f"{len(names)} instance(s)")
        target = out_dir / f"{Path(path).stem}_instances.png"
        overlay.save(target)
        results.append(Prediction(Path(path), names, scores, [target]))
    return results
