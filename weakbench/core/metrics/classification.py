"""Classification metrics: multi-label mean average precision and top-1 accuracy (percent)."""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of one class, in [0, 1] (NaN when there is no positive).

    ``AP = Σ_n (R_n − R_{n−1}) · P_n`` over the distinct score thresholds in decreasing order
    (scikit-learn's ``average_precision_score``, no interpolation): tied scores enter together,
    so the order of tied samples does not change the result.

    Args:
        scores: float (N,) scores, any range.
        labels: (N,) in {0, 1}.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0.5
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # last index of each run of equal scores
    ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes (those with at least one positive) of :func:`average_precision`, in percent.

    Args:
        scores: float (N, C) logits or probabilities.
        labels: (N, C) multi-hot in {0, 1}.

    Returns:
        mAP in [0, 100]; NaN when no class has a positive.

    Raises:
        ValueError: shapes differ.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, C)")
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(scores.shape[1])]
    aps = [a for a in aps if a == a]
    return 100.0 * float(np.mean(aps)) if aps else float("nan")


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of samples whose highest-scoring class is a positive label (ties: lowest index).

    Args:
        scores: float (N, C); labels: (N, C) multi-hot (one-hot for single-label data).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if len(scores) == 0:
        return float("nan")
    top = scores.argmax(axis=1)
    return 100.0 * float(np.mean(labels[np.arange(len(top)), top] > 0.5))
