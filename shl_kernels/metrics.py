"""Evaluation metrics of the automated medical coding literature (CAML, PLM-ICD and the
MIMIC-III/IV review of Edin et al., 2023): micro/macro F1 at a decision threshold,
micro/macro ROC AUC, precision and recall at k, mean average precision, and the
threshold that maximises micro F1 on validation data.

Inputs: scores [N, C] (probabilities or logits: only their order matters, except for the
thresholded metrics) and targets [N, C] 0/1, as numpy arrays or torch tensors. Conventions
(stated because papers differ): macro F1 is the mean of per-label F1 over all labels, a
label with no positive and no prediction counting as F1 = 0 (sklearn's zero_division=0);
macro AUC and mAP average over the labels that have both a positive and a negative (AUC)
or a positive (mAP); ties in scores get the average rank (half credit in AUC).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["best_threshold", "coding_metrics", "f1_scores", "mean_average_precision",
           "precision_recall_at_k", "roc_auc"]


def _arrays(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    def arr(x, name):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            x = x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
            x = x.numpy()
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{name}: expected [N, C], got shape {x.shape}")
        return x

    s, y = arr(scores, "scores"), arr(targets, "targets")
    if s.shape != y.shape:
        raise ValueError(f"targets: shape {y.shape} differs from scores {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("targets: must hold only 0 and 1")
    if np.isnan(s).any():
        raise ValueError("scores: contain NaN")
    return s.astype(np.float64), y.astype(bool)


def f1_scores(scores, targets, threshold: float = 0.5) -> dict[str, float]:
    """micro/macro precision, recall and F1 of the predictions scores >= threshold."""
    s, y = _arrays(scores, targets)
    pred = s >= threshold
    tp = (pred & y).sum(0).astype(np.float64)
    fp = (pred & ~y).sum(0).astype(np.float64)
    fn = (~pred & y).sum(0).astype(np.float64)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)

    p_l, r_l = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1_l = ratio(2 * tp, 2 * tp + fp + fn)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    return {"micro_precision": float(ratio(np.array(TP), np.array(TP + FP))),
            "micro_recall": float(ratio(np.array(TP), np.array(TP + FN))),
            "micro_f1": float(ratio(np.array(2 * TP), np.array(2 * TP + FP + FN))),
            "macro_precision": float(p_l.mean()), "macro_recall": float(r_l.mean()),
            "macro_f1": float(f1_l.mean())}


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of one score vector: Mann-Whitney U from average ranks (ties half)."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_s = score[order]
    # average rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(score)]
    avg = (starts + ends + 1) / 2.0  # 1-based ranks
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(scores, targets) -> dict[str, float]:
    """micro AUC (every (document, label) pair pooled) and macro AUC (mean over labels with
    both classes); NaN where no label qualifies."""
    s, y = _arrays(scores, targets)
    npos = y.sum(0)
    ok = (npos > 0) & (npos < len(y))
    macro = float(np.mean([_auc(s[:, c], y[:, c]) for c in np.flatnonzero(ok)])) \
        if ok.any() else float("nan")
    flat_y = y.ravel()
    micro = _auc(s.ravel(), flat_y) if 0 < flat_y.sum() < flat_y.size else float("nan")
    return {"micro_auc": micro, "macro_auc": macro}


def precision_recall_at_k(scores, targets, ks=(5, 8, 15)) -> dict[str, float]:
    """P@k: correct codes among each document's k highest scores / k; R@k: / the document's
    number of codes (documents without codes count 0). Averaged over documents."""
    s, y = _arrays(scores, targets)
    out = {}
    order = np.argsort(-s, axis=1, kind="stable")
    n_true = y.sum(1)
    for k in ks:
        if not isinstance(k, int) or not 1 <= k <= s.shape[1]:
            raise ValueError(f"ks: each k must be an integer in [1, {s.shape[1]}], got {k!r}")
        hits = np.take_along_axis(y, order[:, :k], axis=1).sum(1)
        out[f"precision@{k}"] = float((hits / k).mean())
        out[f"recall@{k}"] = float(np.divide(hits, n_true, out=np.zeros(len(s)),
                                             where=n_true > 0).mean())
    return out


def mean_average_precision(scores, targets) -> float:
    """Mean over labels with a positive of the label's average precision (area under its
    precision-recall curve as the mean precision at each positive, ties broken by order)."""
    s, y = _arrays(scores, targets)
    aps = []
    for c in np.flatnonzero(y.any(0)):
        order = np.argsort(-s[:, c], kind="stable")
        hit = y[order, c]
        prec = np.cumsum(hit) / np.arange(1, len(hit) + 1)
        aps.append(prec[hit].mean())
    return float(np.mean(aps)) if aps else float("nan")


def best_threshold(scores, targets, grid=None) -> tuple[float, float]:
    """(threshold, micro F1) maximising micro F1 over `grid` (default 0.01..0.99): tune it
    on validation data, then report test metrics at it."""
    s, y = _arrays(scores, targets)
    grid = np.linspace(0.01, 0.99, 99) if grid is None else np.asarray(grid, np.float64)
    best = max(((float(t), f1_scores(s, y, float(t))["micro_f1"]) for t in grid),
               key=lambda tf: tf[1])
    return best


def coding_metrics(scores, targets, threshold: float = 0.5, ks=(5, 8, 15)) -> dict[str, float]:
    """Every metric above in one dict (F1 at `threshold`)."""
    out = f1_scores(scores, targets, threshold)
    out.update(roc_auc(scores, targets))
    out.update(precision_recall_at_k(scores, targets, ks))
    out["map"] = mean_average_precision(scores, targets)
    return out
