"""Medical-coding metrics (shl_kernels.metrics) against hand cases and brute force."""
import itertools

import numpy as np
import pytest
import torch

from shl_kernels import metrics as M


def test_f1_hand_case():
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    s = np.array([[0.9, 0.6, 0.2], [0.1, 0.8, 0.4], [0.7, 0.3, 0.1]])
    # predictions >= 0.5: [1,1,0], [0,1,0], [1,0,0]: label 0 tp 2; label 1 tp 1 fp 1;
    # label 2 fn 1
    got = M.f1_scores(s, y)
    assert got["micro_precision"] == pytest.approx(3 / 4)
    assert got["micro_recall"] == pytest.approx(3 / 4)
    assert got["micro_f1"] == pytest.approx(3 / 4)
    assert got["macro_precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["macro_recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def _auc_pairs(s, y):
    pos, neg = s[y], s[~y]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0
                    for p, n in itertools.product(pos, neg)])


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.random((40, 6)), 1)  # many ties
    y = rng.random((40, 6)) < 0.3
    y[:, 5] = False  # no positive: left out of the macro mean
    got = M.roc_auc(s, y)
    labels = [c for c in range(6) if 0 < y[:, c].sum() < 40]
    assert got["macro_auc"] == pytest.approx(np.mean([_auc_pairs(s[:, c], y[:, c])
                                                      for c in labels]))
    assert got["micro_auc"] == pytest.approx(_auc_pairs(s.ravel(), y.ravel()))
    assert np.isnan(M.roc_auc(s, np.zeros_like(y))["macro_auc"])


def test_precision_recall_at_k_brute_force():
    rng = np.random.default_rng(1)
    s = rng.random((25, 12))
    y = rng.random((25, 12)) < 0.25
    y[3] = False  # a document without codes: recall 0
    got = M.precision_recall_at_k(s, y, ks=(1, 3, 12))
    for k in (1, 3, 12):
        top = [set(np.argsort(-row)[:k]) for row in s]
        hits = [len(t & set(np.flatnonzero(r))) for t, r in zip(top, y)]
        assert got[f"precision@{k}"] == pytest.approx(np.mean(hits) / k)
        rec = [h / r.sum() if r.sum() else 0.0 for h, r in zip(hits, y)]
        assert got[f"recall@{k}"] == pytest.approx(np.mean(rec))
    assert got["recall@12"] == pytest.approx(np.mean([1.0 if r.any() else 0.0 for r in y]))


def test_map_brute_force():
    rng = np.random.default_rng(2)
    s = rng.random((30, 5))
    y = rng.random((30, 5)) < 0.3
    y[:, 4] = False
    aps = []
    for c in range(4):
        order = np.argsort(-s[:, c])
        hits = y[order, c]
        aps.append(np.mean([hits[:i + 1].mean() for i in np.flatnonzero(hits)]))
    assert M.mean_average_precision(s, y) == pytest.approx(np.mean(aps))


def test_best_threshold_is_the_grid_maximum():
    rng = np.random.default_rng(3)
    s = rng.random((50, 8))
    y = (s + 0.3 * rng.normal(size=s.shape)) > 0.6
    grid = np.linspace(0.05, 0.95, 19)
    t, f = M.best_threshold(s, y, grid)
    scores = [M.f1_scores(s, y, g)["micro_f1"] for g in grid]
    assert f == pytest.approx(max(scores)) and t == pytest.approx(grid[int(np.argmax(scores))])


def test_coding_metrics_takes_torch_tensors():
    s = torch.rand(10, 7, dtype=torch.bfloat16)
    y = torch.rand(10, 7) < 0.4
    out = M.coding_metrics(s, y, ks=(1, 5))
    ref = M.coding_metrics(s.float().numpy(), y.numpy(), ks=(1, 5))
    assert out == ref
    assert {"micro_f1", "macro_f1", "micro_auc", "macro_auc", "precision@5", "map"} <= set(out)


@pytest.mark.parametrize("scores, targets, match", [
    (np.zeros(3), np.zeros(3), "^scores: "),
    (np.zeros((2, 3)), np.zeros((3, 2)), "^targets: "),
    (np.zeros((2, 3)), np.full((2, 3), 0.5), "^targets: "),
    (np.full((2, 3), np.nan), np.zeros((2, 3)), "^scores: "),
])
def test_bad_input_names_the_argument(scores, targets, match):
    with pytest.raises(ValueError, match=match):
        M.coding_metrics(scores, targets, ks=(1,))


def test_bad_k():
    with pytest.raises(ValueError, match="^ks: "):
        M.precision_recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), ks=(4,))
