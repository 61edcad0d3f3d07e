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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Labels are dealt to blocks cyclically so that the Zipf-skewed work per label spreads
# evenly over threads (static prange chunks would give one thread all frequent labels).
_BLOCKS_PER_THREAD = 8
# Scratch for the neighbours of one chunk of labels: int32 entries, at least _SCRATCH and
# _SCRATCH_PER_NNZ per (document, label) pair (O(nnz), so that one chunk usually does).
_SCRATCH = 1 << 22
_SCRATCH_PER_NNZ = 4
# Column entries ahead whose document row is prefetched (measured: 2 takes
# _earlier_conflicts from ~36 to ~27 ms on the benchmark; 1 to 8 all within 2 ms).
_AHEAD = 2
_INSERTION_MAX = 32  # rows up to this length are sorted in place, longer ones by np.sort
# Below this many (document, label) pairs the kernels run on one thread: waking the pool
# costs more than the work (measured up to ~15 ms per parallel call on a 2-vCPU VM).
PARALLEL_MIN_NNZ = 1 << 20


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to start loading arr[idx] into cache (llvm.prefetch: read, keep).

    The scans below jump to a random document row per column entry: the row is a cache
    miss that out-of-order execution overlaps only with the next entry or so. Asking for
    the row of an entry a couple of places ahead hides that latency. A hint only: never
    faults, so idx may point anywhere inside the array.
    """
    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


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


@njit(cache=True, parallel=True)
def _label_counts(indptr, indices, num_labels, row_split):
    """Label counts of each part of the rows [row_split[p], row_split[p + 1]) -> [T, C]
    int64; parts run in parallel (no atomics, and no int64 copy of int32 ids as
    np.bincount makes). n_c is the column sum; _rank_layout reuses the parts."""
    T = row_split.size - 1
    part = np.zeros((T, num_labels), np.int64)
    for p in prange(T):
        row = part[p]
        for t in range(indptr[row_split[p]], indptr[row_split[p + 1]]):
            row[indices[t]] += 1
    return part


@njit(cache=True, parallel=True)
def _rank_layout(indptr, indices, rank, start, row_split, doc, entry, ridx, before):
    """Both views of the label matrix in rank space, by two counting-sort passes, O(nnz).

    Pass 1 buckets the documents by the rank of each label: CSC in rank order, documents
    ascending within a column. Pass 2 walks that CSC rank by rank and appends each rank to
    its document's row, so the rows come out sorted by rank (ridx) with no per-row sort,
    and each CSC entry learns where its rank landed in the row (entry) and how many ranks
    precede it there (before). With sorted rows those are exactly the labels placed
    earlier, so ridx[entry - before : entry] is the scan of _earlier_conflicts.

    Both passes run on the row parts of _label_counts: part p owns the slice
    [start[p, j], start[p + 1, j]) of every CSC column j (documents ascend within a
    column), so the parts never write the same slot. start[T] is the CSC colptr.
    Fills ridx, entry, before (nnz slots each; allocated by the caller) and returns
    bound[T, C]; bound summed over parts is the number of pair instances (document,
    earlier label) of rank j, >= its distinct pairs.
    Rows must hold no duplicate ids (canonical CSR). doc: scratch of nnz document ids.
    entry: output of nnz slots, int32 when nnz < 2**31 (it is written and read once per
    (document, label) pair: int64 cost ~4 ms more on the benchmark).
    """
    T = row_split.size - 1
    C = rank.size
    bound = np.zeros((T, C), np.int64)
    for p in prange(T):
        pos = start[p].copy()
        for i in range(row_split[p], row_split[p + 1]):
            for t in range(indptr[i], indptr[i + 1]):
                r = rank[indices[t]]
                doc[pos[r]] = i
                pos[r] += 1
        i0 = row_split[p]
        fill = indptr[i0:row_split[p + 1]].copy()  # next free slot of each row of the part
        b = bound[p]
        q1 = start[p + 1, C - 1]
        for j in range(C):
            acc = 0  # in a register: b[j] += ... would chain a store and load per entry
            for q in range(start[p, j], start[p + 1, j]):
                if q + _AHEAD < q1:  # the write to ridx below is a cache miss
                    _prefetch(ridx, fill[doc[q + _AHEAD] - i0])
                i = doc[q]
                t = fill[i - i0]
                fill[i - i0] = t + 1
                ridx[t] = j
                entry[q] = t
                before[q] = t - indptr[i]
                acc += t - indptr[i]
            b[j] = acc
    return bound


@njit(cache=True, parallel=True)
def _earlier_conflicts(ridx, colptr, entry, before, counts, tau, j0, j1, buf_ptr, buf, deg,
                       cooc, blocks):
    """For ranks j in [j0, j1), the ranks k < j with M_jk / n_j > tau (Gustavson's SpGEMM
    row with a dense accumulator): written to buf from buf_ptr[j - j0], counted in deg[j].
    cooc[j] gets the number of k < j that co-occur with j at all.

    buf_ptr must reserve min(bound[j], j + 1) slots for j: the scans below always store
    the candidate, then advance only if it is new (branch-free: whether a label is new is
    a coin flip the branch predictor loses), so one store may land a slot past the last
    distinct neighbour when all j earlier labels were already seen.
    """
    C = counts.size
    for blk in prange(blocks):
        acc = np.zeros(C, np.int32)  # M_jk for the current j; int32 halves its cache use
        seen = np.full(C, -1, np.int32)  # seen[k] == j: k already listed for j
        for j in range(j0 + blk, j1, blocks):
            nj = counts[j]
            base = buf_ptr[j - j0]
            nt = 0
            # n_j <= n_k for k < j, so min(n_j, n_k) = n_j, and M_jk >= 1 gives
            # M_jk / n_j >= 1 / n_j (float division is monotone): when 1 / n_j > tau
            # (always for tau = 0) every co-occurring k conflicts and M_jk need not be
            # counted. The same float64 division as the Python implementation keeps
            # "s_jk > tau" bit-identical.
            c1 = colptr[j + 1]
            if nj > 0 and 1 / nj > tau:
                for t in range(colptr[j], c1):
                    if t + _AHEAD < c1:
                        _prefetch(ridx, entry[t + _AHEAD] - before[t + _AHEAD])
                    for u in range(entry[t] - before[t], entry[t]):
                        k = ridx[u]
                        buf[base + nt] = k
                        nt += seen[k] != j
                        seen[k] = j
                    # All j earlier labels found: the rest of the column adds nothing.
                    # The frequent labels (a few hundred) get here after a few documents
                    # yet hold ~30% of all pair instances on Zipf data.
                    if nt == j:
                        break
                deg[j] = nt
                cooc[j] = nt
                continue
            for t in range(colptr[j], c1):
                if t + _AHEAD < c1:
                    _prefetch(ridx, entry[t + _AHEAD] - before[t + _AHEAD])
                for u in range(entry[t] - before[t], entry[t]):
                    k = ridx[u]
                    buf[base + nt] = k  # the distinct k, in buf until filtered below
                    nt += acc[k] == 0
                    acc[k] += 1
            nc = 0
            for q in range(nt):
                k = buf[base + q]
                buf[base + nc] = k
                nc += acc[k] / nj > tau
                acc[k] = 0
            deg[j] = nc
            cooc[j] = nt


@njit(cache=True, parallel=True)
def _compact(buf, buf_start, deg, out_ptr, out):
    """Copy the deg[j] neighbours at buf[buf_start[j]:] to out[out_ptr[j]:], each j."""
    for j in prange(deg.size):
        b, o = buf_start[j], out_ptr[j]
        for q in range(deg[j]):
            out[o + q] = buf[b + q]


def _compacted(buf, buf_start, deg):
    """(ptr, nbr) of the lists buf[buf_start[j]:buf_start[j] + deg[j]], side by side."""
    ptr = np.zeros(deg.size + 1, np.int64)
    np.cumsum(deg, out=ptr[1:])
    out = np.empty(ptr[-1], np.int32)
    _compact(buf, buf_start, deg, ptr, out)
    return ptr, out


@njit(cache=True)
def _find_open(parent, s):
    """First open segment >= s (union-find over closed segments, path halving)."""
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


@njit(cache=True)
def _greedy(adj_ptr, adj, counts, max_size, max_ratio):
    """First-fit placement in rank order on a conflict CSR; see _greedy_lists."""
    return _greedy_lists(adj_ptr[:-1], adj_ptr[1:] - adj_ptr[:-1], adj, counts, max_size,
                         max_ratio)


@njit(cache=True)
def _greedy_lists(nbr_start, deg, nbr, counts, max_size, max_ratio):
    """First-fit placement in rank order -> (segment of each rank, number of segments).
    The earlier conflicting ranks of rank c are nbr[nbr_start[c]:nbr_start[c] + deg[c]].

    A segment that is full, or fails the frequency ratio, stays so for every later label
    (sizes only grow; n_c only falls), so it is closed for good and skipped in O(1)
    amortised. Conflicting segments are stamped, making each label O(degree + skipped).
    int32 state (m <= C < 2**31): the random seg/stamp accesses touch half the cache.
    """
    C = counts.size
    seg = np.empty(C, np.int32)
    size = np.zeros(C, np.int64)
    first = np.empty(C, np.int64)  # count of each segment's first member, non-increasing
    stamp = np.full(C, -1, np.int32)
    parent = np.arange(C + 1)  # parent[s] == s: open (or not created yet)
    m = 0
    ratio_closed = 0  # segments [0, ratio_closed) fail the ratio for this and later labels
    for c in range(C):
        for e in range(nbr_start[c], nbr_start[c] + deg[c]):
            stamp[seg[nbr[e]]] = c
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


def _conflict_lists(indptr, indices, num_labels: int, tau: float):
    """Counts, visiting order and, in rank space, each label's earlier conflicting labels.

    Returns (counts, visit, nbr_start, deg, nbr, cooc): the ranks k < j conflicting with
    rank j are nbr[nbr_start[j]:nbr_start[j] + deg[j]], cooc[j] is the number of k < j
    co-occurring with j. In one chunk (the usual case) nbr is the scratch buffer itself,
    O(nnz) with gaps: the greedy reads it in place, so no compaction pass.
    """
    C = num_labels
    # Row parts of about equal nnz, one per thread, for the two passes over the matrix.
    T = numba.get_num_threads()
    row_split = np.searchsorted(indptr, np.linspace(0, indices.size, T + 1), side="left")
    row_split[0], row_split[-1] = 0, indptr.size - 1
    part = _label_counts(indptr, indices, C, row_split)
    counts = part.sum(axis=0)
    visit = np.argsort(-counts, kind="stable")  # descending count, ties ascending id
    rank = np.empty(C, np.int32)
    rank[visit] = np.arange(C, dtype=np.int32)
    counts_r = counts[visit]
    colptr = np.zeros(C + 1, np.int64)
    np.cumsum(counts_r, out=colptr[1:])
    start = np.zeros((T + 1, C), np.int64)  # start[p, j]: part p's first CSC slot in column j
    np.cumsum(part[:, visit], axis=0, out=start[1:])
    start += colptr[:-1]
    entry = np.empty(indices.size, np.int32 if indices.size < 2**31 else np.int64)
    # Allocated here, not in the kernel: numpy asks for transparent huge pages on large
    # arrays, Numba's allocator does not (first touch of 4 KiB pages: ~2x the cost).
    ridx = np.empty(indices.size, np.int32)  # int32 ranks: half the traffic of row reads
    before = np.empty(indices.size, np.int32)
    doc = np.empty(indices.size, np.int32 if indptr.size <= 2**31 else np.int64)
    bound = _rank_layout(indptr, indices, rank, start, row_split, doc, entry, ridx, before)
    bound = bound.sum(axis=0)
    # Slots for rank j's neighbours: at most its pair instances, at most the j earlier
    # labels, plus the one spare store of the branch-free scan (see _earlier_conflicts).
    reserve = np.minimum(bound, np.arange(1, C + 1))
    # One pass over the work, in chunks of labels whose reserve fits a scratch buffer of
    # O(nnz) entries (at least _SCRATCH), so memory stays O(nnz + conflicting pairs).
    # Usually one chunk, read in place; with several, each chunk is compacted.
    ends = np.cumsum(reserve)
    scratch = max(_SCRATCH, _SCRATCH_PER_NNZ * indices.size)
    buf = np.empty(min(scratch, int(ends[-1])), np.int32)  # reused by every chunk
    blocks = _BLOCKS_PER_THREAD * numba.get_num_threads()
    deg = np.zeros(C, np.int64)
    cooc = np.zeros(C, np.int64)
    if int(ends[-1]) <= buf.size:  # one chunk
        buf_start = ends - reserve
        _earlier_conflicts(ridx, colptr, entry, before, counts_r, float(tau), 0, C, buf_start,
                           buf, deg, cooc, blocks)
        return counts, visit, buf_start, deg, buf, cooc
    parts = []
    j0 = 0
    while j0 < C:
        done = ends[j0 - 1] if j0 else 0
        j1 = max(int(np.searchsorted(ends, done + buf.size, side="right")), j0 + 1)
        buf_start = ends[j0:j1] - reserve[j0:j1] - done
        if ends[j1 - 1] - done > buf.size:  # one label alone needs more than the scratch
            buf = np.empty(ends[j1 - 1] - done, np.int32)
        _earlier_conflicts(ridx, colptr, entry, before, counts_r, float(tau), j0, j1,
                           buf_start, buf, deg, cooc, blocks)
        parts.append(_compacted(buf, buf_start, deg[j0:j1])[1])
        j0 = j1
    nbr = np.concatenate(parts)
    nbr_start = np.zeros(C, np.int64)
    np.cumsum(deg[:-1], out=nbr_start[1:])
    return counts, visit, nbr_start, deg, nbr, cooc


def _conflicts(indptr, indices, num_labels: int, tau: float):
    """_conflict_lists as a CSR: (counts, visit, adj_ptr, adj, cooc), the ranks k < j
    conflicting with rank j in adj[adj_ptr[j]:adj_ptr[j+1]]."""
    counts, visit, nbr_start, deg, nbr, cooc = _conflict_lists(indptr, indices, num_labels, tau)
    adj_ptr, adj = _compacted(nbr, nbr_start, deg)
    return counts, visit, adj_ptr, adj, cooc


def segment_csr(indptr: np.ndarray, indices: np.ndarray, num_labels: int, tau: float,
                max_size: int, max_ratio: float):
    """Greedy segmentation of a canonical CSR label matrix (rows sorted, no duplicates).

    max_size = num_labels + 1 and max_ratio = inf mean "no cap". Returns (order, offsets,
    counts, stats) with stats a dict of SegmentationStats fields.
    """
    with serial_if_small(indices.size):
        counts, visit, nbr_start, deg, nbr, cooc = _conflict_lists(indptr, indices,
                                                                   num_labels, tau)
    seg_r, m = _greedy_lists(nbr_start, deg, nbr, counts[visit], int(max_size),
                             float(max_ratio))
    order = visit[np.argsort(seg_r, kind="stable")]  # stable: keeps insertion order
    offsets = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(seg_r, minlength=m), out=offsets[1:])
    row_len = np.diff(indptr)
    stats = {"num_documents": int(row_len.size), "num_positives": int(indices.size),
             "max_labels_per_document": int(row_len.max(initial=0)),
             "num_cooccurring_pairs": int(cooc.sum()), "num_conflicting_pairs": int(deg.sum())}
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
