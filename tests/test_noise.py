"""Noise detection (shl_kernels.noise): planted errors are found, a brute-force oracle gives
the same flags and p-values, and the flags feed the loss as `ignore`."""
import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

import shl_kernels as shl
from shl_kernels.noise import find_noisy_labels

pytest.importorskip("faiss")


def _planted(n=1200, d=24, clusters=4, n_noisy=24, seed=0):
    """Documents in well-separated clusters; a cluster's code is label = cluster id, plus
    random rarer codes. Planted: n_noisy wrong cluster codes added (false positives) and
    n_noisy cluster codes removed (missing)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)) * 3
    cl = rng.integers(0, clusters, n)
    x = (centers[cl] + rng.normal(size=(n, d))).astype(np.float32)
    labels = [sorted({int(c)} | ({clusters + int(rng.integers(0, 20))} if rng.random() < 0.3
                                 else set())) for c in cl]
    docs = rng.choice(n, 2 * n_noisy, replace=False)
    wrong, missing = set(), set()
    for i in docs[:n_noisy]:
        bad = (int(cl[i]) + 1) % clusters
        labels[i] = sorted(set(labels[i]) | {bad})
        wrong.add((int(i), bad))
    for i in docs[n_noisy:]:
        labels[i] = [lab for lab in labels[i] if lab != int(cl[i])]
        missing.add((int(i), int(cl[i])))
    return x, labels, clusters + 20, wrong, missing


def _pairs(a):
    return set(map(tuple, a.tolist()))


def test_finds_planted_errors():
    x, labels, C, wrong, missing = _planted()
    rep = find_noisy_labels(x, labels, num_labels=C, k=30)
    found_pos, found_miss = _pairs(rep.suspect_positive), _pairs(rep.suspect_missing)
    assert len(found_miss & missing) >= 0.9 * len(missing)
    assert len(found_miss - missing) <= 0.1 * len(found_miss)
    assert len(found_pos & wrong) >= 0.5 * len(wrong)  # a noisy neighbour can hide one
    assert len(found_pos - wrong) <= 0.1 * max(1, len(found_pos))
    assert rep.num_flagged == len(found_pos | found_miss)


def _oracle(x, labels, C, k, alpha, min_agreement, metric):
    """Brute force: full similarity matrix, self excluded, per-pair hypergeometric tests."""
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = -((x[:, None] - x[None]) ** 2).sum(-1) if metric == "l2" else x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nbrs = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    n = len(x)
    y = np.zeros((n, C), bool)
    for i, ls in enumerate(labels):
        y[i, ls] = True
    freq = y.sum(0)
    pos, miss = {}, {}
    for i in range(n):
        counts = y[nbrs[i]].sum(0)
        for c in range(C):
            if y[i, c]:
                p = hypergeom.cdf(counts[c], n - 1, freq[c] - 1, k)
                if p <= alpha:
                    pos[i, c] = p
            elif counts[c] >= np.ceil(min_agreement * k) and counts[c] > 0:
                p = hypergeom.sf(counts[c] - 1, n - 1, freq[c], k)
                if p <= alpha:
                    miss[i, c] = p
    return nbrs, pos, miss


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_matches_brute_force(metric):
    rng = np.random.default_rng(1)
    n, d, C, k = 150, 6, 9, 12
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += np.repeat([0.0, 4.0, 8.0], n // 3)  # some structure, so tests fire
    freq = [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.34, 0.34, 0.34]
    labels = [[c for c in range(C) if rng.random() < freq[c] * (1 + (c - 6 == i * 3 // n))]
              for i in range(n)]
    rep = find_noisy_labels(x, labels, num_labels=C, k=k, alpha=0.2, min_agreement=0.4,
                            metric=metric)
    nbrs, pos, miss = _oracle(x, labels, C, k, 0.2, 0.4, metric)
    assert np.array_equal(rep.neighbors, nbrs)
    assert _pairs(rep.suspect_positive) == set(pos) and pos
    assert _pairs(rep.suspect_missing) == set(miss) and miss
    np.testing.assert_allclose(rep.positive_pvalue,
                               [pos[tuple(p)] for p in rep.suspect_positive.tolist()])
    np.testing.assert_allclose(rep.missing_pvalue,
                               [miss[tuple(p)] for p in rep.suspect_missing.tolist()])


def test_rare_labels_are_never_suspect_positives():
    x, labels, C, _, _ = _planted(seed=2)
    labels[0] = sorted(set(labels[0]) | {C})  # a label of two far-apart documents
    far = int(np.argmax(((x - x[0]) ** 2).sum(1)))
    labels[far] = sorted(set(labels[far]) | {C})
    rep = find_noisy_labels(x, labels, num_labels=C + 1, k=30, alpha=0.5)
    assert C not in rep.suspect_positive[:, 1]


def test_self_is_never_a_neighbour_even_with_duplicates():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    x[7] = x[3]
    x[8] = x[3]
    rep = find_noisy_labels(x, [[0]] * 40, num_labels=1, k=5, batch_size=16)
    assert not (rep.neighbors == np.arange(40)[:, None]).any()
    assert {7, 8} <= set(rep.neighbors[3].tolist())
    assert (np.diff(rep.scores, axis=1) <= 1e-6).all()  # closest first


@pytest.mark.parametrize("flag", ["both", "positives", "missing"])
def test_ignore_feeds_the_loss(flag):
    x, labels, C, _, _ = _planted(n=600, n_noisy=12, seed=4)
    rep = find_noisy_labels(x, labels, num_labels=C, k=30, flag=flag)
    chosen = {"both": _pairs(rep.suspect_positive) | _pairs(rep.suspect_missing),
              "positives": _pairs(rep.suspect_positive),
              "missing": _pairs(rep.suspect_missing)}[flag]
    assert chosen and rep.num_flagged == len(chosen)
    flagged_docs = sorted({i for i, _ in chosen})
    rows = torch.tensor([flagged_docs[0], 5, *flagged_docs[1:4], 0])  # any batch order
    dense = torch.zeros(len(rows), C, dtype=torch.bool)
    for b, i in enumerate(rows.tolist()):
        for j, c in chosen:
            if j == i:
                dense[b, c] = True
    targets = torch.zeros(len(rows), C, dtype=torch.bool)
    for b, i in enumerate(rows.tolist()):
        targets[b, labels[i]] = True
    seg = shl.segment_labels(labels, C)
    z = torch.randn(len(rows), C, dtype=torch.float64)
    got = shl.segmented_harmonic_loss(z, targets, seg, ignore=rep.ignore_rows(rows),
                                      backend="torch")
    want = shl.segmented_harmonic_loss(z, targets, seg, ignore=dense, backend="torch")
    assert torch.equal(got, want)
    assert not torch.equal(got, shl.segmented_harmonic_loss(z, targets, seg, backend="torch"))
    indptr, indices = rep.ignore  # every document, in order
    assert indptr.numel() == len(x) + 1 and indices.numel() == rep.num_flagged


def test_inputs_are_not_modified_and_torch_input_works():
    x, labels, C, _, _ = _planted(n=300, n_noisy=6, seed=5)
    before, labels_before = x.copy(), [list(ls) for ls in labels]
    a = find_noisy_labels(x, labels, num_labels=C, k=20)
    t = torch.from_numpy(x.copy())
    b = find_noisy_labels(t, labels, num_labels=C, k=20)
    assert np.array_equal(x, before) and labels == labels_before
    assert torch.equal(t, torch.from_numpy(before))
    assert np.array_equal(a.neighbors, b.neighbors)
    dense = np.zeros((300, C), np.uint8)
    for i, ls in enumerate(labels):
        dense[i, ls] = 1
    c = find_noisy_labels(x, dense, k=20)  # C from the dense shape
    assert np.array_equal(a.suspect_missing, c.suspect_missing)
    names = [f"code{j}" for j in range(C)]
    assert "code" in a.summary(label_names=names) or a.num_flagged == 0


@pytest.mark.parametrize("kw, err, match", [
    ({"embeddings": np.zeros(5, np.float32)}, ValueError, "^embeddings: "),
    ({"embeddings": np.full((5, 2), np.nan, np.float32)}, ValueError, "^embeddings: "),
    ({"embeddings": np.zeros((1, 2), np.float32), "labels": [[0]]}, ValueError, "^embeddings: "),
    ({"k": 0}, ValueError, "^k: "),
    ({"k": 5}, ValueError, "^k: "),
    ({"k": 2.5}, ValueError, "^k: "),
    ({"alpha": 0.0}, ValueError, "^alpha: "),
    ({"alpha": 1.0}, ValueError, "^alpha: "),
    ({"min_agreement": 0.0}, ValueError, "^min_agreement: "),
    ({"flag": "all"}, ValueError, "^flag: "),
    ({"metric": "dot"}, ValueError, "^metric: "),
    ({"device": "gpu"}, ValueError, "^device: "),
    ({"batch_size": 0}, ValueError, "^batch_size: "),
    ({"labels": [[0]] * 4}, ValueError, "^labels: "),
    ({"num_labels": None}, ValueError, "^num_labels: "),
    ({"labels": [[0], [1], [2], [0], [9]]}, ValueError, "^labels: "),
])
def test_bad_input_names_the_argument(kw, err, match):
    args = {"embeddings": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32),
            "labels": [[0], [1], [0], [1], [2]], "num_labels": 3, "k": 2}
    args.update(kw)
    with pytest.raises(err, match=match):
        find_noisy_labels(args.pop("embeddings"), args.pop("labels"), **args)


def test_cuda_device_without_gpu_faiss_says_what_to_do():
    import faiss
    if faiss.get_num_gpus() > 0:
        pytest.skip("FAISS has GPUs here")
    with pytest.raises(ValueError, match="^device: 'cuda'.*faiss-gpu"):
        find_noisy_labels(np.eye(4, dtype=np.float32), [[0]] * 4, num_labels=1, k=2,
                          device="cuda")


def test_ignore_rows_checks_ids():
    x, labels, C, _, _ = _planted(n=200, n_noisy=4, seed=6)
    rep = find_noisy_labels(x, labels, num_labels=C, k=10)
    with pytest.raises(ValueError, match="^rows: "):
        rep.ignore_rows([0, 200])
    with pytest.raises(ValueError, match="^rows: "):
        rep.ignore_rows([[0, 1]])
    indptr, indices = rep.ignore_rows([])
    assert indptr.tolist() == [0] and indices.numel() == 0


def test_blocks_do_not_change_the_result():
    x, labels, C, _, _ = _planted(n=500, n_noisy=10, seed=7)
    one = find_noisy_labels(x, labels, num_labels=C, k=20)
    many = find_noisy_labels(x, labels, num_labels=C, k=20, batch_size=37)
    for name in ("neighbors", "suspect_positive", "positive_pvalue", "suspect_missing",
                 "missing_pvalue"):
        assert np.array_equal(getattr(one, name), getattr(many, name)), name
    assert len(one.suspect_missing) and len(one.suspect_positive)
