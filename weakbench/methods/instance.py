"""Instance predictors: what a detection method (BBAM, CCGR) logs to MLflow and registers.

``weakbench predict`` loads one by ``models:/…@champion`` and draws its masks
(:func:`weakbench.platform.predict.predict_images`).
"""

from __future__ import annotations

from typing import Any

import torch


class InstancePredictor(torch.nn.Module):
    """A trained detection pipeline packaged for inference.

    ``forward(images)`` takes a list of float32 ``(3, H_i, W_i)`` RGB images in ``[0, 1]`` at
    their own size and returns one dict per image:

    * ``boxes`` float32 ``(K, 4)``, ``x0, y0, x1, y1`` in the image's pixels;
    * ``labels`` int64 ``(K,)``, class index in ``[0, C)`` (``class_names[label]``);
    * ``scores`` float32 ``(K,)`` in ``[0, 1]`` (detections below ``score_threshold`` dropped);
    * ``masks`` bool ``(K, H_i, W_i)``.

    The work is the method's own :meth:`predict_instances` (BBAM: detect, then optimise a box
    attribution mask per detection and cut it into a pseudo mask; with a trained Mask R-CNN,
    its masks).

    Attributes:
        kind: ``"instance"`` (a ``CamPredictor`` is ``"cam"``; ``predict`` and ``evaluate`` branch on it).
        method_name, class_names (C str), input_size (the detector's shorter side, pixels),
        score_threshold (float in [0, 1]), config (dict of hyperparameters).
    """

    kind = "instance"

    def __init__(self, method: Any, models: dict[str, torch.nn.Module], class_names: list[str], input_size: int,
                 score_threshold: float = 0.5):
        super().__init__()
        self.method = method
        self.models = torch.nn.ModuleDict(models)
        self.method_name = method.name
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        self.score_threshold = float(score_threshold)
        self.config = method.config.model_dump()
        self.multilabel = True

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.method.predict_instances(dict(self.models), list(images), score_threshold=self.score_threshold)
