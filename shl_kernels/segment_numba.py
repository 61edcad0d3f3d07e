"""Numba kernels for the greedy label segmentation of SPEC section 2.

The work runs in *rank space*: labels renumbered by visiting order (descending count,
ties ascending id). Then "placed earlier" is "smaller rank" and the rarer label of a pair
is the one with the larger rank; with rows sorted by rank, "the labels of a document
placed before j" is a prefix of its row, so scans need no compares.
Memory is O(nnz of the label matrix + number of conflicting pairs); no C x C matrix.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange

# Labels are dealt to blocks cyclically so that the Zipf-skewed work per label spreads
# evenly over threads (static prange chunks would give one thread all frequent labels).
_BLOCKS_PER_THREAD = 8
_SCRATCH = 1 << 22  # int32 entries of scratch for the neighbours of one chunk of labels
_INSERTION_MAX = 32  # rows up to this length are sorted in place, longer ones by np.sort
# Below this many (document, label) pairs the kernels run on one thread: waking the pool
# costs more than the work (measured up to ~15 ms per parallel call on a 2-vCPU VM).
PARALLEL_MIN_NNZ = 1 << 20


@contextmanager
def serial_if_small(nnz: int):
    """Run the parallel kernels of the block on one thread when the input is small."""
    if nnz >= PARALLEL_MIN_NNZ:
        yield
        return
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


@njit(cache=True, parallel=True)
def sort_unique_rows(indptr, indices):
    """CSR rows sorted ascending with duplicates dropped -> (indptr int64, indices)."""
    n = indptr.size - 1
    tmp = indices.copy()
    keep = np.zeros(n + 1, np.int64)
    for i in prange(n):
        a, b = indptr[i], indptr[i + 1]
        if b - a > _INSERTION_MAX:
            tmp[a:b] = np.sort(tmp[a:b])
        else:
            for t in range(a + 1, b):
                v = tmp[t]
                u = t - 1
                while u >= a and tmp[u] > v:
                    tmp[u + 1] = tmp[u]
                    u -= 1
                tmp[u + 1] = v
        k = 0
        for t in range(a, b):
            if t == a or tmp[t] != tmp[t - 1]:
                tmp[a + k] = tmp[t]
                k += 1
        keep[i + 1] = k
    out_ptr = np.cumsum(keep)
    out = np.empty(out_ptr[n], indices.dtype)
    for i in prange(n):
        a, o = indptr[i], out_ptr[i]
        for t in range(keep[i + 1]):
            out[o + t] = tmp[a + t]
    return out_ptr, out


@njit(cache=True)
def _transpose(indptr, indices, num_cols):
    """CSC view of a CSR matrix: for each column entry, its position t in the CSR and
    how many entries precede it in its row; and per column the sum of the latter.

    With sorted rows, the entries of a row before position t are exactly the columns
    smaller than indices[t], so (t - before, t) bounds the scan without a compare.
    """
    colptr = np.zeros(num_cols + 1, np.int64)
    for v in indices:
        colptr[v + 1] += 1
    colptr = np.cumsum(colptr)
    pos = colptr[:-1].copy()
    entry = np.empty(indices.size, np.int64)
    before = np.empty(indices.size, np.int32)
    bound = np.zeros(num_cols, np.int64)  # pair instances per column: >= distinct pairs
    for i in range(indptr.size - 1):
        for t in range(indptr[i], indptr[i + 1]):
            c = indices[t]
            entry[pos[c]] = t
            before[pos[c]] = t - indptr[i]
            bound[c] += t - indptr[i]
            pos[c] += 1
    return colptr, entry, before, bound


@njit(cache=True, parallel=True)
def _earlier_conflicts(ridx, colptr, entry, before, counts, tau, j0, j1, buf_ptr, buf, deg,
                       cooc, blocks):
    """For ranks j in [j0, j1), the ranks k < j with M_jk / n_j > tau (Gustavson's SpGEMM
    row with a dense accumulator): written to buf from buf_ptr[j - j0], counted in deg[j].
    cooc[j] gets the number of k < j that co-occur with j at all.
    """
    C = counts.size
    for blk in prange(blocks):
        acc = np.zeros(C, np.int32)  # M_jk for the current j; int32 halves its cache use
        touched = np.empty(C, np.int32)
        for j in range(j0 + blk, j1, blocks):
            nt = 0
            for t in range(colptr[j], colptr[j + 1]):
                for u in range(entry[t] - before[t], entry[t]):  # the labels placed before j
                    k = ridx[u]
                    if acc[k] == 0:
                        touched[nt] = k
                        nt += 1
                    acc[k] += 1
            nc = 0
            # n_j <= n_k for k < j, so min(n_j, n_k) = n_j; the same float64 division
            # as the Python implementation keeps "s_jk > tau" bit-identical.
            nj = counts[j]
            base = buf_ptr[j - j0]
            for q in range(nt):
                k = touched[q]
                if acc[k] / nj > tau:
                    buf[base + nc] = k
                    nc += 1
                acc[k] = 0
            deg[j] = nc
            cooc[j] = nt


@njit(cache=True)
def _compact(buf, buf_ptr, deg, j0, j1, out):
    """Copy the deg[j] neighbours found for each j in [j0, j1) next to each other."""
    o = 0
    for j in range(j0, j1):
        b = buf_ptr[j - j0]
        for q in range(deg[j]):
            out[o + q] = buf[b + q]
        o += deg[j]


@njit(cache=True)
def _find_open(parent, s):
    """First open segment >= s (union-find over closed segments, path halving)."""
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


@njit(cache=True)
def _greedy(adj_ptr, adj, counts, max_size, max_ratio):
    """First-fit placement in rank order -> (segment of each rank, number of segments).

    A segment that is full, or fails the frequency ratio, stays so for every later label
    (sizes only grow; n_c only falls), so it is closed for good and skipped in O(1)
    amortised. Conflicting segments are stamped, making each label O(degree + skipped).
    """
    C = counts.size
    seg = np.empty(C, np.int64)
    size = np.zeros(C, np.int64)
    first = np.empty(C, np.int64)  # count of each segment's first member, non-increasing
    stamp = np.full(C, -1, np.int64)
    parent = np.arange(C + 1)  # parent[s] == s: open (or not created yet)
    m = 0
    ratio_closed = 0  # segments [0, ratio_closed) fail the ratio for this and later labels
    for c in range(C):
        for e in range(adj_ptr[c], adj_ptr[c + 1]):
            stamp[seg[adj[e]]] = c
        denom = max(counts[c], 1)
        while ratio_closed < m and first[ratio_closed] / denom > max_ratio:
            ratio_closed += 1
        s = _find_open(parent, ratio_closed)
        while s < m and stamp[s] == c:
            s = _find_open(parent, s + 1)
        if s == m:
            first[m] = counts[c]
            m += 1
        seg[c] = s
        size[s] += 1
        if size[s] >= max_size:
            parent[s] = s + 1
    return seg, m


def _conflicts(indptr, indices, num_labels: int, tau: float):
    """Counts, visiting order and, in rank space, each label's earlier conflicting labels.

    Returns (counts, visit, adj_ptr, adj, cooc); adj[adj_ptr[j]:adj_ptr[j+1]] are the ranks
    k < j conflicting with rank j, cooc[j] the number of k < j co-occurring with j.
    """
    C = num_labels
    counts = np.bincount(indices, minlength=C).astype(np.int64)
    visit = np.argsort(-counts, kind="stable")  # descending count, ties ascending id
    rank = np.empty(C, np.int64)
    rank[visit] = np.arange(C)
    # int32 ranks: half the memory traffic of the random row reads below
    rptr, ridx = sort_unique_rows(indptr, rank.astype(np.int32)[indices])
    colptr, entry, before, bound = _transpose(rptr, ridx, C)
    counts_r = counts[visit]
    bound = np.minimum(bound, np.arange(C))  # at most j labels precede rank j
    # One pass over the work, in chunks of labels whose pair-instance bound fits a scratch
    # buffer; each chunk is compacted, so memory stays O(conflicting pairs + scratch).
    ends = np.cumsum(bound)
    blocks = _BLOCKS_PER_THREAD * numba.get_num_threads()
    deg = np.zeros(C, np.int64)
    cooc = np.zeros(C, np.int64)
    parts = []
    j0 = 0
    while j0 < C:
        done = ends[j0 - 1] if j0 else 0
        j1 = max(int(np.searchsorted(ends, done + _SCRATCH, side="right")), j0 + 1)
        buf_ptr = np.zeros(j1 - j0 + 1, np.int64)
        np.cumsum(bound[j0:j1], out=buf_ptr[1:])
        buf = np.empty(buf_ptr[-1], np.int32)
        _earlier_conflicts(ridx, colptr, entry, before, counts_r, float(tau), j0, j1, buf_ptr,
                           buf, deg, cooc, blocks)
        part = np.empty(deg[j0:j1].sum(), np.int32)
        _compact(buf, buf_ptr, deg, j0, j1, part)
        parts.append(part)
        j0 = j1
    adj_ptr = np.zeros(C + 1, np.int64)
    np.cumsum(deg, out=adj_ptr[1:])
    adj = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return counts, visit, adj_ptr, adj, cooc


def segment_csr(indptr: np.ndarray, indices: np.ndarray, num_labels: int, tau: float,
                max_size: int, max_ratio: float):
    """Greedy segmentation of a canonical CSR label matrix (rows sorted, no duplicates).

    max_size = num_labels + 1 and max_ratio = inf mean "no cap". Returns (order, offsets,
    counts, stats) with stats a dict of SegmentationStats fields.
    """
    with serial_if_small(indices.size):
        counts, visit, adj_ptr, adj, cooc = _conflicts(indptr, indices, num_labels, tau)
    seg_r, m = _greedy(adj_ptr, adj, counts[visit], int(max_size), float(max_ratio))
    order = visit[np.argsort(seg_r, kind="stable")]  # stable: keeps insertion order
    offsets = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(seg_r, minlength=m), out=offsets[1:])
    row_len = np.diff(indptr)
    stats = {"num_documents": int(row_len.size), "num_positives": int(indices.size),
             "max_labels_per_document": int(row_len.max(initial=0)),
             "num_cooccurring_pairs": int(cooc.sum()), "num_conflicting_pairs": int(adj.size)}
    return order, offsets, counts, stats


def conflict_graph(indptr: np.ndarray, indices: np.ndarray, num_labels: int,
                   tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Conflicting pairs as arrays (j, k) of original label ids, each pair once.

    For benchmarks and tests (e.g. to colour the same graph with networkx).
    """
    with serial_if_small(indices.size):
        _, visit, adj_ptr, adj, _ = _conflicts(indptr, indices, num_labels, tau)
    j = np.repeat(np.arange(num_labels), np.diff(adj_ptr))
    return visit[j], visit[adj]
