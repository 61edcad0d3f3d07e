import random

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import shl_kernels as shl
from shl_kernels import segment_numba
from shl_kernels.label_matrix import label_csr
from shl_kernels.segment_numba import conflict_graph
from shl_kernels.segmentation import segment_labels_python


@pytest.mark.parametrize("seed", range(20))
def test_spec_properties_random(seed):
    rng = random.Random(seed)
    C = rng.randint(1, 25)
    docs = [rng.sample(range(C), rng.randint(0, min(C, 5))) for _ in range(rng.randint(1, 40))]
    seg = shl.segment_labels(docs, C, tau=0.0)
    assert sorted(seg.order.tolist()) == list(range(C))
    assert seg.num_segments >= max(len(d) for d in docs)
    for d in docs:
        s = seg.segment_of[d].tolist()
        assert len(s) == len(set(s))
    again = shl.segment_labels(docs, C, tau=0.0)
    assert seg.order.tolist() == again.order.tolist()
    assert seg.offsets.tolist() == again.offsets.tolist()
    cap = shl.segment_labels(docs, C, max_segment_size=2, max_freq_ratio=3.0)
    assert int((cap.offsets[1:] - cap.offsets[:-1]).max()) <= 2
    dense = np.zeros((len(docs), C))
    for i, d in enumerate(docs):
        dense[i, d] = 1
    assert shl.segment_labels(dense, C).order.tolist() == seg.order.tolist()


def test_bad_segmentation_input():
    with pytest.raises(ValueError, match="labels"):
        shl.segment_labels([[0, 7]], 3)
    with pytest.raises(ValueError, match="labels"):
        shl.segment_labels([[-1]], 3)
    with pytest.raises(ValueError, match="tau"):
        shl.segment_labels([[0]], 3, tau=1.0)
    with pytest.raises(ValueError, match="empty"):
        shl.segment_labels([], 3)


# --- Numba implementation vs the plain-Python oracle ----------------------------------

TAUS = [0.0, 0.1, 0.2, 0.25, 0.3, 0.1 + 0.2, 1 / 3, 0.4, 0.5, 2 / 3, 0.75, 0.9]


def _random_docs(rng: random.Random, C: int, N: int) -> list[list[int]]:
    """Skewed label sets: frequent labels, ties in counts, labels never seen."""
    weights = [1.0 / (1 + c) ** rng.choice([0.0, 0.7, 1.5]) for c in range(C)]
    unseen = set(rng.sample(range(C), rng.randint(0, C // 3)))
    pool = [c for c in range(C) if c not in unseen] or [0]
    w = [weights[c] for c in pool]
    return [list(dict.fromkeys(rng.choices(pool, w, k=rng.randint(0, 7)))) for _ in range(N)]


def _assert_same(fast: shl.Segmentation, ref: shl.Segmentation) -> None:
    assert fast.order.tolist() == ref.order.tolist()
    assert fast.offsets.tolist() == ref.offsets.tolist()
    assert fast.label_counts.tolist() == ref.label_counts.tolist()
    assert fast.stats == ref.stats


@pytest.mark.parametrize("seed", range(40))
def test_matches_python_oracle(seed):
    rng = random.Random(1000 + seed)
    C = rng.randint(1, 40)
    docs = _random_docs(rng, C, rng.randint(1, 60))
    configs = [(0.0, None, None)] + [
        (rng.choice(TAUS), rng.choice([None, 1, 2, 3, 5, 50]),
         rng.choice([None, 1, 1.5, 2, 3.0, 10, float("inf")])) for _ in range(15)]
    for tau, cap, ratio in configs:
        kw = {"tau": tau, "max_segment_size": cap, "max_freq_ratio": ratio}
        _assert_same(shl.segment_labels(docs, C, **kw), segment_labels_python(docs, C, **kw))


@pytest.mark.parametrize("tau", TAUS)
def test_tau_boundary_is_strict(tau):
    # labels 0 and 1 each on 6 documents, together on k of them: s_01 = k / 6
    for k in range(7):
        docs = [[0, 1]] * k + [[0]] * (6 - k) + [[1]] * (6 - k)
        fast = shl.segment_labels(docs, 2, tau=tau)
        assert fast.num_segments == (2 if k / 6 > tau else 1)
        _assert_same(fast, segment_labels_python(docs, 2, tau=tau))


def test_matches_oracle_larger_zipf():
    rng = np.random.default_rng(0)
    C, N = 300, 2000
    p = 1.0 / np.arange(1, C + 1)
    docs = [rng.choice(C, size=rng.integers(1, 12), p=p / p.sum()).tolist() for _ in range(N)]
    docs.append(list(range(40)))  # a row longer than the in-place sort handles
    for kw in ({}, {"tau": 0.05}, {"tau": 0.3, "max_segment_size": 7},
               {"max_freq_ratio": 4.0}, {"tau": 0.1, "max_segment_size": 20,
                                         "max_freq_ratio": 50.0}):
        _assert_same(shl.segment_labels(docs, C, **kw), segment_labels_python(docs, C, **kw))


def test_column_scan_stops_when_all_earlier_labels_found():
    # at tau = 0 the scan of a label stops once it has met every earlier label: label 3
    # (rank 3) meets 0, 1, 2 on its first document, so its later documents are skipped;
    # label 4 never meets label 2 and must scan all its documents
    docs = ([[0, 1, 2, 3]] * 3 + [[0, 1, 2]] * 3 + [[0, 1, 3, 4]] * 2 + [[0, 4], [1, 4]]
            + [[0], [0], [1]])
    fast = shl.segment_labels(docs, 5)
    _assert_same(fast, segment_labels_python(docs, 5))
    assert fast.stats.num_cooccurring_pairs == 9


def test_parallel_path_matches_serial(monkeypatch):
    rng = np.random.default_rng(1)
    C, N = 500, 3000
    p = 1.0 / np.arange(1, C + 1) ** 0.8
    docs = [rng.choice(C, size=rng.integers(0, 15), p=p / p.sum()).tolist() for _ in range(N)]
    serial = shl.segment_labels(docs, C, tau=0.02)
    monkeypatch.setattr(segment_numba, "PARALLEL_MIN_NNZ", 0)
    _assert_same(shl.segment_labels(docs, C, tau=0.02), serial)
    monkeypatch.setattr(segment_numba, "PARALLEL_MIN_NNZ", 1 << 62)
    for scratch in (1, 5000):  # one label per chunk; many chunks of labels
        monkeypatch.setattr(segment_numba, "_SCRATCH", scratch)
        _assert_same(shl.segment_labels(docs, C, tau=0.02), serial)


def test_chunked_conflicts_match_one_chunk(monkeypatch):
    """The scratch normally holds all labels (one chunk, read in place by the greedy);
    a tiny scratch forces chunks, compaction and labels larger than the scratch."""
    rng = np.random.default_rng(2)
    C, N = 400, 2000
    p = 1.0 / np.arange(1, C + 1) ** 0.9
    docs = [rng.choice(C, size=rng.integers(0, 14), p=p / p.sum()).tolist() for _ in range(N)]
    for tau in (0.0, 0.05):
        one = shl.segment_labels(docs, C, tau=tau)
        monkeypatch.setattr(segment_numba, "_SCRATCH_PER_NNZ", 0)
        for scratch in (1, 300, 4000):
            monkeypatch.setattr(segment_numba, "_SCRATCH", scratch)
            _assert_same(shl.segment_labels(docs, C, tau=tau), one)
        monkeypatch.undo()
        _assert_same(one, segment_labels_python(docs, C, tau=tau))


# --- SPEC section 2 properties at a larger size ---------------------------------------

def _zipf_csr(N: int, C: int, seed: int) -> sp.csr_array:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, C + 1)
    lens = rng.integers(0, 15, N)
    rows = np.repeat(np.arange(N), lens)
    dense = np.zeros((N, C), np.int8)
    dense[rows, rng.choice(C, size=lens.sum(), p=p / p.sum())] = 1
    return sp.csr_array(dense)


def test_spec_properties_zipf():
    X = _zipf_csr(3000, 400, seed=2)
    dense = X.toarray().astype(np.float64)  # BLAS matmul; counts stay exact
    seg = shl.segment_labels(X, 400)
    assert sorted(seg.order.tolist()) == list(range(400))
    assert seg.num_segments >= int(dense.sum(1).max()) == seg.stats.max_labels_per_document
    # no document has two positives in one segment: per-segment positives <= 1
    onehot = np.eye(seg.num_segments, dtype=np.int64)[seg.segment_of.numpy()]
    assert (dense @ onehot).max() <= 1
    again = shl.segment_labels(X, 400)
    assert torch.equal(seg.order, again.order) and torch.equal(seg.offsets, again.offsets)
    # tau > 0: no conflicting pair (s_jk > tau) shares a segment
    M = dense.T @ dense
    n = np.diag(M).copy()
    np.fill_diagonal(M, 0)
    strength = M / np.maximum(np.minimum.outer(n, n), 1)
    for tau in (0.05, 0.2):
        seg = shl.segment_labels(X, 400, tau=tau)
        s = seg.segment_of.numpy()
        j, k = np.nonzero(strength > tau)
        assert not (s[j] == s[k]).any()
        assert len(j) // 2 == seg.stats.num_conflicting_pairs


def test_caps_hold():
    X = _zipf_csr(1000, 200, seed=3)
    seg = shl.segment_labels(X, 200, max_segment_size=4, max_freq_ratio=2.5)
    assert int(seg.segment_sizes.max()) <= 4
    counts = seg.label_counts
    for k in range(seg.num_segments):
        members = seg.order[seg.offsets[k]:seg.offsets[k + 1]]
        first = int(counts[members[0]])
        assert all(first / max(int(counts[c]), 1) <= 2.5 for c in members)


def test_same_as_networkx_first_fit():
    nx = pytest.importorskip("networkx")
    X = _zipf_csr(2000, 300, seed=4)
    for tau in (0.0, 0.1):
        seg = shl.segment_labels(X, 300, tau=tau)
        j, k = conflict_graph(X.indptr.astype(np.int64), X.indices.astype(np.int64), 300, tau)
        G = nx.Graph()
        G.add_nodes_from(range(300))
        G.add_edges_from(zip(j.tolist(), k.tolist()))
        visit = np.argsort(-seg.label_counts.numpy(), kind="stable").tolist()
        colours = nx.greedy_color(G, strategy=lambda G, colors, v=visit: iter(v))
        assert [colours[c] for c in range(300)] == seg.segment_of.tolist()


# --- input forms ----------------------------------------------------------------------

def _naive_sets(docs, C):
    return [sorted(set(d)) for d in docs]


@pytest.mark.parametrize("seed", range(5))
def test_input_forms_agree(seed):
    rng = random.Random(seed)
    C = rng.randint(2, 30)
    docs = _random_docs(rng, C, rng.randint(1, 40))
    docs[0] = docs[0] + docs[0][:1]  # a duplicate id in a row counts once
    dense = np.zeros((len(docs), C), np.float32)
    for i, d in enumerate(docs):
        dense[i, d] = 1
    coo_rows = [i for i, d in enumerate(docs) for _ in d]
    coo = sp.coo_array((np.ones(len(coo_rows)), (coo_rows, [c for d in docs for c in d])),
                       shape=(len(docs), C))  # duplicates are summed, still one label
    zeros = sp.csr_array(dense)
    zeros.data[:] = 1
    with_zero = sp.csr_array((np.r_[zeros.data, 0.0], np.r_[zeros.indices, 0],
                              np.r_[zeros.indptr[:-1], zeros.indptr[-1] + 1]),
                             shape=dense.shape)  # an explicit stored zero is no label
    rev = sp.csr_array(dense)
    for i in range(rev.shape[0]):  # unsorted ids within rows
        a, b = rev.indptr[i], rev.indptr[i + 1]
        rev.indices[a:b] = rev.indices[a:b][::-1].copy()
    rev.has_sorted_indices = False
    forms = [docs, tuple(tuple(d) for d in docs), [np.array(d, np.int32) for d in docs],
             [iter(d) for d in docs], dense, dense.astype(bool), torch.from_numpy(dense),
             torch.from_numpy(dense).bool(), sp.csr_array(dense), sp.csr_matrix(dense),
             sp.csc_array(dense), coo, with_zero, rev]
    want = _naive_sets(docs, C)
    ref = segment_labels_python(docs, C, tau=0.2)
    for form in forms:
        indptr, indices = label_csr(form, C)
        assert [r.tolist() for r in np.split(indices, indptr[1:-1])] == want
        if isinstance(form, list) and not hasattr(form[0], "__len__"):
            form = [iter(d) for d in docs]  # the iterators are spent
        _assert_same(shl.segment_labels(form, C, tau=0.2), ref)


def test_inputs_not_modified():
    dense = np.array([[1, 0, 2], [0, 0, 1]])
    coo = sp.coo_array(([1.0, 1.0, 0.0], ([0, 0, 1], [2, 2, 1])), shape=(2, 3))
    csr = sp.csr_array((np.array([1.0, 0.0, 1.0]), np.array([2, 0, 1]), np.array([0, 2, 3])),
                       shape=(2, 3))
    docs = [[2, 0, 2], [1]]
    snap = (dense.copy(), coo.toarray(), csr.data.copy(), csr.indices.copy(), [list(d) for d in docs])
    for x in (dense, coo, csr, docs):
        shl.segment_labels(x, 3)
    assert (dense == snap[0]).all() and (coo.toarray() == snap[1]).all()
    assert (csr.data == snap[2]).all() and (csr.indices == snap[3]).all() and docs == snap[4]


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("labels, C, kw, match", [
    ([[0, 3]], 3, {}, "labels.*\\[0, 3\\)"),
    ([[0], [-2]], 3, {}, "labels"),
    ([["a"]], 3, {}, "labels"),
    ([[2**70]], 3, {}, "labels"),
    (np.zeros((2, 4)), 3, {}, "labels.*shape"),
    (np.zeros(3), 3, {}, "labels.*shape"),
    (sp.csr_array((2, 4)), 3, {}, "labels.*shape"),
    ([], 3, {}, "empty"),
    (np.zeros((0, 3)), 3, {}, "empty"),
    (sp.csr_array((0, 3)), 3, {}, "empty"),
    ([[0]], 0, {}, "num_labels"),
    ([[0]], 2.5, {}, "num_labels"),
    ([[0]], 3, {"tau": -0.1}, "tau"),
    ([[0]], 3, {"tau": 1.0}, "tau"),
    ([[0]], 3, {"tau": float("nan")}, "tau"),
    ([[0]], 3, {"tau": "0.5"}, "tau"),
    ([[0]], 3, {"max_segment_size": 0}, "max_segment_size"),
    ([[0]], 3, {"max_segment_size": 2.5}, "max_segment_size"),
    ([[0]], 3, {"max_segment_size": True}, "max_segment_size"),
    ([[0]], 3, {"max_freq_ratio": 0.5}, "max_freq_ratio"),
    ([[0]], 3, {"max_freq_ratio": float("nan")}, "max_freq_ratio"),
    ([[0]], 3, {"max_freq_ratio": "2"}, "max_freq_ratio"),
])
@pytest.mark.parametrize("impl", ["numba", "python"])
def test_clear_errors(labels, C, kw, match, impl):
    fn = shl.segment_labels if impl == "numba" else segment_labels_python
    with pytest.raises(ValueError, match=match):
        fn(labels, C, **kw)
